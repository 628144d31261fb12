"""lm-evaluation-harness through edgedistill's runtimes (edgedistill.evaluate.harness), offline.

The tiny random llama (tests/conftest.py) as an HF folder, its F16 GGUF and its fp32 ONNX export run
the local tasks in tests/fixtures/harness, all reading tiny_task.jsonl: tiny_task (multiple choice,
loglikelihood), tiny_task_gen (generate_until) and tiny_task_ppl (loglikelihood_rolling). The HF
folder's log-likelihoods are checked against transformers directly, the GGUF's and the ONNX export's
against the HF folder's.

    .venv/bin/python -m pytest -q tests/test_harness.py -s      # -s prints the measured agreement
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgedistill.errors import EdgedistillError
from edgedistill.runtimes import open_runtime

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "fixtures" / "harness"
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-evaluation-harness is not installed "
                                   "(pip install 'edgedistill[lm-eval]')")
KINDS = ("hf", "gguf", "onnx")
# |difference| of summed log-probs: of a choice's few tokens (-17 to -103 nats here) and of a whole text's
# (-200 to -380 nats, rolling); the F16 GGUF rounds activations to float16 (measured: 0.012 and 0.053)
TOLERANCE_NATS = {"hf": 1e-3, "gguf": 0.05, "onnx": 2e-3}
ROLLING_TOLERANCE_NATS = {"hf": 1e-3, "gguf": 0.2, "onnx": 2e-3}


@pytest.fixture(scope="module")
def artifacts(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    from edgedistill.export.gguf import write_gguf
    from edgedistill.export.onnx import OnnxExportOptions, export_onnx

    root = tmp_path_factory.mktemp("harness")
    export_onnx(tiny_llama_dir, root / "onnx", OnnxExportOptions("fp32"))
    return {"hf": tiny_llama_dir, "gguf": write_gguf(tiny_llama_dir, root / "f16.gguf"), "onnx": root / "onnx"}


@pytest.fixture(scope="module")
def runs(artifacts) -> dict[str, dict]:
    """run_harness's entry per artifact kind, lm-eval's samples kept."""
    from edgedistill.evaluate.harness import run_harness

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the task YAMLs name their data relative to the repository root
        entries = run_harness([artifacts[kind] for kind in KINDS], ["tiny_task", "tiny_task_gen", "tiny_task_ppl"],
                              include_path=TASKS, log_samples=True)
    return dict(zip(KINDS, entries))


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """(tokenizer, model) of the HF folder in transformers, outside edgedistill's runtimes."""
    return AutoTokenizer.from_pretrained(tiny_llama_dir), AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def transformers_logprob(reference, context_ids: list[int], continuation_ids: list[int]) -> float:
    _, model = reference
    ids = context_ids + continuation_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logprobs[len(context_ids) - 1 + i, token] for i, token in enumerate(continuation_ids)))


def choice_logprobs(entry: dict) -> np.ndarray:
    """[requests] summed log-probs of every choice of every tiny_task question, in lm-eval's order."""
    return np.array([resp[0][0] for sample in entry["samples"]["tiny_task"] for resp in sample["resps"]])


@needs_lm_eval
def test_multiple_choice_loglikelihoods_match_transformers_and_agree_across_runtimes(runs, reference):
    tokenizer, _ = reference
    expected = []
    for sample in runs["hf"]["samples"]["tiny_task"]:
        for context, continuation in sample["arguments"]:
            # lm-eval's split: the whole text tokenized once, the continuation where the context's tokens end
            context_ids = tokenizer.encode(context)
            whole = tokenizer.encode(context + continuation)
            assert whole[:len(context_ids)] == context_ids
            expected.append(transformers_logprob(reference, context_ids, whole[len(context_ids):]))
    assert len(expected) == 32
    hf = choice_logprobs(runs["hf"])
    assert np.abs(hf - expected).max() < TOLERANCE_NATS["hf"]
    for kind in ("gguf", "onnx"):
        got = choice_logprobs(runs[kind])
        print(f"\n{kind} vs hf: max |Δ log-likelihood| {np.abs(got - hf).max():.4g} nats over {len(hf)} "
              f"requests (values {hf.min():.1f} to {hf.max():.1f})")
        assert np.abs(got - hf).max() < TOLERANCE_NATS[kind]
        greedy = [[resp[0][1] for resp in sample["resps"]] for sample in runs[kind]["samples"]["tiny_task"]]
        assert greedy == [[resp[0][1] for resp in sample["resps"]] for sample in runs["hf"]["samples"]["tiny_task"]]
    for kind in KINDS:
        assert runs[kind]["results"]["tiny_task"]["sample_len"] == 8
        assert {row["metric"] for row in runs[kind]["rows"] if row["task"] == "tiny_task"} == {"acc", "acc_norm"}


@needs_lm_eval
def test_rolling_loglikelihood_matches_transformers_and_agrees_across_runtimes(runs, reference):
    tokenizer, _ = reference
    texts = [sample["arguments"][0][0] for sample in runs["hf"]["samples"]["tiny_task_ppl"]]
    # the whole text is predicted, conditioned on the BOS alone
    expected = [transformers_logprob(reference, [tokenizer.bos_token_id], tokenizer.encode(text)) for text in texts]
    values = {kind: np.array([s["resps"][0][0] for s in runs[kind]["samples"]["tiny_task_ppl"]]) for kind in KINDS}
    assert np.abs(values["hf"] - expected).max() < ROLLING_TOLERANCE_NATS["hf"]
    for kind in ("gguf", "onnx"):
        print(f"\n{kind} vs hf, rolling: max |Δ| {np.abs(values[kind] - values['hf']).max():.4g} nats "
              f"(values {values['hf'].min():.1f} to {values['hf'].max():.1f})")
        assert np.abs(values[kind] - values["hf"]).max() < ROLLING_TOLERANCE_NATS[kind]
    assert {row["metric"] for row in runs["hf"]["rows"] if row["task"] == "tiny_task_ppl"} == {
        "word_perplexity", "byte_perplexity", "bits_per_byte"}


@needs_lm_eval
def test_generation_task_is_greedy_alike_in_every_runtime_and_stops_at_until(runs):
    answers = {kind: [s["resps"][0][0] for s in runs[kind]["samples"]["tiny_task_gen"]] for kind in KINDS}
    assert len(answers["hf"]) == 8 and any(answers["hf"])
    assert answers["gguf"] == answers["hf"]
    # the random model emits stray bytes of multi-byte characters, which onnxruntime-genai's tokenizer
    # decodes unlike transformers and llama.cpp (it may drop what follows one): up to the first, alike
    assert [a.split("\ufffd")[0] for a in answers["onnx"]] == [a.split("\ufffd")[0] for a in answers["hf"]]
    assert not any("\n" in answer or "." in answer for answer in answers["hf"])  # the task's until


class CountingRuntime:
    """A runtime that counts the tokens greedy_ids gave: generate_until must stop early."""

    def __init__(self, runtime):
        self.runtime, self.tokens = runtime, 0

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def greedy_ids(self, prompt, max_new_tokens):
        for token in self.runtime.greedy_ids(prompt, max_new_tokens):
            self.tokens += 1
            yield token


def _request(kind: str, arguments: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


@needs_lm_eval
@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_generate_until_stops_at_the_first_until_string_and_at_max_gen_toks(artifacts, kind):
    from edgedistill.evaluate.harness import EdgedistillLM

    runtime = CountingRuntime(open_runtime(artifacts[kind]))
    lm = EdgedistillLM(runtime=runtime)
    context = "Question: What do bees make?\nAnswer:"

    def generate(gen_kwargs: dict) -> tuple[str, int]:
        runtime.tokens = 0
        return lm.generate_until([_request("generate_until", (context, gen_kwargs))], disable_tqdm=True)[0], runtime.tokens

    free, free_tokens = generate({"until": [], "max_gen_toks": 16})
    assert free_tokens == 16  # the random model never says its end token this soon
    # a stop string from the middle of the free answer, in plain letters (no half-decoded character)
    start = next(i for i in range(len(free) // 3, len(free) - 1) if free[i:i + 2].isascii() and free[i:i + 2].isalpha())
    stop = free[start:start + 2]
    cut, cut_tokens = generate({"until": ["never said", stop], "max_gen_toks": 16})
    assert cut == free[:free.index(stop)]
    assert cut_tokens < free_tokens
    assert generate({"until": [], "max_gen_toks": 3})[1] == 3
    with pytest.raises(EdgedistillError, match="greedily"):
        generate({"until": [], "do_sample": True, "temperature": 0.7})


@needs_lm_eval
def test_empty_context_is_conditioned_on_the_bos(artifacts, reference):
    from edgedistill.evaluate.harness import EdgedistillLM

    tokenizer, _ = reference
    lm = EdgedistillLM(artifacts["gguf"])
    (logprob, greedy), = lm.loglikelihood([_request("loglikelihood", ("", "kalo mine tu"))], disable_tqdm=True)
    expected = transformers_logprob(reference, [tokenizer.bos_token_id], tokenizer.encode("kalo mine tu"))
    assert abs(logprob - expected) < TOLERANCE_NATS["gguf"] and not greedy


@needs_lm_eval
def test_cli_prints_a_table_per_artifact_and_writes_json(artifacts, tmp_path, monkeypatch, capsys):
    from edgedistill.cli import main

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # the command sets them; undone after the test
        monkeypatch.setenv(name, "0")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "harness.json"
    assert main(["harness", str(artifacts["gguf"]), str(artifacts["hf"]), "--tasks", "tiny_task",
                 "--include-path", str(TASKS), "--limit", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{artifacts['gguf']} (gguf)" in printed and f"{artifacts['hf']} (hf)" in printed
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"
    entries = json.loads(out.read_text())
    assert [entry["kind"] for entry in entries] == ["gguf", "hf"]
    for entry in entries:
        assert set(entry) == {"model", "kind", "lm_eval_version", "results", "versions", "n-samples", "rows"}
        assert entry["n-samples"]["tiny_task"]["effective"] == 4
        assert 0.0 <= entry["results"]["tiny_task"]["acc,none"] <= 1.0


@needs_lm_eval
def test_a_task_that_would_download_fails_at_once_naming_the_fix(artifacts):
    # a fresh process without the offline variables: the command must set them itself
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    done = subprocess.run([sys.executable, "-m", "edgedistill.cli", "harness", str(artifacts["gguf"]),
                           "--tasks", "arc_easy"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Hugging Face Hub" in done.stderr and "arc_easy" in done.stderr
    assert "dataset_path: json" in done.stderr and "--include-path" in done.stderr


@needs_lm_eval
def test_unknown_task_and_bad_include_path_are_named(tiny_llama_dir, tmp_path):
    from edgedistill.evaluate.harness import run_harness

    with pytest.raises(EdgedistillError, match="did you mean tiny_task"):
        run_harness([tiny_llama_dir], ["tiny_tsk"], include_path=TASKS)
    with pytest.raises(EdgedistillError, match="not a folder"):
        run_harness([tiny_llama_dir], ["tiny_task"], include_path=tmp_path / "missing")


def test_without_lm_eval_the_package_imports_and_the_command_says_what_to_install():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import edgedistill.cli, edgedistill.evaluate.task, edgedistill.runtimes\n"
            "sys.exit(edgedistill.cli.main(['harness', 'model.gguf', '--tasks', 'tiny_task']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "lm-evaluation-harness is not installed" in done.stderr
    assert "pip install 'edgedistill[lm-eval]'" in done.stderr
