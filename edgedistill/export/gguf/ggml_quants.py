"""ggml's own quantize and dequantize, through llama.cpp's shared library: the values a GGUF holds.

    python -c "import numpy as np; from edgedistill.export.gguf.ggml_quants import round_trip; \
print(round_trip(np.random.randn(4, 256).astype('float32'), 'Q4_K')[0, :4])"

llama.cpp's quantizer (edgedistill.export.gguf.quantize) turns each tensor of the F16 file into
float32 and hands it to ggml_quantize_chunk; a runtime reads it back with the type's to_float.
Both are called here, from the very library the quantizer runs (llama-cpp-python's libggml-base),
so `round_trip` gives bit for bit the weights a quantized GGUF holds: edgedistill.distill.quant_aware
trains through them. Every ggml type quantizes a row on its own (blocks never span rows), so any
permutation of rows (the writer's rotary reordering of q/k) commutes with it.

`tensor_types` reads which type llama.cpp chose for each tensor of a quantized file, since a
"Q4_K_M" file mixes types (Q6_K for some tensors, legacy fallbacks for rows not a multiple of 256).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import gguf
import numpy as np

from edgedistill.errors import EdgedistillError


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits of ggml.h (llama-cpp-python 0.3.x ships the header beside the library)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@cache
def _library() -> ctypes.CDLL:
    import llama_cpp  # loads libllama and with it the libggml-base the quantizer uses

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    """A ggml tensor type by name ("Q4_K", "q6_k"); gguf-py's enum has ggml.h's numbers."""
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise EdgedistillError(f"{name!r} is not a ggml tensor type",
                               f"use one of {', '.join(t.name for t in gguf.GGMLQuantizationType)}") from None


def round_trip(rows: np.ndarray, type_name: str) -> np.ndarray:
    """`rows` [n, k] float32 quantized to the ggml type and read back as float32, as llama.cpp's
    quantizer and its runtime do (no importance matrix). F32 is returned as it is, F16 rounded."""
    qtype = ggml_type(type_name)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return rows.copy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return rows.astype(np.float16).astype(np.float32)
    lib = _library()
    n, k = rows.shape
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    if k % traits.blck_size:
        raise EdgedistillError(f"rows of {k} cannot be stored as {qtype.name} (blocks of {traits.blck_size})",
                               "llama.cpp picks another type for such rows: take the type from the quantized file")
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise EdgedistillError(f"{qtype.name} needs an importance matrix, which training cannot fix in advance",
                               "quantize-aware training supports the types that quantize without one")
    packed = np.empty(lib.ggml_row_size(int(qtype), k) * n, dtype=np.uint8)
    src = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    written = lib.ggml_quantize_chunk(int(qtype), src, packed.ctypes.data, 0, n, k, None)
    if written != packed.size:
        raise EdgedistillError(f"ggml wrote {written} bytes of {qtype.name} where {packed.size} were expected",
                               "report this as a bug (the llama-cpp-python build and ggml.h disagree)")
    out = np.empty_like(rows)
    _TO_FLOAT(traits.to_float)(packed.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n * k)
    return out


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name ("Q4_K", "Q6_K", "F32", ...) of the file at `path`."""
    reader = gguf.GGUFReader(str(path))
    return {tensor.name: gguf.GGMLQuantizationType(tensor.tensor_type).name for tensor in reader.tensors}
