"""HF → ONNX export for ONNX Runtime: onnxruntime-genai's builder or optimum, then int8/int4 weights.

    from edgedistill.export.onnx import OnnxExportOptions, export_onnx, verify_onnx
    export_onnx("runs/sentiment/distill", Path("student-int4"), OnnxExportOptions("int4"))  # verified on the way
    verify_onnx(Path("student-int4"), Path("runs/sentiment/distill"))                      # again, on its own
"""

from edgedistill.export.onnx.export import export_onnx, export_onnx_set
from edgedistill.export.onnx.options import BUILDER_ARCHITECTURES, MANIFEST, OnnxExportOptions, QuantOptions
from edgedistill.export.onnx.verify import BOUNDS, format_verification, reference_for, verify_onnx

__all__ = ["BOUNDS", "BUILDER_ARCHITECTURES", "MANIFEST", "OnnxExportOptions", "QuantOptions", "export_onnx",
           "export_onnx_set", "format_verification", "reference_for", "verify_onnx"]
