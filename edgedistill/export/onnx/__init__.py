"""HF → ONNX export for ONNX Runtime: onnxruntime-genai's builder or optimum, then int8/int4 weights.

    from edgedistill.export.onnx import export_onnx, verify_onnx
    export_onnx(Path("runs/sentiment/distill"), Path("student-int4"), "int4")   # verified on the way
    verify_onnx(Path("student-int4"), Path("runs/sentiment/distill"))          # again, on its own
"""

from edgedistill.export.onnx.export import export_onnx, export_onnx_set
from edgedistill.export.onnx.options import BUILDER_ARCHITECTURES, MANIFEST, PRECISIONS, QuantOptions
from edgedistill.export.onnx.verify import BOUNDS, format_verification, reference_for, verify_onnx

__all__ = ["BOUNDS", "BUILDER_ARCHITECTURES", "MANIFEST", "PRECISIONS", "QuantOptions", "export_onnx", "export_onnx_set",
           "format_verification", "reference_for", "verify_onnx"]
