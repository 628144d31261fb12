"""One runtime interface (generate, stream, score) over PyTorch, llama.cpp and ONNX Runtime, and
eval's perplexity, KL to the reference and top-1 agreement computed the same way in all three.

The tiny random llama of tests/conftest.py (2 layers, width 64, its own byte-level BPE), written as
an HF folder, an F16 GGUF and an fp32 ONNX export; weights are float16-exact, so the three differ
only by the runtimes' arithmetic.

    .venv/bin/python -m pytest -q tests/test_eval_metrics.py
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tokenizer_corpus
from transformers import PreTrainedTokenizerFast

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.task import evaluate
from edgedistill.export.gguf import write_gguf
from edgedistill.export.onnx import OnnxExportOptions, export_onnx
from edgedistill.runtimes import ChatModel, Runtime, open_chat_model, open_runtime

pytestmark = pytest.mark.integration

pytest.importorskip("llama_cpp")

CHAT = [{"role": "user", "content": "ka lo mi ne tu"}]
SCORE_RECORDS = 4


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama_dir, tiny_llama_untied_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    hf = root / "model"  # the report names artifacts after their folders
    shutil.copytree(tiny_llama_dir, hf)
    export_onnx(hf, root / "model-fp32", OnnxExportOptions("fp32"))
    other = tiny_llama_untied_dir  # the same tokenizer, but 512 output rows: other token ids to compare
    return {"hf": hf, "gguf": write_gguf(hf, root / "model-f16.gguf"), "onnx": root / "model-fp32", "padded": other}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    rows = [{"id": i, "messages": [{"role": "user", "content": line}], "label": "positive",
             "choices": ["positive", "negative"]} for i, line in enumerate(tokenizer_corpus()[:6])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def runtimes(artifacts) -> dict[str, Runtime]:
    return {kind: open_runtime(artifacts[kind]) for kind in ("hf", "gguf", "onnx")}


@pytest.fixture(scope="module")
def report(artifacts, heldout) -> tuple[dict, str]:
    """`edgedistill eval` of the three forms of the model against the HF folder; (eval.json, stdout)."""
    out = heldout.parent / "eval.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["eval", str(artifacts["hf"]), str(artifacts["gguf"]), str(artifacts["onnx"]), "--data",
                     str(heldout), "--reference", str(artifacts["hf"]), "--max-new-tokens", "6",
                     "--score-records", str(SCORE_RECORDS), "--json", str(out)]) == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_every_runtime_has_the_interface(runtimes):
    assert ChatModel is Runtime and open_chat_model is open_runtime
    for runtime in runtimes.values():
        for method in ("generate", "stream", "score", "prompt_ids", "is_end"):
            assert callable(getattr(runtime, method)), (runtime, method)
    assert len({runtime.vocab_size for runtime in runtimes.values()}) == 1


def test_score_agrees_across_runtimes(runtimes):
    ids = runtimes["hf"].prompt_ids(CHAT) + [40, 41, 42, 100, 7]
    scores = {kind: runtime.score(ids) for kind, runtime in runtimes.items()}
    torch_lp = scores["hf"]
    for kind, logprobs in scores.items():
        assert logprobs.dtype == np.float32 and logprobs.shape == (len(ids), runtimes[kind].vocab_size), kind
        np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-4)
        assert (logprobs.argmax(-1) == torch_lp.argmax(-1)).mean() >= 0.9, kind
        assert np.abs(logprobs - torch_lp).max() < 0.05, kind
        # the last positions alone are the same rows
        np.testing.assert_allclose(runtimes[kind].score(ids, last=3), logprobs[-3:], atol=1e-3)


def test_stream_joins_to_the_generated_answer(runtimes):
    for kind, runtime in runtimes.items():
        [(answer, finished)] = runtime.generate([CHAT], max_new_tokens=8)
        assert "".join(runtime.stream(CHAT, max_new_tokens=8)).strip() == answer, kind
        assert isinstance(finished, bool)


def test_model_scored_against_itself(report):
    evaluation, _ = report
    ref, row = evaluation["reference"], evaluation["artifacts"][0]
    assert evaluation["scored_records"] == SCORE_RECORDS and "assistant turn" in evaluation["scored_text"]
    assert ref["scored_tokens"] == row["scored_tokens"] > SCORE_RECORDS  # the answers, and each turn's end
    assert row["kl_to_reference"] == pytest.approx(0, abs=1e-6)
    assert row["top1_agreement"] == 1.0 and row["perplexity_ratio"] == 1.0
    assert row["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
    assert row["task_score"] == ref["task_score"] and row["share_of_reference"] in (1.0, None)


def test_gguf_and_onnx_exports_score_like_their_model(report):
    evaluation, printed = report
    for row in evaluation["artifacts"][1:]:
        assert row["kl_to_reference"] < 1e-3, row["artifact"]
        low, high = row["kl_to_reference_interval"]
        assert low <= row["kl_to_reference"] <= high, row["artifact"]
        assert row["top1_agreement"] >= 0.95, row["artifact"]
        assert row["perplexity_ratio"] == pytest.approx(1.0, abs=0.01), row["artifact"]
        assert row["scored_tokens"] == evaluation["reference"]["scored_tokens"]
        assert {"perplexity", "task_score", "answers"} <= row.keys()
    assert [row["artifact"] for row in evaluation["artifacts"]] == ["model/", "model-f16.gguf", "model-fp32/"]
    assert printed.count("KL ") == 3 and printed.count("top-1 ") == 3 and "perplexity" in printed.splitlines()[0]


def test_vocabulary_mismatch_is_refused_before_work(artifacts, heldout):
    with pytest.raises(EdgedistillError, match="tokenizer mismatch") as err:
        evaluate([artifacts["padded"]], heldout, artifacts["hf"], max_new_tokens=2, score_records=1)
    assert "512" in str(err.value) and "--reference" in err.value.hint and "--score-records 0" in err.value.hint
    # without scoring, the task score alone is reported
    report = evaluate([artifacts["padded"]], heldout, artifacts["hf"], max_new_tokens=2, score_records=0).to_dict()
    assert "perplexity" not in report["artifacts"][0] and "scored_records" not in report


def test_same_size_vocabulary_with_other_ids_is_refused(artifacts, heldout, tmp_path):
    """Same weights and vocabulary size, but two tokens of the held-out text swap ids: a tokenizer mismatch."""
    shuffled = tmp_path / "shuffled"
    shutil.copytree(artifacts["hf"], shuffled)
    first = json.loads(heldout.read_text().splitlines()[0])["messages"][0]["content"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(shuffled)
    a, b = list(dict.fromkeys(tokenizer(first, add_special_tokens=False)["input_ids"]))[:2]
    spec = json.loads((shuffled / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    token_a, token_b = (next(t for t, i in vocab.items() if i == wanted) for wanted in (a, b))
    vocab[token_a], vocab[token_b] = b, a
    (shuffled / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(EdgedistillError, match="tokenizer \\(or chat template\\) mismatch") as err:
        evaluate([shuffled], heldout, artifacts["hf"], max_new_tokens=2, score_records=2)
    assert "--reference" in err.value.hint


def test_eval_runs_hf_folders_in_the_asked_dtype_and_gguf_as_stored(artifacts, heldout):
    # bf16 applies to the HF reference and HF artifacts; the GGUF beside them runs as stored
    report = evaluate([artifacts["hf"], artifacts["gguf"]], heldout, artifacts["hf"], max_new_tokens=2,
                      score_records=2, dtype="bf16").to_dict()
    assert (report["device"], report["dtype"]) == ("cpu", "bf16")
    hf_row, gguf_row = report["artifacts"]
    assert hf_row["kl_to_reference"] < 1e-6 and gguf_row["top1_agreement"] > 0.5
    if not torch.cuda.is_available():
        with pytest.raises(EdgedistillError, match="cuda"):
            evaluate([artifacts["gguf"]], heldout, artifacts["hf"], max_new_tokens=2, device="cuda")


def test_devices_and_dtypes(artifacts, runtimes):
    ids = runtimes["hf"].prompt_ids(CHAT)
    bf16 = open_runtime(artifacts["hf"], dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16 and bf16.score(ids).dtype == np.float32
    with pytest.raises(EdgedistillError, match="device and dtype choose how PyTorch runs an HF folder"):
        open_runtime(artifacts["gguf"], dtype="fp16")
    with pytest.raises(EdgedistillError, match="unknown device"):
        open_runtime(artifacts["hf"], device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EdgedistillError, match="device 'cuda'.*torch"):
            open_runtime(artifacts["hf"], device="cuda")
        pytest.skip(f"no CUDA device (torch {torch.__version__}): the CUDA scoring check did not run")
    cuda = open_runtime(artifacts["hf"], device="cuda")
    np.testing.assert_allclose(cuda.score(ids), runtimes["hf"].score(ids), atol=1e-3)
    [(answer, _)] = cuda.generate([CHAT], max_new_tokens=6)
    assert answer == runtimes["hf"].generate([CHAT], max_new_tokens=6)[0][0]
