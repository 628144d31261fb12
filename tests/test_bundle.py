"""The deployable bundle: contents, manifest hashes, and the refusals of `verify_bundle`.

    .venv/bin/python -m pytest -q tests/test_bundle.py
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from edgedistill.bundle import make_bundle, verify_bundle
from edgedistill.errors import EdgedistillError

pytestmark = pytest.mark.unit

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _verification(passed: bool) -> dict:
    return {"file_type": "x", "top1_agreement": 0.9, "passed": passed}


def _fake_run(root: Path, *, onnx: bool = False) -> Path:
    """A run folder by hand: a few bytes stand in for each model file."""
    run = root / "runs" / "tiny"
    export = run / "export"
    export.mkdir(parents=True)
    (export / "student-f16.gguf").write_bytes(b"GGUF" + b"\0" * 400)
    (export / "student-q8_0.gguf").write_bytes(b"GGUF" + b"\1" * 200)
    (export / "student-q4_k_m.gguf").write_bytes(b"GGUF" + b"\2" * 100)
    _write_json(export / "manifest.json", {"stage": "export", "config": {"name": "tiny"}, "result": {
        "F16": {"file": "student-f16.gguf", "bytes": 404, "verification": _verification(True)},
        "Q8_0": {"file": "student-q8_0.gguf", "bytes": 204, "verification": _verification(True)},
        "Q4_K_M": {"file": "student-q4_k_m.gguf", "bytes": 104, "verification": _verification(True)}}})
    distill = run / "distill"
    _write_json(distill / "tokenizer.json", {"model": {"type": "BPE"}})
    _write_json(distill / "tokenizer_config.json", {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"})
    _write_json(distill / "special_tokens_map.json", {"eos_token": "<|im_end|>"})
    (distill / "model.safetensors").write_bytes(b"not bundled")
    _write_json(run / "teacher" / "manifest.json", {"config": {"teacher": {"source": "smollm2-135m-instruct"}}})
    _write_json(run / "generate" / "manifest.json",
                {"config": {"task": {"kind": "classification"}, "data": {"prompts": "data/tiny.jsonl"}},
                 "result": {"train_examples": 3}})
    (run / "generate" / "train.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n')
    _write_json(run / "eval" / "eval.json", {
        "reference": {"artifact": "teacher/", "examples": 4, "task_score": 0.75},
        "artifacts": [{"artifact": "student-q4_k_m.gguf", "task_score": 0.5, "share_of_reference": 0.667},
                      {"artifact": "student-int4/", "task_score": 0.25, "share_of_reference": 0.333}]})
    _write_json(run / "bench" / "bench.json", [
        {"artifact": "student-q4_k_m.gguf", "file_mb": 0.0, "decode_tokens_per_s": 123.4,
         "prefill_tokens_per_s": 999.0, "ttft_ms": 5.0, "peak_rss_mb": 10.0, "threads": 2}])
    if onnx:
        folder = run / "export_onnx" / "student-int4"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"onnx graph")
        (folder / "model.onnx.data").write_bytes(b"onnx weights")
        _write_json(folder / "genai_config.json", {"model": {"type": "llama"}})
        _write_json(folder / "onnx_export.json", {"format": "onnx", "precision": "int4"})
    return run


def _members(file: Path) -> dict[str, bytes]:
    with tarfile.open(file) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _rewrite(file: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> None:
    with tarfile.open(file, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)


def test_bundle_holds_the_chosen_files_and_a_matching_manifest(tmp_path):
    run = _fake_run(tmp_path)
    out = tmp_path / "tiny-student.tar.gz"
    result = make_bundle(run, out)

    members = _members(out)
    expected = {"student-q4_k_m.gguf", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "README.md", "Modelfile", "manifest.json"}
    assert set(members) == {f"tiny-student/{name}" for name in expected}
    manifest = json.loads(members["tiny-student/manifest.json"])
    assert manifest == {key: value for key, value in result.items() if key not in ("file", "bytes")}
    assert manifest["run"] == "tiny" and manifest["artifacts"] == ["student-q4_k_m.gguf"]
    assert manifest["edgedistill_version"]
    assert set(manifest["files"]) == expected - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = members[f"tiny-student/{name}"]
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert members["tiny-student/student-q4_k_m.gguf"] == (run / "export" / "student-q4_k_m.gguf").read_bytes()
    assert members["tiny-student/chat_template.jinja"].decode() == CHAT_TEMPLATE

    modelfile = members["tiny-student/Modelfile"].decode()
    assert "FROM ./student-q4_k_m.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    card = members["tiny-student/README.md"].decode()
    for fact in ("smollm2-135m-instruct", "3 training examples", "data/tiny.jsonl", "123.4", "0.500", "0.667",
                 "0.750", "llama-cli -m student-q4_k_m.gguf", "ollama create tiny-student -f Modelfile"):
        assert fact in card
    assert not list(tmp_path.glob(".*.tmp"))


def test_named_artifacts_and_onnx_folders(tmp_path):
    run = _fake_run(tmp_path, onnx=True)
    default = make_bundle(run, tmp_path / "a.tar.gz")
    assert default["artifacts"] == ["student-q4_k_m.gguf", "student-int4/"]
    assert {"student-int4/model.onnx", "student-int4/model.onnx.data", "student-int4/genai_config.json",
            "student-int4/onnx_export.json"} <= set(default["files"])
    assert "og.Model(\"student-int4\")" in _members(tmp_path / "a.tar.gz")["a/README.md"].decode()

    both = make_bundle(run, tmp_path / "b.tar.gz", artifacts=["student-q8_0.gguf", "student-f16.gguf"])
    assert both["artifacts"] == ["student-q8_0.gguf", "student-f16.gguf"]
    assert {"Modelfile.student-q8_0", "Modelfile.student-f16"} <= set(both["files"])
    assert verify_bundle(tmp_path / "b.tar.gz")["files"] == len(both["files"])

    with pytest.raises(EdgedistillError, match="student-q2_k.gguf") as error:
        make_bundle(run, tmp_path / "c.tar.gz", artifacts=["student-q2_k.gguf"])
    assert "student-q4_k_m.gguf" in error.value.hint and "student-int4/" in error.value.hint
    assert not (tmp_path / "c.tar.gz").exists()


def test_verify_passes_and_extracts(tmp_path):
    out = tmp_path / "tiny-student.tar.gz"
    made = make_bundle(_fake_run(tmp_path), out)
    summary = verify_bundle(out, extract_to=tmp_path / "deploy")
    assert summary["name"] == "tiny-student" and summary["files"] == len(made["files"])
    folder = tmp_path / "deploy" / "tiny-student"
    assert summary["extracted_to"] == str(folder)
    assert {path.name for path in folder.iterdir()} == set(made["files"]) | {"manifest.json"}
    for name, entry in made["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
    assert [path.name for path in (tmp_path / "deploy").iterdir()] == ["tiny-student"]


def test_tampered_member_fails_naming_the_file(tmp_path):
    out = tmp_path / "tiny-student.tar.gz"
    make_bundle(_fake_run(tmp_path), out)
    members = _members(out)
    gguf = bytearray(members["tiny-student/student-q4_k_m.gguf"])
    gguf[10] ^= 0xFF
    members["tiny-student/student-q4_k_m.gguf"] = bytes(gguf)
    _rewrite(out, members)
    with pytest.raises(EdgedistillError, match="student-q4_k_m.gguf does not match its sha256"):
        verify_bundle(out, extract_to=tmp_path / "deploy")
    assert not (tmp_path / "deploy").exists()

    members.pop("tiny-student/Modelfile")
    _rewrite(out, {**members, "tiny-student/extra.txt": b"hi"})
    with pytest.raises(EdgedistillError, match="extra.txt is not in the manifest"):
        verify_bundle(out)


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


@pytest.mark.parametrize("bad, message", [
    (_file("tiny-student/../evil"), "escapes the target folder"),
    (_file("/tmp/evil"), "escapes the target folder"),
    (_link("tiny-student/link", tarfile.SYMTYPE, "/etc/passwd"), "link or special file"),
    (_link("tiny-student/hard", tarfile.LNKTYPE, "tiny-student/README.md"), "link or special file"),
    (_link("tiny-student/tty", tarfile.CHRTYPE, ""), "link or special file"),
])
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, bad, message):
    out = tmp_path / "tiny-student.tar.gz"
    make_bundle(_fake_run(tmp_path), out)
    _rewrite(out, _members(out), extra=[bad])
    target = tmp_path / "deploy"
    with pytest.raises(EdgedistillError, match=message):
        verify_bundle(out, extract_to=target)
    assert not target.exists()
    assert not (tmp_path / "evil").exists()


def test_existing_out_file_needs_overwrite(tmp_path):
    run = _fake_run(tmp_path)
    out = tmp_path / "tiny-student.tar.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(EdgedistillError, match="already exists"):
        make_bundle(run, out)
    assert out.read_bytes() == b"keep me"
    make_bundle(run, out, overwrite=True)
    assert verify_bundle(out)["run"] == "tiny"


def test_missing_or_incomplete_run_folder(tmp_path):
    with pytest.raises(EdgedistillError, match="does not exist"):
        make_bundle(tmp_path / "nope", tmp_path / "x.tar.gz")
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    with pytest.raises(EdgedistillError, match="no finished export stage") as error:
        make_bundle(tmp_path / "runs" / "empty", tmp_path / "x.tar.gz")
    assert "edgedistill run" in error.value.hint
    assert not (tmp_path / "x.tar.gz").exists()
