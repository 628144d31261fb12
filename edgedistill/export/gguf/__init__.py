"""HF → GGUF export for llama.cpp: an F16 writer and llama.cpp's quantizer, behind one entry point.

    from edgedistill.export.gguf import GgufExportOptions, export_gguf
    export_gguf(Path("runs/tiny/merged"), Path("tiny-q4_k_m.gguf"), GgufExportOptions(quant="Q4_K_M"))
"""

from edgedistill.export.gguf.arch import ARCHITECTURES
from edgedistill.export.gguf.export import GgufExport, GgufExportOptions, export_gguf
from edgedistill.export.gguf.quantize import quantize_gguf
from edgedistill.export.gguf.writer import write_gguf

__all__ = ["ARCHITECTURES", "GgufExport", "GgufExportOptions", "export_gguf", "quantize_gguf", "write_gguf"]
