"""HF → GGUF export for llama.cpp: an F16 writer and llama.cpp's quantizer.

    from edgedistill.export.gguf import write_gguf, quantize_gguf
    f16 = write_gguf(Path("runs/tiny/merged"), Path("tiny-f16.gguf"))
    quantize_gguf(f16, Path("tiny-q4_k_m.gguf"), "Q4_K_M")
"""

from edgedistill.export.gguf.arch import ARCHITECTURES
from edgedistill.export.gguf.quantize import QTYPES, quantize_gguf
from edgedistill.export.gguf.writer import write_gguf

__all__ = ["ARCHITECTURES", "QTYPES", "quantize_gguf", "write_gguf"]
