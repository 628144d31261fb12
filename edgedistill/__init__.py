"""edgedistill: distill a teacher language model into a compact student and ship it to devices.

    edgedistill run                      # the default recipe on the embedded teacher
    edgedistill run recipes/tiny.yaml --out runs/tiny
"""

__version__ = "0.1.0"
