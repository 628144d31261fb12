"""Quantize a GGUF file with llama.cpp's own quantizer (through llama-cpp-python).

llama.cpp decides per tensor what "Q4_K_M" means (some tensors get more bits; rows whose length is
not a multiple of 256 fall back from K-quants to legacy types), so the result is exactly what
llama.cpp's `llama-quantize` tool would write. The output is written under a temporary name beside
`dst` and renamed into place only when llama.cpp reports success.

    quantize_gguf(Path("tiny-f16.gguf"), Path("tiny-q4_k_m.gguf"), "Q4_K_M")
    fit = quantize_to_budget(Path("tiny-f16.gguf"), Path("tiny.gguf"), parse_size("60MB"))  # best that fits

Because of those per-tensor choices a quantized file's size is hard to predict exactly, so
`quantize_to_budget` does not estimate: it quantizes from the most to the least precise type in
edgedistill.formats.BUDGET_LADDER and keeps the first file that fits (llama.cpp's quantizer takes seconds).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from edgedistill.errors import EdgedistillError
from edgedistill.formats import BUDGET_LADDER, gguf_type

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


def _check_paths(src: Path, dst: Path, overwrite: bool, what: str) -> None:
    """Fail before any work on a missing input, an existing or same output, or no output folder."""
    if not src.is_file():
        raise EdgedistillError(f"{src} not found", "write the F16 GGUF first (edgedistill export --format gguf)")
    if dst.exists() and not overwrite:
        raise EdgedistillError(f"{dst} already exists", "choose another path or pass overwrite=True")
    if dst.resolve() == src.resolve():
        raise EdgedistillError(f"{dst} is the input file", f"write the {what} model to a new path")
    if not dst.parent.is_dir():
        raise EdgedistillError(f"{dst.parent} is not a folder", "create the output folder first")


def quantize_gguf(src: Path, dst: Path, qtype: str, *, threads: int | None = None,
                  overwrite: bool = False, imatrix: Path | None = None) -> Path:
    """Quantize the GGUF `src` to `qtype` (one of edgedistill.formats.GGUF_QUANTS) at `dst`; returns `dst`.

    `threads` defaults to all cores. An existing `dst` is an error unless `overwrite`. `imatrix`:
    an importance-matrix GGUF (edgedistill.export.gguf.imatrix) that weighs the rounding error;
    the file records it under quantize.imatrix.*, as llama-quantize does.
    """
    # imported here: loading llama.cpp's shared library is not free, and only this needs it
    import llama_cpp

    src, dst = Path(src), Path(dst)
    ftype_name = gguf_type(qtype).llama_ftype
    _check_paths(src, dst, overwrite, "quantized")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads or 0  # llama.cpp reads <= 0 as "all hardware threads"
    # the ctypes arrays must live until llama_model_quantize returns
    _imatrix_arrays = _set_imatrix(params, Path(imatrix), llama_cpp) if imatrix is not None else None
    tmp_file = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    log: list[str] = []
    try:
        with _stderr_to(log):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp_file).encode(), params)
        if status != 0:
            tail = "\n    ".join(log[0].strip().splitlines()[-5:])
            raise EdgedistillError(
                f"llama.cpp could not quantize {src} to {qtype} (status {status}); its log ends:\n    {tail}",
                "check that the input is a valid F16/F32 GGUF and that the output folder has room for the file",
            )
        os.replace(tmp_file, dst)
    finally:
        tmp_file.unlink(missing_ok=True)
    return dst


def _set_imatrix(params, path: Path, llama_cpp) -> tuple:
    """Point `params` at the imatrix in `path`: a NULL-terminated array of (name, values, size),
    and the quantize.imatrix.* keys llama-quantize writes. Returns what must outlive the call."""
    import ctypes

    from edgedistill.export.gguf.imatrix import read_imatrix

    found = read_imatrix(path)
    values = [np.ascontiguousarray(v, dtype=np.float32) for v in found.values.values()]
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    for entry, name, array in zip(entries, found.values, values):
        entry.name = name.encode()
        entry.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = array.size
    params.imatrix = entries

    overrides = (llama_cpp.llama_model_kv_override * 5)()  # 4 keys and the empty-key terminator
    for override, (key, value) in zip(overrides, (
        ("quantize.imatrix.file", path.name),
        ("quantize.imatrix.dataset", ", ".join(found.datasets) or "unknown"),
        ("quantize.imatrix.entries_count", len(values)),
        ("quantize.imatrix.chunks_count", found.chunk_count),
    )):
        override.key = key.encode()
        if isinstance(value, str):
            override.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            override.value.val_str = value.encode()[:127]
        else:
            override.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            override.value.val_i64 = value
    params.kv_overrides = overrides
    return entries, values, overrides


# unit (lower case) → bytes; the unit's spelling says decimal (KB) or binary (KiB)
SIZE_UNITS: dict[str, int] = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*")


def parse_size(text: str) -> int:
    """Bytes in a size such as "60MB" (10**6 each), "1.5 GiB" (2**30 each) or "512KiB", rounded down."""
    match = _SIZE.fullmatch(text)
    unit = match and SIZE_UNITS.get(match[2].lower())
    if not unit:
        raise EdgedistillError(f"size {text!r} is not a number with a unit",
                               "write it like 60MB, 1.5GB or 512MiB (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)")
    size_bytes = int(Decimal(match[1]) * unit)
    if size_bytes <= 0:
        raise EdgedistillError(f"size {text!r} is not positive", "give the largest file size you can ship, e.g. 60MB")
    return size_bytes


def format_size(size_bytes: int) -> str:
    """"48.2 MB": decimal units, the largest that keeps the number >= 1."""
    value, unit = float(size_bytes), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{size_bytes} B" if unit == "B" else f"{value:.1f} {unit}"


@dataclass(frozen=True)
class BudgetChoice:
    """The type `quantize_to_budget` kept, and the size of every file it made on the way."""

    qtype: str
    path: Path
    size_bytes: int
    tried_bytes: dict[str, int]  # type → file size, in the order tried (the chosen one last)


def quantize_to_budget(f16: Path, dst: Path, max_bytes: int, *, threads: int | None = None,
                       overwrite: bool = False, progress: bool = False, imatrix: Path | None = None) -> BudgetChoice:
    """Write at `dst` the most precise BUDGET_LADDER type of the F16 GGUF `f16` whose file is at most
    `max_bytes`, keeping no other file; EdgedistillError naming the smallest size made if none fits.

    F16 is `f16` copied. Candidates are written beside `dst` under temporary names and removed;
    the one that fits is renamed into place. `progress` shows a bar over the types tried; `imatrix`
    goes to quantize_gguf.
    """
    f16, dst = Path(f16), Path(dst)
    _check_paths(f16, dst, overwrite, "chosen")

    tried: dict[str, int] = {}
    bar = _progress_bar(f"fit {format_size(max_bytes)}") if progress else None
    try:
        for qtype in BUDGET_LADDER:
            if bar is not None:
                bar.set_postfix_str(qtype)
            candidate = dst.with_name(f".{dst.name}.{qtype.lower()}.{os.getpid()}.candidate")
            try:
                if qtype == "F16":
                    shutil.copyfile(f16, candidate)
                else:
                    quantize_gguf(f16, candidate, qtype, threads=threads, overwrite=True, imatrix=imatrix)
                tried[qtype] = candidate.stat().st_size
                if tried[qtype] <= max_bytes:
                    os.replace(candidate, dst)
                    return BudgetChoice(qtype, dst, tried[qtype], tried)
            finally:
                candidate.unlink(missing_ok=True)
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    smallest = min(tried, key=tried.get)
    raise EdgedistillError(
        f"no GGUF type fits in {format_size(max_bytes)} ({max_bytes} bytes): the smallest, {smallest}, "
        f"is {format_size(tried[smallest])} ({tried[smallest]} bytes)",
        f"allow at least {tried[smallest]} bytes, or distill a smaller student (fewer layers, a narrower "
        "width or a smaller vocabulary)",
    )


def _progress_bar(label: str):
    from tqdm import tqdm

    return tqdm(total=len(BUDGET_LADDER), unit="type", desc=label)
