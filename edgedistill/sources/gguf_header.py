"""The GGUF header checked against the file's size before gguf-py reads it.

    python -c "from edgedistill.sources.gguf_header import check_gguf_header; check_gguf_header('model.gguf')"

gguf-py's GGUFReader trusts every length and count it reads: one damaged type byte turns a 5-byte
string into an array of 2^62 items, and it loops, allocating, until memory runs out. The walk here
follows the spec's layout (magic, version, counts, key-value pairs, tensor infos) over a memory map
and checks each length and count against the bytes left before going on, so a damaged or
truncated file is an EdgedistillError naming the byte at fault, in milliseconds.
"""

from __future__ import annotations

import functools
import mmap
import struct
import sys
from pathlib import Path

import gguf

from edgedistill.errors import EdgedistillError

GGUF_MAGIC = b"GGUF"

_VT = gguf.GGUFValueType
_SCALAR_BYTES = {
    _VT.UINT8: 1, _VT.INT8: 1, _VT.BOOL: 1, _VT.UINT16: 2, _VT.INT16: 2, _VT.UINT32: 4, _VT.INT32: 4,
    _VT.FLOAT32: 4, _VT.UINT64: 8, _VT.INT64: 8, _VT.FLOAT64: 8,
}
# The fewest bytes one array item can take (a string is at least its u64 length; an array its item
# type and count), so a declared count can be checked against the bytes left before reading any item.
_MIN_ITEM_BYTES = {**_SCALAR_BYTES, _VT.STRING: 8, _VT.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # empty name, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, data offset
GGML_MAX_DIMS = 4
# gguf-py reads arrays of arrays (llama.cpp does not); no writer nests deeper, and a bound keeps the
# walk's recursion bounded.
_MAX_ARRAY_DEPTH = 8
DAMAGED_HINT = (
    "the file is damaged or was not written by llama.cpp/gguf-py: copy or download it again and "
    "compare its size and checksum with the original"
)


class _HeaderWalker:
    """The GGUF header as the spec lays it out, walked over a read-only buffer without keeping values."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path, self.buf, self.size, self.offset = path, buf, len(buf), 4
        self.byte_order = "<" if sys.byteorder == "little" else ">"
        self.u32, self.u64 = struct.Struct(self.byte_order + "I"), struct.Struct(self.byte_order + "Q")

    def fail(self, problem: str, *, truncated: bool = True) -> EdgedistillError:
        state = "truncated or damaged" if truncated else "damaged"
        return EdgedistillError(f"{self.path} is {state}: {problem}", hint=DAMAGED_HINT)

    def fits(self, n_bytes: int, claim: str, at: int) -> None:
        left = self.size - self.offset
        if n_bytes > left:
            raise self.fail(f"{claim} at byte {at:#x}, but only {left} bytes follow")

    def read(self, unpacker: struct.Struct, what: str) -> int:
        self.fits(unpacker.size, f"{what} needs {unpacker.size} bytes", self.offset)
        (value,) = unpacker.unpack_from(self.buf, self.offset)
        self.offset += unpacker.size
        return value

    def name(self, what: str) -> str:
        at = self.offset
        length = self.read(self.u64, f"{what}'s name length")
        self.fits(length, f"{what} declares a name of {length} bytes", at)
        raw = self.buf[self.offset : self.offset + length]
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what}'s name at byte {at:#x} is not UTF-8: {raw[:40]!r}", truncated=False) from None

    def unique_name(self, kind: str, index: int, seen: set[str]) -> tuple[str, str]:
        """The name of key or tensor `index`, and how messages call it; one seen before is damage."""
        at = self.offset
        name = self.name(f"{kind} {index}")
        what = f"{kind} {index} ({_shown(name)})"
        if name in seen:
            raise self.fail(f"{what} at byte {at:#x} appears twice", truncated=False)
        seen.add(name)
        return name, what

    def value(self, value_type: int, what: str, at: int, depth: int = 0) -> None:
        if value_type in _SCALAR_BYTES:
            self.fits(_SCALAR_BYTES[value_type], f"{what} needs {_SCALAR_BYTES[value_type]} bytes", at)
            self.offset += _SCALAR_BYTES[value_type]
        elif value_type == _VT.STRING:
            length = self.read(self.u64, f"{what}'s string length")
            self.fits(length, f"{what} declares a string of {length} bytes", at)
            self.offset += length
        elif value_type == _VT.ARRAY:
            item_type = self.read(self.u32, f"{what}'s array item type")
            count = self.read(self.u64, f"{what}'s array length")
            if item_type not in _MIN_ITEM_BYTES:
                raise self.fail(f"{what} declares an array of type {item_type} at byte {at:#x}, which is "
                                f"not a GGUF value type (0-12)", truncated=False)
            if item_type == _VT.ARRAY and depth == _MAX_ARRAY_DEPTH:
                raise self.fail(f"{what} nests arrays deeper than {_MAX_ARRAY_DEPTH} at byte {at:#x}",
                                truncated=False)
            item_bytes = _MIN_ITEM_BYTES[item_type]
            each = f"at least {item_bytes}" if item_type in (_VT.STRING, _VT.ARRAY) else item_bytes
            self.fits(count * item_bytes,
                      f"{what} declares an array of {count} {_VT(item_type).name.lower()}s ({each} bytes each)", at)
            if item_type == _VT.STRING:
                self.strings(count, what)
            elif item_type == _VT.ARRAY:
                for index in range(count):
                    self.value(_VT.ARRAY, f"{what} item {index}", self.offset, depth + 1)
            else:
                self.offset += count * _SCALAR_BYTES[item_type]
        else:
            raise self.fail(f"{what} has value type {value_type} at byte {at:#x}, which is not a GGUF value "
                            "type (0-12)", truncated=False)

    def strings(self, count: int, what: str) -> None:
        # Vocabularies hold ~50k strings: one tight loop on locals, not a method call per string.
        buf, size, unpack, offset = self.buf, self.size, self.u64.unpack_from, self.offset
        for index in range(count):
            if size - offset < 8:
                self.offset = offset
                self.read(self.u64, f"{what} item {index}'s string length")
            length = unpack(buf, offset)[0]
            if length > size - offset - 8:
                self.offset = offset + 8
                self.fits(length, f"{what} item {index} declares a string of {length} bytes", offset)
            offset += 8 + length
        self.offset = offset

    def walk(self) -> None:
        version = self.read(self.u32, "the version")
        if version & 0xFFFF == 0:  # gguf-py's test for a file written on a host of the other byte order
            self.byte_order = ">" if self.byte_order == "<" else "<"
            self.u32, self.u64 = struct.Struct(self.byte_order + "I"), struct.Struct(self.byte_order + "Q")
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in gguf.gguf_reader.READER_SUPPORTED_VERSIONS:
            raise self.fail(f"its GGUF version at byte 0x4 is {version}; gguf-py reads versions "
                            f"{gguf.gguf_reader.READER_SUPPORTED_VERSIONS}", truncated=False)
        tensor_count = self.read(self.u64, "the tensor count")
        kv_count = self.read(self.u64, "the key-value count")
        self.fits(kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES,
                  f"the header declares {kv_count} key-value pairs and {tensor_count} tensors (at least "
                  f"{_MIN_KV_BYTES} and {_MIN_TENSOR_INFO_BYTES} bytes each)", 0x8)
        alignment, keys = gguf.GGUF_DEFAULT_ALIGNMENT, set()
        for index in range(kv_count):
            key, what = self.unique_name("key", index, keys)
            at = self.offset
            value_type = self.read(self.u32, f"{what}'s value type")
            if key == "general.alignment":
                alignment = self.read(self.u32, what) if value_type == _VT.UINT32 else 0
                if alignment == 0 or alignment & (alignment - 1):
                    raise self.fail(f"{what} at byte {at:#x} is not a uint32 power of two", truncated=False)
            else:
                self.value(value_type, what, at)
        tensor_ends, names = [], set()
        for index in range(tensor_count):
            at = self.offset
            _, what = self.unique_name("tensor", index, names)
            n_dims = self.read(self.u32, f"{what}'s dimension count")
            if n_dims > GGML_MAX_DIMS:
                raise self.fail(f"{what} declares {n_dims} dimensions at byte {at:#x}; GGUF allows at most "
                                f"{GGML_MAX_DIMS}", truncated=False)
            dims = [self.read(self.u64, f"{what}'s dimension {d}") for d in range(n_dims)]
            ggml_type = self.read(self.u32, f"{what}'s type")
            if ggml_type not in gguf.GGML_QUANT_SIZES:
                raise self.fail(f"{what} has tensor type {ggml_type} at byte {at:#x}, which gguf-py does not know",
                                truncated=False)
            block, type_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
            if dims and dims[0] % block:
                raise self.fail(f"{what}'s first dimension {dims[0]} at byte {at:#x} is not a multiple of "
                                f"{gguf.GGMLQuantizationType(ggml_type).name}'s block of {block}", truncated=False)
            data_offset = self.read(self.u64, f"{what}'s data offset")
            n_elements = functools.reduce(int.__mul__, dims, 1)
            tensor_ends.append((what, data_offset + n_elements // block * type_bytes))
        data_start = -(-self.offset // alignment) * alignment
        for what, end in tensor_ends:
            if data_start + end > self.size:
                raise self.fail(f"{what}'s data ends at byte {data_start + end}, but the file has {self.size} bytes")


def _shown(name: str) -> str:
    """A key or tensor name for a message: a damaged length can make one thousands of bytes long."""
    return repr(name) if len(name) <= 60 else repr(name[:60]) + "..."


def check_gguf_header(path: Path) -> None:
    """Check a GGUF file's header against its size before gguf-py reads it (which trusts every count).

    A file that is not GGUF, damaged or truncated raises EdgedistillError naming the byte at fault.
    """
    path = Path(path)
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise EdgedistillError(
                f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r})",
                hint="pass a .gguf file written by llama.cpp or gguf-py, or an HF folder",
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _HeaderWalker(path, buf).walk()
