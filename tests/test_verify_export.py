"""The export check: a GGUF in llama.cpp against its HF model in PyTorch, within per-type bounds.

The tiny random llama of tests/conftest.py (2 layers, width 64, its own byte-level BPE); its logits
are far from uniform (initializer_range 0.2), so quantization moves them as it does a real model's.

    .venv/bin/python -m pytest -q tests/test_verify_export.py
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import quantize_gguf, verify, write_gguf
from edgedistill.export.gguf.verify import BOUNDS, Bound, verify_gguf, verify_ggufs
from edgedistill.export.stage import export_gguf_set
from edgedistill.export.verify import EVAL_TEXTS

pytestmark = pytest.mark.integration

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def files(model_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    f16 = write_gguf(model_dir, out / "tiny-f16.gguf")
    return {"F16": f16, **{q: quantize_gguf(f16, out / f"tiny-{q.lower()}.gguf", q) for q in ("Q8_0", "Q4_K_M")}}


@pytest.fixture(scope="module")
def checks(model_dir, files) -> dict[str, dict]:
    return {r["file_type"]: r for r in verify_ggufs(list(files.values()), model_dir)}


@pytest.fixture(scope="module")
def perturbed_f16(model_dir, tmp_path_factory) -> Path:
    """An F16 GGUF of the model with one layer's MLP output nudged: the kind of silent damage
    (a wrong scale, a half-applied update) that no shape check catches."""
    out = tmp_path_factory.mktemp("perturbed")
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    tensors = load_file(out / "model.safetensors")
    weight = tensors["model.layers.1.mlp.down_proj.weight"]
    tensors["model.layers.1.mlp.down_proj.weight"] = weight + 0.5 * weight.std() * torch.randn(
        weight.shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return write_gguf(out, out / "perturbed-f16.gguf")


def test_f16_agrees_with_torch(checks):
    check = checks["F16"]
    assert check["passed"] and check["failures"] == []
    assert check["tokenization_identical"] and check["texts"] == len(EVAL_TEXTS)
    assert check["top1_agreement_with_ties"] >= 0.99
    assert check["greedy_verdict"] == "identical"
    assert all(c["torch"] == c["gguf"] for c in check["greedy"])
    assert check["mean_kl"] < 1e-4
    assert check["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3)


def test_quantized_types_report_ratio_and_kl(checks):
    for qtype in ("Q8_0", "Q4_K_M"):
        check = checks[qtype]
        assert check["passed"], check["failures"]
        assert check["bound"] == asdict(BOUNDS[qtype])
        assert 0 < check["mean_kl"] <= BOUNDS[qtype].max_mean_kl
        assert 0.9 < check["perplexity_ratio"] <= BOUNDS[qtype].max_ppl_ratio
    # Fewer bits, larger divergence: the figures measure quantization, not noise.
    assert checks["F16"]["mean_kl"] < checks["Q8_0"]["mean_kl"] < checks["Q4_K_M"]["mean_kl"]


def test_perturbed_f16_fails_with_the_measured_value_and_bound(model_dir, perturbed_f16):
    with pytest.raises(EdgedistillError) as err:
        verify_gguf(perturbed_f16, model_dir)
    problem = err.value.problem
    assert str(perturbed_f16) in problem and "(F16)" in problem
    assert "top-1 agreement 0." in problem and "< 0.99" in problem
    assert "conversion is wrong" in err.value.hint


def test_a_tighter_bound_fails_and_names_a_higher_precision_type(model_dir, files):
    overrides = {"Q8_0": Bound(max_ppl_ratio=1.5, max_mean_kl=1e-6), "Q4_K_M": None}
    tight, unbounded = verify_ggufs([files["Q8_0"], files["Q4_K_M"]], model_dir, bounds=overrides,
                                    raise_on_failure=False)
    assert not tight["passed"] and tight["failures"] == [f"mean KL {tight['mean_kl']:.4f} > 1e-06"]
    with pytest.raises(EdgedistillError, match=r"tiny-q8_0.gguf \(Q8_0\).*mean KL 0\.\d+ > 1e-06") as err:
        verify.raise_if_failed([tight, unbounded])
    assert "F16 instead of Q8_0" in err.value.hint
    assert unbounded["passed"] and unbounded["bound"] is None


def test_export_stage_records_the_check_and_fails_on_a_missed_bound(model_dir, tmp_path, monkeypatch):
    result = export_gguf_set(model_dir, tmp_path, "student", ["Q8_0"], "tiny-student")
    assert set(result) == {"F16", "Q8_0"}
    for qtype, entry in result.items():
        assert entry["verification"]["file_type"] == qtype and entry["verification"]["passed"]
        json.dumps(entry)  # it goes into manifest.json
    monkeypatch.setitem(BOUNDS, "Q8_0", Bound(max_mean_kl=0.0))
    with pytest.raises(EdgedistillError, match=r"student-q8_0.gguf \(Q8_0\) misses its bound.*mean KL"):
        export_gguf_set(model_dir, tmp_path, "student", ["Q8_0"], "tiny-student")


def test_cli_exit_status_and_json(model_dir, files, perturbed_f16, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("The quick brown fox jumps over the lazy dog.\n\nA second line of plain text, 42 words.\n")
    ok = tmp_path / "ok.json"
    assert main(["verify-export", str(files["F16"]), "--reference", str(model_dir), "--texts", str(texts),
                 "--json", str(ok)]) == 0
    result = json.loads(ok.read_text())
    assert result["passed"] and result["texts"] == 2 and result["file_type"] == "F16"
    assert "tiny-f16.gguf" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    assert main(["verify-export", str(perturbed_f16), "--reference", str(model_dir), "--texts", str(texts),
                 "--json", str(bad)]) == 2
    printed = capsys.readouterr()
    assert "FAIL: top-1 agreement" in printed.out
    assert "misses its bound" in printed.err and "fix:" in printed.err
    assert json.loads(bad.read_text())["passed"] is False
