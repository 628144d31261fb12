"""Damaged GGUF files get a clear error naming the byte at fault, never a hang or a traceback
(issue 13, item 1: a type byte changed from string to array made `run` hang while memory grew).

    .venv/bin/python -m pytest -q tests/test_faults_gguf.py

The sample is tools/fuzz_gguf.py's small valid GGUF (a few hundred tokens, merges, a u32 array, three
tensors); each test damages a copy of one field, found by reading the sample with gguf-py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf.imatrix import read_imatrix
from edgedistill.sources.builtin import builtin_gguf_path, builtin_names
from edgedistill.sources.gguf import open_gguf, read_gguf, read_tokenizer_metadata
from edgedistill.sources.gguf_header import check_gguf_header

FUZZER = Path(__file__).resolve().parents[1] / "tools" / "fuzz_gguf.py"
# tools/ is a folder of scripts, not a package
_spec = importlib.util.spec_from_file_location("fuzz_gguf", FUZZER)
fuzz_gguf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_gguf)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return fuzz_gguf.write_sample_gguf(tmp_path_factory.mktemp("sample") / "sample.gguf")


def _offset(reader: gguf.GGUFReader, part: np.ndarray) -> int:
    """Where in the file a part of a field gguf-py read lies."""
    return part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def _damaged(sample: Path, out: Path, *, key: str | None = None, tensor: int | None = None, part: int = 0,
             value: int, width: int = 4, at: int | None = None) -> Path:
    """A copy of `sample` with `width` bytes set to `value`: at `at`, or at part `part` of a key or tensor."""
    if at is None:
        reader = gguf.GGUFReader(sample)
        field = reader.get_field(key) if key is not None else reader.tensors[tensor].field
        at = _offset(reader, field.parts[part])
    data = bytearray(sample.read_bytes())
    data[at : at + width] = value.to_bytes(width, "little")
    out.write_bytes(data)
    return out


def _refused(path: Path, match: str) -> EdgedistillError:
    with pytest.raises(EdgedistillError, match=match) as error:
        open_gguf(path)
    assert str(path) in error.value.problem and "again" in error.value.hint
    return error.value


def _limited_memory() -> None:
    # were the header check to let the file through, gguf-py would fill memory: stop it at 4 GB
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.integration
def test_the_issue_string_type_made_array_is_refused_at_once(sample, tmp_path):
    # key 0 (general.architecture, "llama") has its value type at 0x34 in every gguf-py file
    assert sample.read_bytes()[0x34] == gguf.GGUFValueType.STRING
    path = _damaged(sample, tmp_path / "array.gguf", value=gguf.GGUFValueType.ARRAY, width=1, at=0x34)
    # in a child, so a regression fails this test instead of hanging the whole run
    code = "import sys; from edgedistill.sources.gguf import open_gguf; open_gguf(sys.argv[1])"
    child = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                           preexec_fn=_limited_memory, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert child.returncode != 0 and "EdgedistillError" in child.stderr
    assert "key 0 ('general.architecture') declares an array of" in child.stderr
    assert "at byte 0x34, but only" in child.stderr


@pytest.mark.integration
def test_the_issue_on_a_copy_of_the_real_teacher(tmp_path):
    teacher = builtin_gguf_path(builtin_names()[0])
    check_gguf_header(teacher)
    copy = tmp_path / teacher.name
    shutil.copyfile(teacher, copy)
    _damaged(copy, copy, value=gguf.GGUFValueType.ARRAY, width=1, at=0x34)
    error = _refused(copy, r"key 0 \('general.architecture'\) declares an array of \d+ int32s")
    # what follows the value type (0x34), the array's item type and its count
    assert f"at byte 0x34, but only {copy.stat().st_size - 0x34 - 16} bytes follow" in error.problem


@pytest.mark.integration
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (dict(at=0x38, value=2**64 - 1, width=8), r"key 0 \('general.architecture'\) declares a string of "
                                                  r"18446744073709551615 bytes at byte 0x34"),
        (dict(key="tokenizer.ggml.tokens", part=4, value=2**32, width=8),
         r"key \d+ \('tokenizer.ggml.tokens'\) declares an array of 4294967296 strings \(at least 8 bytes each\)"),
        (dict(key="tokenizer.ggml.tokens", part=7, value=2**40, width=8),
         r"'tokenizer.ggml.tokens'\) item 1 declares a string of 1099511627776 bytes"),
        (dict(key="fuzz.u32_array", part=4, value=2**62, width=8),
         r"'fuzz.u32_array'\) declares an array of 4611686018427387904 uint32s \(4 bytes each\)"),
        (dict(at=0x10, value=2**64 - 1, width=8), r"the header declares 18446744073709551615 key-value pairs"),
        (dict(at=0x8, value=2**40, width=8), r"and 1099511627776 tensors .* at byte 0x8"),
        (dict(at=0x34, value=13), r"key 0 \('general.architecture'\) has value type 13 at byte 0x34, which is "
                                  r"not a GGUF value type"),
        (dict(key="fuzz.u32_array", part=3, value=99), r"declares an array of type 99"),
        (dict(tensor=0, part=2, value=200), r"tensor 0 \('token_embd.weight'\) declares 200 dimensions"),
        (dict(tensor=1, part=4, value=200), r"tensor 1 \('output_norm.weight'\) has tensor type 200"),
        (dict(tensor=2, part=5, value=2**40, width=8), r"tensor 2 \('output.weight'\)'s data ends at byte"),
        (dict(at=0x4, value=7), r"GGUF version at byte 0x4 is 7"),
    ],
    ids=["string-length", "string-array-count", "string-in-array", "u32-array-count", "kv-count", "tensor-count",
         "unknown-value-type", "unknown-item-type", "n-dims-200", "unknown-tensor-type", "data-past-the-end",
         "version"],
)
def test_damaged_header_fields_are_refused_naming_the_byte(sample, tmp_path, damage, match):
    _refused(_damaged(sample, tmp_path / "damaged.gguf", **damage), match)


@pytest.mark.integration
def test_alignment_that_is_not_a_power_of_two_is_refused(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "aligned.gguf", arch="llama")
    writer.add_custom_alignment(64)
    writer.add_tensor("t", np.ones((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = tmp_path / "aligned.gguf"
    assert read_gguf(path).alignment == 64
    reader = gguf.GGUFReader(path)
    at = _offset(reader, reader.get_field("general.alignment").parts[3])
    _refused(_damaged(path, tmp_path / "damaged.gguf", at=at, value=48), "is not a uint32 power of two")


@pytest.mark.integration
@pytest.mark.parametrize("cut", [0x1F, 0x100, "header/2", "header-1", "data"])
def test_truncated_files_are_refused(sample, tmp_path, cut):
    header_bytes = gguf.GGUFReader(sample).data_offset
    # the last tensor is padded to 32 bytes: 64 off the end cuts into its data
    sizes = {"header/2": header_bytes // 2, "header-1": header_bytes - 1, "data": sample.stat().st_size - 64}
    size = sizes.get(cut, cut)
    path = tmp_path / "cut.gguf"
    path.write_bytes(sample.read_bytes()[:size])
    _refused(path, "truncated")


@pytest.mark.integration
def test_damaged_values_are_refused_when_the_tokenizer_is_read(sample, tmp_path):
    reader = gguf.GGUFReader(sample)
    first_token = _offset(reader, reader.get_field("tokenizer.ggml.tokens").parts[6])
    path = _damaged(sample, tmp_path / "utf8.gguf", at=first_token, value=0xFF, width=1)
    open_gguf(path)  # the header is whole; the token is not text
    with pytest.raises(EdgedistillError, match="tokenizer.ggml.tokens is not valid UTF-8"):
        read_tokenizer_metadata(path)
    path = _damaged(sample, tmp_path / "float.gguf", key="tokenizer.ggml.bos_token_id", part=2,
                    value=gguf.GGUFValueType.FLOAT32)
    with pytest.raises(EdgedistillError, match="bos_token_id holds float, where llama.cpp expects integer"):
        read_tokenizer_metadata(path)


@pytest.mark.integration
def test_a_valid_file_reads_as_gguf_py_reads_it(sample):
    check_gguf_header(sample)
    meta = read_tokenizer_metadata(sample)
    reader = gguf.GGUFReader(sample)
    assert meta.tokens == reader.get_field("tokenizer.ggml.tokens").contents() and len(meta.tokens) == 459
    assert meta.merges == reader.get_field("tokenizer.ggml.merges").contents()
    assert meta.token_types == reader.get_field("tokenizer.ggml.token_type").contents()
    assert (meta.model, meta.pre, meta.bos_token_id, meta.eos_token_id, meta.pad_token_id) == ("gpt2", "smollm", 1, 2, 0)
    assert (meta.add_bos, meta.add_eos, meta.context_length) == (False, False, 2048)
    assert [t.name for t in open_gguf(sample).tensors] == ["token_embd.weight", "output_norm.weight", "output.weight"]


@pytest.mark.integration
@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_nested_arrays_and_big_endian_files_pass(tmp_path, endianess):
    path = tmp_path / "nested.gguf"
    writer = gguf.GGUFWriter(path, arch="llama", endianess=endianess)
    writer.add_array("x.nested", [[1, 2], [3]])
    writer.add_array("x.strings", ["a", "bc"])
    writer.add_tensor("t", np.ones((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = read_gguf(path)
    assert reader.get_field("x.nested").contents() == [1, 2, 3]
    assert reader.get_field("x.strings").contents() == ["a", "bc"]


@pytest.mark.integration
def test_gguf_py_failures_the_check_does_not_foresee_still_read_clearly(sample, monkeypatch):
    def broken(path):
        raise IndexError("index 0 is out of bounds for axis 0 with size 0")

    monkeypatch.setattr(gguf, "GGUFReader", broken)
    with pytest.raises(EdgedistillError, match="damaged or truncated GGUF file .*out of bounds") as error:
        read_gguf(sample)
    assert "again" in error.value.hint


@pytest.mark.integration
def test_imatrix_files_go_through_the_same_check(sample, tmp_path):
    path = _damaged(sample, tmp_path / "imatrix.gguf", value=gguf.GGUFValueType.ARRAY, width=1, at=0x34)
    with pytest.raises(EdgedistillError, match="not a GGUF imatrix file: .* declares an array of"):
        read_imatrix(path)


@pytest.mark.integration
def test_the_fuzzer_finds_no_hang_traceback_or_runaway_memory(tmp_path):
    out = tmp_path / "fuzz.json"
    subprocess.run([sys.executable, str(FUZZER), "--cases", "150", "--seed", "1", "--out", str(out)],
                   check=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["cases"] == 150 and report["counts"]["clear"] > 100
    assert {k: report["counts"][k] for k in fuzz_gguf.BAD_OUTCOMES} == dict.fromkeys(fuzz_gguf.BAD_OUTCOMES, 0)
    assert report["outside_writes"] == 0
