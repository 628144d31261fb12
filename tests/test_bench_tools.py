"""The export and quantization-type benchmarks in tools/: their parts, on tiny inputs, without timing.

    .venv/bin/python -m pytest -q tests/test_bench_tools.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

from edgedistill.export.gguf import write_gguf

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    # tools/ is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_export = _tool("bench_export")
bench_overhead = _tool("bench_overhead")
bench_quant_types = _tool("bench_quant_types")
bench_task_recipes = _tool("bench_task_recipes")


@pytest.mark.integration
def test_built_model_is_a_valid_checkpoint_that_exports(tmp_path):
    info = bench_export.build_model(tmp_path / "m", target_bytes=20_000_000, hidden=64)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.num_hidden_layers == info["layers"] > 1
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as f:
        sizes = {key: f.get_tensor(key).nbytes for key in f.keys()}
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), model.get_input_embeddings().weight)
    assert sum(sizes.values()) == info["model_bytes"]
    assert max(sizes.values()) == info["largest_tensor_bytes"]
    assert abs(info["model_bytes"] - 20_000_000) < (info["model_bytes"] - info["largest_tensor_bytes"]) / info["layers"]
    assert write_gguf(tmp_path / "m", tmp_path / "m.gguf").stat().st_size > info["model_bytes"] // 2


@pytest.mark.unit
def test_baseline_reads_every_byte_and_writes_the_asked_count(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "m" / "b.safetensors").write_bytes(b"y" * 333)
    result = bench_export.run_baseline(tmp_path / "m", tmp_path / "copy", 777)
    assert (result["bytes_read"], result["bytes_written"]) == (1333, 777)
    assert not (tmp_path / "copy").exists()


@pytest.mark.unit
def test_quantize_all_passes_the_imatrix_only_when_given(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench_quant_types, "quantize_gguf",
                        lambda src, dst, qtype, **kwargs: calls.append(kwargs) or dst)
    f16 = tmp_path / "teacher-f16.gguf"
    paths = bench_quant_types.quantize_all(f16, tmp_path, ["F16", "Q8_0"])
    assert paths == {"F16": f16, "Q8_0": tmp_path / "teacher-q8_0.gguf"}
    assert calls == [{"overwrite": True}]
    bench_quant_types.quantize_all(f16, tmp_path, ["Q4_K_M"], imatrix=tmp_path / "m.imatrix")
    assert calls[-1] == {"overwrite": True, "imatrix": tmp_path / "m.imatrix"}


@pytest.mark.unit
def test_targets_pass_miss_and_not_measured():
    rows = [{"type": "Q8_0", "perplexity_ratio": 1.004}, {"type": "Q4_K_M", "perplexity_ratio": 1.09,
                                                          "decode_vs_f16": None}]
    checks = bench_quant_types.check_targets(rows, disturbed=["F16"])
    assert [c["met"] for c in checks] == [True, False, None]
    assert [c["reliable"] for c in checks] == [True, True, False]


@pytest.mark.unit
def test_rounds_that_differ_flag_the_speed_as_disturbed():
    rows = [{"type": t, "speed_rounds": [{"decode_tokens_per_s": v} for v in speeds]}
            for t, speeds in (("F16", [50, 52, 49]), ("Q4_0", [100, 20, 98]))]
    assert bench_quant_types.disturbed_types(rows) == ["Q4_0"]


@pytest.mark.integration
def test_heldout_texts_fill_the_scored_window():
    from edgedistill.sources import tokenizer_source

    tokenizer = tokenizer_source("smollm2-135m-instruct")  # the teacher's, from the embedded GGUF
    lengths = [len(tokenizer(text).input_ids) for text in bench_quant_types.HELDOUT_TEXTS]
    assert min(lengths) >= bench_quant_types.MAX_TOKENS_PER_TEXT


@pytest.mark.unit
def test_overhead_ratio_and_spread_over_rounds():
    rounds = [{"bench_decode_tokens_per_s": b, "bare_decode_tokens_per_s": r} for b, r in ((98, 100), (96, 101), (99, 99))]
    summary = bench_overhead.summarize_rounds(rounds)
    assert (summary["bench_decode_tokens_per_s"], summary["bare_decode_tokens_per_s"]) == (98, 100)
    assert summary["bench_vs_bare"] == 0.98 and summary["bench_repeat_spread"] == round(3 / 98, 3)
    assert summary["targets"] == {"bench_within_5_percent_of_bare": True, "bench_repeats_within_10_percent": True}
    rounds[0]["bench_decode_tokens_per_s"], rounds[1]["bench_decode_tokens_per_s"] = 80, 85
    assert not any(bench_overhead.summarize_rounds(rounds)["targets"].values())


@pytest.mark.integration
def test_overhead_bare_loop_decodes_a_tiny_gguf(tmp_path):
    pytest.importorskip("llama_cpp")
    from conftest import make_tiny_model

    gguf_file = write_gguf(make_tiny_model(tmp_path / "hf"), tmp_path / "tiny.gguf")
    result = bench_overhead.bare(str(gguf_file), prompt_tokens=8, gen_tokens=4, repetitions=1, threads=1)
    assert result["decode_tokens_per_s"] > 0


def _blocks_folder(folder: Path, n_layers: int) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors = {"model.embed_tokens.weight": torch.zeros(50, 4)}
    tensors |= {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(8, 4) for i in range(n_layers)}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.unit
def test_task_recipe_targets_count_block_parameters_and_the_q4_share(tmp_path):
    import json

    run = tmp_path / "run"
    _blocks_folder(run / "teacher", 30)
    _blocks_folder(run / "distill", 10)
    scores = {"exact_match": {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 100, "errors": 0, "first_error": None}}
    (run / "generate").mkdir()
    gold = ["She walked.", "He ran.", "They sang.", "We ate."]
    (run / "generate" / "heldout.jsonl").write_text("".join(
        json.dumps({"id": i, "messages": [{"role": "user", "content": f"past tense {i}"}], "reference": text}) + "\n"
        for i, text in enumerate(gold)))
    (run / "generate" / "task.json").write_text(json.dumps({"kind": "generation", "scorers": ["exact_match"]}))

    def answers(texts):
        return [{"id": i, "answer": text} for i, text in enumerate(texts)]

    artifact = {"artifact": "student-q4_k_m.gguf", "task_score": 0.46, "task_score_interval": [0.36, 0.56],
                "scores": scores, "share_of_reference": 0.92, "share_of_reference_interval": [0.8, 1.04],
                "within_noise_of_reference": True, "answers": answers(["She walked.", "He run.", "They sang.", "x"])}
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({
        "reference": {"artifact": "teacher/", "examples": 100, "task_score": 0.5, "scores": scores,
                      "answers": answers(["She walked.", "He ran.", "They sang.", "x"])},
        "artifacts": [artifact | {"artifact": "teacher-q4_k_m.gguf", "share_of_reference": 0.5}, artifact]}))
    found = bench_task_recipes.summarize(run)
    blocks, q4 = found["targets"]["block_parameters"], found["targets"]["q4_k_m_share_of_teacher"]
    assert (blocks["teacher"], blocks["student"], blocks["target_met"]) == (30 * 32, 10 * 32, True)
    assert q4["artifact"] == "student-q4_k_m.gguf" and q4["target_met"] and not q4["target_met_at_interval_low"]
    assert [row["model"] for row in found["rows"]] == ["teacher", "teacher-q4_k_m.gguf", "student-q4_k_m.gguf"]
    assert found["rows"][0]["share_of_teacher"] == 1.0 and "first_error" not in found["rows"][0]["scores"]["exact_match"]
    assert found["teacher_agreement_with_gold"] == scores
    # the answers rescored: the student gets 2 of the teacher's 3 right, on the same examples
    share = found["rows"][2]["scorer_share_of_teacher"]["exact_match"]
    assert (share["share"], share["n"]) == (round(2 / 3, 4), 4) and share["low"] <= share["share"] <= share["high"]
    assert q4["scorers_below_target"] == {"exact_match": share}
