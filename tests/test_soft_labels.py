"""The logits cache (shards, resume after a kill, an imported cache checked against the teacher)
and the students it trains: one with another tokenizer (response distillation) and progressive
chains. The tiny random teacher of recipes/tiny.yaml throughout.

    .venv/bin/python -m pytest -q tests/test_soft_labels.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from edgedistill.data.logits import META, SoftLabelSet, cache_teacher_logits, tokenizer_identity
from edgedistill.layout import logits_shard_name as shard_name
from edgedistill.errors import EdgedistillError
from edgedistill.pipeline import Pipeline, is_complete
from edgedistill.recipe import Recipe, load_recipe
from edgedistill.stages import stages_for
from conftest import make_tiny_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
UP_TO_DISTILL = ("teacher", "generate", "logits", "student", "distill")


def tiny_recipe(**sections) -> Recipe:
    """recipes/tiny.yaml with some sections' fields replaced (paths stay relative to recipes/)."""
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    raw = recipe.model_dump()
    for section, fields in sections.items():
        raw[section] = fields if raw.get(section) is None or not isinstance(fields, dict) else {**raw[section], **fields}
    return Recipe.model_validate(raw)


def run_stages(recipe: Recipe, run: Path, until: str = "distill", log=lambda _: None) -> list:
    stages = stages_for(recipe)
    names = [s.name for s in stages]
    return Pipeline(stages[:names.index(until) + 1], recipe, run, log=log).run()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny run to the logits stage with a cache of 10 examples per shard."""
    recipe = tiny_recipe(distill={"shard_examples": 10})
    run = tmp_path_factory.mktemp("sharded") / "run"
    run_stages(recipe, run, until="logits")
    return recipe, run


def test_the_cache_is_sharded_and_reads_back_like_one_shard(sharded, tmp_path):
    recipe, run = sharded
    meta = json.loads((run / "logits" / META).read_text())
    assert meta["examples"] == 36 and [s["examples"] for s in meta["shards"]] == [10, 10, 10, 6]
    assert sorted(p.name for p in (run / "logits").glob("cache-*")) == [shard_name(i) for i in range(4)]
    whole = tmp_path / "whole"
    whole.mkdir()
    one_shard = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"shard_examples": 1000})})
    cache_teacher_logits(one_shard, whole, teacher=run / "teacher", generate=run / "generate")
    a, b = SoftLabelSet.from_cache(run / "logits"), SoftLabelSet.from_cache(whole)
    assert len(a) == len(b) == 36
    for i in range(36):
        (ids_a, p_a, k_a, lp_a), (ids_b, p_b, k_b, lp_b) = a[i], b[i]
        assert torch.equal(ids_a, ids_b) and p_a == p_b
        # Batched with other neighbours, so other padding: equal up to float rounding.
        torch.testing.assert_close(lp_a, lp_b, atol=1e-4, rtol=0)
        assert (k_a == k_b).float().mean() > 0.99
    # A smaller top-k reads the first columns; the rows are sorted, so those are the most likely.
    assert SoftLabelSet.from_cache(run / "logits", topk=4)[0][2].shape[1] == 4


def test_a_killed_logits_stage_keeps_its_finished_shards(sharded, tmp_path):
    recipe, run = sharded
    partial = tmp_path / "partial"
    partial.mkdir()
    for i in (0, 1):
        os.link(run / "logits" / shard_name(i), partial / shard_name(i))
    kept = {i: (partial / shard_name(i)).stat().st_ino for i in (0, 1)}
    # A shard being written when the kill came is not under its final name, and is redone.
    (partial / f"{shard_name(2)}.writing").write_bytes(b"half")
    cache_teacher_logits(recipe, partial, teacher=run / "teacher", generate=run / "generate")
    assert {i: (partial / shard_name(i)).stat().st_ino for i in (0, 1)} == kept
    assert len(SoftLabelSet.from_cache(partial)) == 36
    for i in (2, 3):
        torch.testing.assert_close(load_file(str(partial / shard_name(i)))["topk_logprobs"],
                                   load_file(str(run / "logits" / shard_name(i)))["topk_logprobs"])


def test_an_imported_cache_is_checked_against_the_teacher(sharded, tmp_path):
    recipe, run = sharded
    same = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"soft_labels": run / "logits"})})
    results = run_stages(same, tmp_path / "same", until="logits")
    assert results[-1].manifest["result"]["imported_from"] == str(run / "logits")
    assert len(SoftLabelSet.from_cache(tmp_path / "same" / "logits")) == 36
    # Another seed, another random teacher: its hash differs from the one the cache recorded.
    other = same.model_copy(update={"seed": 1})
    with pytest.raises(EdgedistillError, match="made by another teacher") as error:
        run_stages(other, tmp_path / "other", until="logits")
    assert "distill.soft_labels" in error.value.hint
    assert is_complete(tmp_path / "other" / "generate"), "finished stages are kept"


@pytest.fixture(scope="module")
def other_tokenizer_student(tmp_path_factory) -> Path:
    """A tiny llama with a byte-level BPE tokenizer of its own (300 tokens), not SmolLM2's."""
    return make_tiny_model(tmp_path_factory.mktemp("other-student"), tokenizer_vocab_size=300)


def test_a_student_with_another_tokenizer_learns_the_teachers_answers(other_tokenizer_student, tmp_path):
    recipe = tiny_recipe(student={"method": "given", "source": str(other_tokenizer_student), "keep_layers": None},
                         # Its 300 tokens are syllables: English text takes about a token per byte.
                         distill={"kl_weight": 0.0, "max_seq_len": 512})
    results = {r.name: r for r in run_stages(recipe, tmp_path / "run")}
    student = results["student"].manifest["result"]
    assert student["tokenizer_matches_teacher"] is False and "vocabularies differ" in student["tokenizer_difference"]
    distilled = results["distill"].manifest["result"]
    assert distilled["soft_labels"] is False and distilled["train_examples"] == 36
    assert tokenizer_identity(tmp_path / "run" / "distill") == tokenizer_identity(other_tokenizer_student)
    start = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    trained = load_file(str(tmp_path / "run" / "distill" / "model.safetensors"))
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-3


def test_logit_distillation_refuses_a_student_with_another_tokenizer(other_tokenizer_student, tmp_path):
    recipe = tiny_recipe(student={"method": "given", "source": str(other_tokenizer_student), "keep_layers": None})
    with pytest.raises(EdgedistillError, match="its tokenizer is not the teacher's") as error:
        run_stages(recipe, tmp_path / "run")
    assert "kl_weight: 0" in error.value.hint
    assert is_complete(tmp_path / "run" / "logits"), "finished stages are kept"


@pytest.mark.parametrize("labels", ["teacher", "previous"])
def test_a_progressive_chain_prunes_and_distills_each_step(labels, tmp_path):
    recipe = tiny_recipe(progressive={"steps": [{"keep_layers": 3, "epochs": 1}], "soft_labels": labels})
    logged = []
    results = {r.name: r for r in run_stages(recipe, tmp_path / "run", log=logged.append)}
    chain = ["step1", "step1_distill", *(["step1_logits"] if labels == "previous" else []), "student", "distill"]
    assert list(results) == ["teacher", "generate", "logits", *chain]
    run = tmp_path / "run"
    assert AutoConfig.from_pretrained(run / "step1").num_hidden_layers == 3
    assert AutoConfig.from_pretrained(run / "student").num_hidden_layers == 2
    assert len(results["step1_distill"].manifest["result"]["epochs"]) == 1
    student = results["student"].manifest["result"]
    teacher = results["step1"].manifest["result"]["teacher_parameters"]
    assert student["teacher_parameters"] == teacher > student["pruned_from_parameters"] > student["student_parameters"]
    if labels == "previous":
        assert results["distill"].manifest["inputs"].keys() == {"student", "step1_logits", "generate"}
    # Every step is a cached stage: a second run does nothing.
    logged.clear()
    run_stages(recipe, run, log=logged.append)
    assert all(line.endswith("up to date, skipped") for line in logged)
