"""Malformed and hostile bundles (issue 13, item 8): each gets an EdgedistillError naming the fault,
before anything is written where possible, and a failed extract leaves the target as it was.

    .venv/bin/python -m pytest -q tests/test_faults_bundle.py

The bundles are written here with tarfile in the format of `make_bundle` (a folder named after the
bundle, manifest.json last); tools/fuzz_bundle.py mutates one at random, and the last test runs it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import namedtuple
from pathlib import Path

import pytest

from edgedistill import bundle_verify
from edgedistill.bundle import make_bundle, verify_bundle
from edgedistill.errors import EdgedistillError
from edgedistill.pipeline import Stage, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny-student"
FILES = {"student.gguf": b"GGUF" + bytes(range(256)) * 8, "tokenizer.json": b'{"model": {"type": "BPE"}}',
         "student-int4/model.onnx": b"onnx graph"}

pytestmark = pytest.mark.integration  # every test writes a bundle file


class _Zeros(io.RawIOBase):
    """`size` zero bytes, streamed, for tarfile.addfile."""

    def __init__(self, size: int):
        self.left = size

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


def manifest_of(files: dict[str, bytes], **fields) -> dict:
    entries = {path: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for path, data in files.items()}
    return {"format": "edgedistill-bundle", "format_version": 1, "name": NAME, "run": "tiny",
            "artifacts": ["student.gguf"], "files": entries, **fields}


def write_bundle(out: Path, files: dict[str, bytes] = FILES, manifest: bytes | dict | list | None = None) -> Path:
    """A bundle of `files` with their manifest, or with `manifest` (JSON-encoded unless bytes) instead."""
    if manifest is None:
        manifest = manifest_of(files)
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    with tarfile.open(out, "w:gz") as tar:
        for path, content in {**files, "manifest.json": data}.items():
            info = tarfile.TarInfo(f"{NAME}/{path}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out


def test_a_manifest_listing_a_big_file_of_zeros_is_refused_by_the_ratio_cap(tmp_path):
    size = 64 << 20  # the issue's bundle had 1 GiB: same ratio (zeros compress ~1000x), quicker
    out = tmp_path / "bomb.tar.gz"
    zeros_sha256 = hashlib.sha256(bytes(size)).hexdigest()
    manifest = manifest_of({})
    manifest["files"]["zeros.gguf"] = {"bytes": size, "sha256": zeros_sha256}
    with tarfile.open(out, "w:gz") as tar:
        info = tarfile.TarInfo(f"{NAME}/zeros.gguf")
        info.size = size
        tar.addfile(info, _Zeros(size))
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo(f"{NAME}/manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "deploy"
    for extract_to in (None, target):
        with pytest.raises(EdgedistillError, match=r"64.0 MiB of files in .* beyond the 200x limit") as error:
            verify_bundle(out, extract_to=extract_to)
        assert "compression bomb" in error.value.hint
    with pytest.raises(EdgedistillError, match=r"beyond the 100x limit"):
        verify_bundle(out, extract_to=target, max_ratio=100)
    with pytest.raises(EdgedistillError, match=r"zeros.gguf declares 67108864 bytes .* over the 32.0 MiB limit"):
        verify_bundle(out, extract_to=target, max_bytes=32 << 20, max_ratio=10_000)
    assert not target.exists()
    # only the caps refused it: with them lifted the bundle is sound
    assert verify_bundle(out, max_ratio=10_000)["bytes"] == size


def test_too_little_free_space_is_refused_before_extracting(tmp_path, monkeypatch):
    # a mock: filling a real disk is not possible here, so the filesystem reports 10 MiB free
    out = write_bundle(tmp_path / "b.tar.gz")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bundle_verify.shutil, "disk_usage", lambda path: usage(100 << 20, 90 << 20, 10 << 20))
    target = tmp_path / "deploy" / "nested"
    with pytest.raises(EdgedistillError, match=r"has 10.0 MiB free; extracting .* needs 64.\d MiB") as error:
        verify_bundle(out, extract_to=target)
    assert "free some space" in error.value.hint
    assert not (tmp_path / "deploy").exists()
    assert verify_bundle(out)["files"] == len(FILES)  # verifying writes nothing: no space needed


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_tar_header_declaring_100_gb_is_refused_before_its_data_is_read(tmp_path, tar_format):
    info = tarfile.TarInfo(f"{NAME}/huge.gguf")
    info.size = 100 * 2**30
    out = tmp_path / "huge.tar.gz"
    out.write_bytes(gzip.compress(info.tobuf(tar_format) + b"only a few bytes"))
    with pytest.raises(EdgedistillError, match=r"huge.gguf declares 107374182400 bytes \(100.0 GiB\), over the "
                                               r"64.0 GiB limit"):
        verify_bundle(out, extract_to=tmp_path / "deploy")
    assert not (tmp_path / "deploy").exists()


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_bundle_is_damaged_and_nothing_is_left(tmp_path, cut):
    files = {**FILES, "weights.bin": hashlib.sha256(b"seed").digest() * 4096}  # 128 KiB that do not compress
    whole = write_bundle(tmp_path / "whole.tar.gz", files).read_bytes()
    out = tmp_path / "cut.tar.gz"
    out.write_bytes(whole[: int(len(whole) * cut)])
    for extract_to in (None, tmp_path / "deploy"):
        with pytest.raises(EdgedistillError, match=r"cut.tar.gz is truncated or damaged") as error:
            verify_bundle(out, extract_to=extract_to)
        assert "copy it again" in error.value.hint
    assert not (tmp_path / "deploy").exists()


@pytest.mark.parametrize("manifest, message", [
    (b'{"format": "edgedistill-bundle", "files": {', r"manifest.json is not valid JSON"),
    (b"\xff\xfe not text", r"manifest.json is not valid JSON"),
    (b"[" * 100_000, r"manifest.json is not valid JSON"),
    ([], r"manifest.json is a JSON list, not an object"),
    ({**manifest_of(FILES), "files": [{"path": "student.gguf"}]}, r"files is .*, not an object"),
    ({**manifest_of(FILES), "format_version": "1"}, r"format_version is '1', this edgedistill reads 1"),
    ({**manifest_of(FILES), "format": None}, r"format is None, not 'edgedistill-bundle'"),
    ({**manifest_of(FILES), "name": "other"}, r"name is 'other', the archive's folder is 'tiny-student'"),
    ({**manifest_of(FILES), "artifacts": "student.gguf"}, r"artifacts is student.gguf, not a list of names"),
])
def test_a_malformed_manifest_names_its_fault(tmp_path, manifest, message):
    out = write_bundle(tmp_path / "b.tar.gz", manifest=manifest)
    with pytest.raises(EdgedistillError, match=message) as error:
        verify_bundle(out, extract_to=tmp_path / "deploy")
    assert "edgedistill bundle" in error.value.hint
    assert not (tmp_path / "deploy").exists()


def _entry_edit(edit):
    manifest = manifest_of(FILES)
    edit(manifest["files"]["student.gguf"])
    return manifest


@pytest.mark.parametrize("manifest, message", [
    (_entry_edit(lambda entry: entry.pop("sha256")), r"files\['student.gguf'\].sha256 is missing\n"),
    (_entry_edit(lambda entry: entry.update(sha256="AB" * 32)), r"sha256 is ABAB.*, not 64 lowercase hex"),
    (_entry_edit(lambda entry: entry.pop("bytes")), r"files\['student.gguf'\].bytes is missing\n"),
    (_entry_edit(lambda entry: entry.update(bytes=-1)), r"bytes is -1, not a whole number"),
    (_entry_edit(lambda entry: entry.update(bytes=True)), r"bytes is True, not a whole number"),
    (_entry_edit(lambda entry: entry.update(bytes=2**70)), r"student.gguf has 2052 bytes, the manifest says 1180591"),
    (_entry_edit(lambda entry: entry.update(sha256="0" * 64)), r"student.gguf does not match its sha256"),
    ({**manifest_of(FILES), "files": {**manifest_of(FILES)["files"], "../evil": {"bytes": 1, "sha256": "0" * 64}}},
     r"files\['../evil'\]: the path escapes the target folder"),
    ({**manifest_of(FILES), "files": {**manifest_of(FILES)["files"], "student.gguf/x": {"bytes": 1,
                                                                                          "sha256": "0" * 64}}},
     r"files\['student.gguf/x'\]: the path clashes with another file's"),
    ({**manifest_of(FILES), "files": {**manifest_of(FILES)["files"], "extra.txt": {"bytes": 1, "sha256": "0" * 64}}},
     r"extra.txt is in the manifest but missing"),
])
def test_a_bad_manifest_entry_names_the_field(tmp_path, manifest, message):
    out = write_bundle(tmp_path / "b.tar.gz", manifest=manifest)
    with pytest.raises(EdgedistillError, match=message):
        verify_bundle(out, extract_to=tmp_path / "deploy")
    assert not (tmp_path / "deploy").exists()


def test_a_failed_extract_leaves_the_target_as_it_was(tmp_path):
    # the last file's hash is wrong: every other file has been written by then
    files = {**FILES, "zz-last.bin": b"last"}
    manifest = manifest_of(files)
    manifest["files"]["zz-last.bin"]["sha256"] = "0" * 64
    out = write_bundle(tmp_path / "b.tar.gz", files, manifest)
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "keep.txt").write_text("mine")
    with pytest.raises(EdgedistillError, match="zz-last.bin does not match its sha256"):
        verify_bundle(out, extract_to=deploy)
    assert [path.name for path in deploy.iterdir()] == ["keep.txt"]
    with pytest.raises(EdgedistillError, match="zz-last.bin does not match its sha256"):
        verify_bundle(out, extract_to=tmp_path / "new" / "deploy")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b.tar.gz", "deploy"]

    good = write_bundle(tmp_path / "good.tar.gz", files)
    summary = verify_bundle(good, extract_to=deploy)
    assert sorted(path.name for path in deploy.iterdir()) == ["keep.txt", NAME]
    extracted = {path.relative_to(deploy / NAME).as_posix(): path.read_bytes()
                 for path in (deploy / NAME).rglob("*") if path.is_file()}
    assert extracted == {**files, "manifest.json": json.dumps(manifest_of(files)).encode()}
    assert summary["extracted_to"] == str(deploy / NAME)


def _finished_run(root: Path) -> Path:
    """A run folder whose export and distill stages have manifests from the pipeline's own writer."""
    run = root / "runs" / "tiny"
    export, distill = run / "export", run / "distill"
    for folder in (export, distill):
        folder.mkdir(parents=True)
    (export / "student-q4_k_m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    (distill / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}))
    (distill / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (distill / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    result = {"Q4_K_M": {"file": "student-q4_k_m.gguf", "verification": {"passed": True}}}
    for folder, extra in ((export, result), (distill, None)):
        write_manifest(folder, Stage(folder.name, fn=lambda *args: None), "key", {"name": "tiny"}, {}, 1.0, extra)
    return run


@pytest.mark.parametrize("changed", ["export/student-q4_k_m.gguf", "distill/tokenizer.json",
                                     "distill/chat_template.jinja"])
def test_a_file_changed_since_its_stage_wrote_it_is_not_bundled(tmp_path, changed):
    # issue 13, item 10: a run checks a finished stage's sizes only, so a same-size corruption
    # would reach the bundle with a fresh, matching hash
    run = _finished_run(tmp_path)
    assert verify_bundle(make_bundle(run, tmp_path / "before.tar.gz")["file"])["files"] == 6
    path = run / changed
    stage = path.parent.name
    recorded = read_manifest(path.parent)["files"][path.name]["sha256"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    now = hashlib.sha256(data).hexdigest()
    out = tmp_path / "dist" / "tiny-student.tar.gz"
    with pytest.raises(EdgedistillError) as error:
        make_bundle(run, out)
    assert error.value.problem == (f"{path} changed since the {stage} stage wrote it (sha256 {recorded[:12]}... "
                                   f"in its manifest, {now[:12]}... now)")
    assert error.value.hint == (f"run `edgedistill run RECIPE --out {run} --verify` to redo the stages whose files "
                                "changed, then bundle again")
    assert list(out.parent.iterdir()) == []  # no archive, no partial one


def test_the_fuzzer_finds_no_traceback_hang_leftover_or_outside_write(tmp_path):
    report = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_bundle.py"), "--cases", "150", "--seed", "1",
                          "--out", str(report)], capture_output=True, text=True, timeout=300)
    result = json.loads(report.read_text())
    assert run.returncode == 0, run.stdout + run.stderr
    counts = result["counts"]
    assert result["cases"] == 150 and counts["ok"] + counts["clear"] == 150, result["examples"]
    assert counts["ok"] > 0 and counts["clear"] > 0
    for outcome in ("raw_traceback", "hang", "rss_over", "crash", "failed_check"):
        assert counts[outcome] == 0, result["examples"]
    assert result["outside_writes"] == 0, result["examples"]["outside_writes"]
