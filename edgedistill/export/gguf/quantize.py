"""Quantize a GGUF file with llama.cpp's own quantizer (through llama-cpp-python).

llama.cpp decides per tensor what "Q4_K_M" means (some tensors get more bits; rows whose length is
not a multiple of 256 fall back from K-quants to legacy types), so the result is exactly what
llama.cpp's `llama-quantize` tool would write. The output is written under a temporary name beside
`dst` and renamed into place only when llama.cpp reports success.

    quantize_gguf(Path("tiny-f16.gguf"), Path("tiny-q4_k_m.gguf"), "Q4_K_M")
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgedistill.errors import EdgedistillError

# quantization name (as users write it, any case) → llama_cpp's LLAMA_FTYPE_* constant
QTYPES: dict[str, str] = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


@contextlib.contextmanager
def _stderr_to(log: list[str]) -> Iterator[None]:
    """Sends file descriptor 2 to a temporary file: llama.cpp prints a line per tensor there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log.append(sink.read().decode(errors="replace"))


def quantize_gguf(src: Path, dst: Path, qtype: str, *, threads: int | None = None,
                  overwrite: bool = False) -> Path:
    """Quantize the GGUF `src` to `qtype` (a key of QTYPES) at `dst` and return `dst`.

    `threads` defaults to all cores. An existing `dst` is an error unless `overwrite`.
    """
    # imported here: loading llama.cpp's shared library is not free, and only this needs it
    import llama_cpp

    src, dst = Path(src), Path(dst)
    ftype_name = QTYPES.get(qtype.upper())
    if ftype_name is None:
        raise EdgedistillError(f"unknown GGUF quantization {qtype!r}", f"use one of {', '.join(QTYPES)}")
    if not src.is_file():
        raise EdgedistillError(f"{src} not found", "write the F16 GGUF first (edgedistill export --format gguf)")
    if dst.exists() and not overwrite:
        raise EdgedistillError(f"{dst} already exists", "choose another path or pass overwrite=True")
    if dst.resolve() == src.resolve():
        raise EdgedistillError(f"{dst} is the input file", "write the quantized model to a new path")
    if not dst.parent.is_dir():
        raise EdgedistillError(f"{dst.parent} is not a folder", "create the output folder first")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads or 0  # llama.cpp reads <= 0 as "all hardware threads"
    tmp_file = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    log: list[str] = []
    try:
        with _stderr_to(log):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp_file).encode(), params)
        if status != 0:
            tail = "\n    ".join(log[0].strip().splitlines()[-5:])
            raise EdgedistillError(
                f"llama.cpp could not quantize {src} to {qtype} (status {status}); its log ends:\n    {tail}",
                "check that the input is a valid F16/F32 GGUF",
            )
        os.replace(tmp_file, dst)
    finally:
        tmp_file.unlink(missing_ok=True)
    return dst
