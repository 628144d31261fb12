"""Online logit distillation (distill.soft_labels_from: online) and on-policy distillation (the
on_policy stage, distill.on_policy): the same loss as the cache, batched sampling with a KV cache,
the stage's model and counts, a divergence that falls, and the refusals. Tiny random models of
conftest with their own tokenizer, the stage functions called directly; the tiny recipe end to end
is the slow test at the bottom.

    .venv/bin/python -m pytest -q tests/test_on_policy.py
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model, tokenizer_corpus
from edgedistill.data.logits import cache_teacher_logits
from edgedistill.distill.losses import distill_loss
from edgedistill.distill.on_policy import _check_can_answer, on_policy_stage, sample_answers, train_on_policy
from edgedistill.distill.train import collate, distill, online_training_set, teacher_topk, training_set
from edgedistill.errors import EdgedistillError
from edgedistill.layout import MANIFEST, TRAIN_JSONL
from edgedistill.pipeline import Pipeline
from edgedistill.recipe import OnPolicyConfig, Recipe, load_recipe
from edgedistill.runtimes.pytorch import load_model
from edgedistill.stages import ON_POLICY, stages_for

ROOT = Path(__file__).resolve().parent.parent
EOS = 2  # the tiny tokenizer's <|im_end|>: eos and pad
WORDS = " ".join(tokenizer_corpus()[:8]).split()


def tiny_recipe(**distill) -> Recipe:
    """recipes/tiny.yaml with distill fields replaced."""
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    raw = recipe.model_dump()
    raw["distill"] = {**raw["distill"], **distill}
    return Recipe.model_validate(raw)


def write_train_set(folder: Path, examples: int, answer_words: int) -> Path:
    """generate/train.jsonl of `examples` chat rows whose answers have `answer_words` words."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": str(i), "messages": [
        {"role": "user", "content": " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(4 + i % 5))},
        {"role": "assistant", "content": " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(answer_words))}]}
        for i in range(examples)]
    (folder / TRAIN_JSONL).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A 2-block teacher (with the manifest the logits cache hashes) and a 1-block student, same tokenizer."""
    root = tmp_path_factory.mktemp("on-policy")
    teacher = make_tiny_model(root / "teacher")
    (teacher / MANIFEST).write_text(json.dumps({"files": {"model.safetensors": "tiny"}}))
    return {"teacher": teacher, "student": make_tiny_model(root / "student", seed=1, num_hidden_layers=1),
            "generate": write_train_set(root / "generate", examples=12, answer_words=6)}


@pytest.mark.integration
def test_online_soft_labels_give_the_cache_loss(models, tmp_path):
    recipe = tiny_recipe(topk=8, max_seq_len=64, kl_positions="all", batch_size=4, epochs=1, warmup_steps=1)
    cache_teacher_logits(recipe, tmp_path, teacher=models["teacher"], generate=models["generate"])
    cached = training_set(recipe.distill, tmp_path, models["student"], topk=8)
    online = online_training_set(recipe.distill, models["teacher"], models["student"], models["generate"])
    assert len(cached) == len(online) == 12
    teacher, student = load_model(models["teacher"]), load_model(models["student"])
    for kl_positions in ("all", "answer"):
        from_cache = collate([cached[i] for i in range(5)], EOS, kl_positions)
        from_teacher = collate([online[i] for i in range(5)], EOS, kl_positions)
        assert torch.equal(from_cache["input_ids"], from_teacher["input_ids"])
        ids, logprobs = teacher_topk(teacher, from_teacher, 8)
        assert ids.dtype == torch.int32 and ids.shape == from_cache["topk_ids"].shape == logprobs.shape
        # the cache batched other neighbours (other padding): equal up to float rounding
        torch.testing.assert_close(logprobs, from_cache["topk_logprobs"], atol=1e-5, rtol=0)
        logits = student(input_ids=from_cache["input_ids"], attention_mask=from_cache["attention_mask"]).logits
        rows = logits[from_cache["row_mask"]]
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            args = dict(kl_weight=0.5, temperature=2.0, divergence=divergence)
            a = distill_loss(rows, from_cache["is_answer"], from_cache["targets"], from_cache["topk_logprobs"],
                             from_cache["topk_ids"], **args)
            b = distill_loss(rows, from_teacher["is_answer"], from_teacher["targets"], logprobs, ids, **args)
            torch.testing.assert_close(a["loss"], b["loss"], atol=1e-5, rtol=1e-5)

    # the whole stage: the same examples in the same order, so the same per-epoch losses
    runs = {}
    for source in ("cache", "online"):
        out = tmp_path / f"distill-{source}"
        out.mkdir()
        inputs = {"logits": tmp_path} if source == "cache" else {"teacher": models["teacher"]}
        runs[source] = distill(recipe.model_copy(update={"distill": recipe.distill.model_copy(
            update={"soft_labels_from": source})}), out, student=models["student"], generate=models["generate"],
            **inputs)
    assert runs["online"]["soft_labels_from"] == "online" and "soft_labels_from" not in runs["cache"]
    for a, b in zip(runs["cache"]["epochs"], runs["online"]["epochs"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4) and a["kl"] == pytest.approx(b["kl"], abs=2e-4)


@pytest.mark.integration
def test_sampling_is_one_batched_generate_with_the_kv_cache(models):
    student = load_model(models["student"])
    calls, widths = [], []
    generate = student.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    student.generate = spy
    student.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                      with_kwargs=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    torch.manual_seed(0)
    answers = sample_answers(student, prompts, max_new_tokens=6, temperature=1.0, pad_id=EOS, stop_ids=[EOS])
    assert len(calls) == 1, "one generate call for the whole batch"
    call = calls[0]
    assert call["input_ids"].shape == (3, 5) and call["use_cache"] is True and call["do_sample"] is True
    assert call["top_k"] == 0 and call["top_p"] == 1.0
    # padded on the left: every prompt ends at the last column
    assert call["attention_mask"].tolist() == [[1] * 5, [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    assert call["input_ids"][1, 3:].tolist() == [10, 11]
    # with the KV cache, every forward after the prompt's takes one new token per row
    assert widths[0] == 5 and set(widths[1:]) == {1} and len(widths) <= 6
    for answer, finished in answers:
        assert (answer[-1] == EOS and EOS not in answer[:-1]) if finished else (len(answer) == 6 and EOS not in answer)
    assert student.training is False  # left as it was (load_model gives eval mode)


@pytest.mark.integration
def test_the_on_policy_stage_writes_a_model_and_counts_its_samples(models, tmp_path):
    recipe = tiny_recipe(topk=8, max_seq_len=64, on_policy={"fraction": 1.0, "max_new_tokens": 4, "batch_size": 4,
                                                            "learning_rate": 1e-3})
    result = on_policy_stage(recipe, tmp_path, distill=models["student"], teacher=models["teacher"],
                             generate=models["generate"])
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert not (tmp_path / "checkpoint").exists()
    samples = result["samples"]
    assert samples["samples"] == 12 and result["epochs"][0]["on_policy_batches"] == 3
    assert result["epochs"][0]["off_policy_batches"] == 0 and "on_policy_reverse_kl" in result["epochs"][0]
    assert 12 <= samples["sampled_tokens"] <= 48 and samples["sampled_tokens_per_s"] > 0
    # a random student seldom ends its turn within 4 tokens; whatever it did is counted
    assert 0 <= samples["empty"] <= 12 - samples["truncated"] and samples["truncated"] > 0
    before = load_file(str(models["student"] / "model.safetensors"))
    after = load_file(str(tmp_path / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.integration
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_the_divergence_on_the_students_own_samples_falls(models, divergence, tmp_path):
    teacher, student = load_model(models["teacher"]), load_model(models["student"])
    data = online_training_set(tiny_recipe(max_seq_len=64).distill, models["teacher"], models["student"],
                               models["generate"])
    cfg = OnPolicyConfig(fraction=1.0, divergence=divergence, epochs=10, batch_size=6, learning_rate=1e-2)
    torch.manual_seed(0)
    result = train_on_policy(student, partial(teacher_topk, teacher, k=16), data, cfg, tmp_path, seed=0,
                             max_new_tokens=6, max_seq_len=64, pad_id=EOS, stop_ids=[EOS])
    curve = [epoch[f"on_policy_{divergence}"] for epoch in result["epochs"]]
    # each epoch's mean over fresh samples: noisy, falling (measured: by about a third in 10 epochs)
    assert curve[-1] < 0.8 * curve[0] and sum(curve[-3:]) < sum(curve[:3]), curve


@pytest.mark.integration
def test_a_student_that_cannot_answer_yet_is_refused_with_the_warm_up(models, tmp_path):
    # the teacher's answers end within 3 tokens; a random student runs on past them
    short = write_train_set(tmp_path / "generate", examples=4, answer_words=1)
    recipe = tiny_recipe(max_seq_len=64, on_policy={"fraction": 1.0, "max_new_tokens": 3, "batch_size": 4})
    with pytest.raises(EdgedistillError, match="cannot answer yet.*ran to max_new_tokens 3") as error:
        on_policy_stage(recipe, tmp_path / "out", distill=models["student"], teacher=models["teacher"], generate=short)
    assert "distill.epochs" in error.value.hint


@pytest.mark.unit
def test_the_first_batch_check():
    _check_can_answer([([7, EOS], True), ([8, 9, 10], False)], [3, 3], 3)  # one answered: fine
    _check_can_answer([([7, 8, 9], False)] * 2, [5, 9], 3)  # the teacher's answers are longer too: fine
    with pytest.raises(EdgedistillError, match="all 2 samples of the first on-policy batch are empty"):
        _check_can_answer([([EOS], True)] * 2, [3, 3], 3)
    with pytest.raises(EdgedistillError, match="end within 3 tokens"):
        _check_can_answer([([7, 8, 9], False)] * 2, [2, 3], 3)


@pytest.mark.unit
def test_the_stage_graph_with_online_and_on_policy():
    recipe = tiny_recipe()
    online = tiny_recipe(soft_labels_from="online")
    stages = {s.name: s for s in stages_for(online)}
    assert "logits" not in stages and stages["distill"].inputs == ("student", "teacher", "generate")
    with_lora = load_recipe(ROOT / "recipes" / "tiny-lora.yaml")
    with_lora = with_lora.model_copy(update={"distill": with_lora.distill.model_copy(update={
        "soft_labels_from": "online", "on_policy": OnPolicyConfig()})})
    stages = {s.name: s for s in stages_for(with_lora)}
    assert stages["logits"].inputs == ("teacher", "generate"), "lora still trains from the cache"
    assert stages[ON_POLICY].inputs == ("distill", "teacher", "generate")
    assert stages["lora"].inputs[0] == stages["merge"].inputs[0] == ON_POLICY and stages["eval"].inputs[2] == "merge"

    on_policy = tiny_recipe(on_policy={"fraction": 1.0})
    names = [s.name for s in stages_for(on_policy)]
    assert names.index("distill") < names.index(ON_POLICY) < names.index("export")
    stages = {s.name: s for s in stages_for(on_policy)}
    assert all(ON_POLICY in stages[name].inputs and "distill" not in stages[name].inputs
               for name in ("export", "export_onnx", "eval"))

    def key(r: Recipe, name: str) -> str:
        stage = next(s for s in stages_for(r) if s.name == name)
        return Pipeline(stages_for(r), r, Path("unused")).key(stage, {i: i for i in stage.inputs})[0]

    # the on-policy settings are the on_policy stage's key, not distill's
    assert key(on_policy, "distill") == key(recipe, "distill")
    other = tiny_recipe(on_policy={"fraction": 0.5})
    assert key(other, ON_POLICY) != key(on_policy, ON_POLICY)
    assert key(online, "distill") != key(recipe, "distill")


@pytest.mark.unit
@pytest.mark.parametrize("distill, message", [
    ({"on_policy": {"fraction": 0}}, r"distill\.on_policy\.fraction"),
    ({"on_policy": {"lambda": 0.5}}, r"distill\.on_policy\.lambda"),
    ({"on_policy": {"divergence": "jsd", "jsd_beta": 1.0}}, r"distill\.on_policy\.jsd_beta"),
    ({"on_policy": {"divergence": "tvd"}}, r"distill\.on_policy\.divergence"),
    ({"on_policy": {"max_new_tokens": 0}}, r"distill\.on_policy\.max_new_tokens"),
    ({"soft_labels_from": "teacher"}, r"distill\.soft_labels_from"),
    ({"soft_labels_from": "online", "soft_labels": "logits"}, "soft_labels_from 'online' reads none"),
])
def test_bad_recipes_are_refused_naming_the_field(tmp_path, distill, message):
    text = (ROOT / "recipes" / "tiny.yaml").read_text()
    (tmp_path / "data").symlink_to(ROOT / "recipes" / "data")
    last = "  warmup_steps: 2\n"  # the tiny recipe's distill section ends here
    assert text.count(last) == 1
    (tmp_path / "bad.yaml").write_text(text.replace(last, last + "".join(f"  {k}: {json.dumps(v)}\n"
                                                                            for k, v in distill.items())))
    with pytest.raises(EdgedistillError, match=message):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.unit
def test_combinations_that_do_not_run_yet_are_refused():
    raw = tiny_recipe().model_dump()
    endpoint = {**raw, "teacher": {"source": "endpoint", "tokenizer": "smollm2-135m-instruct"},
                "generate": {**raw["generate"], "endpoint": {"url": "http://127.0.0.1:9/v1"}},
                "student": {"method": "config", "config": {"num_hidden_layers": 1}},
                "distill": {**raw["distill"], "on_policy": {}}}
    assert "on_policy" in [stage.name for stage in stages_for(Recipe.model_validate(endpoint))]
    online = {**endpoint, "distill": {**raw["distill"], "soft_labels_from": "online"}}
    with pytest.raises(EdgedistillError, match="online runs the teacher here") as info:
        stages_for(Recipe.model_validate(online))
    assert "distill.on_policy does score" in info.value.hint
    progressive = {**raw, "progressive": {"steps": [{"keep_layers": 3}]},
                   "distill": {**raw["distill"], "soft_labels_from": "online"}}
    with pytest.raises(EdgedistillError, match="progressive"):
        stages_for(Recipe.model_validate(progressive))


@pytest.mark.slow
def test_the_tiny_recipe_runs_on_policy_before_its_exports(tmp_path):
    """recipes/tiny.yaml with distill.on_policy, to the GGUF export: the export is made and checked
    from on_policy/ (about 2 minutes on 2 busy cores)."""
    recipe = tiny_recipe(on_policy={"fraction": 0.5, "max_new_tokens": 4, "batch_size": 6})
    stages = stages_for(recipe)
    names = [s.name for s in stages]
    results = {r.name: r for r in Pipeline(stages[:names.index("export") + 1], recipe, tmp_path / "run").run()}
    result = results[ON_POLICY].manifest["result"]
    assert result["samples"]["samples"] > 0 and {"empty", "truncated"} <= set(result["samples"])
    assert (tmp_path / "run" / ON_POLICY / "model.safetensors").is_file()
    assert set(results["export"].manifest["inputs"]) == {ON_POLICY, "generate"}


@pytest.mark.unit
@pytest.mark.parametrize("quant_aware", [None, {"grids": ["Q4_K_M"]}])
def test_the_on_policy_stage_reads_only_what_it_declares(monkeypatch, quant_aware):
    # Its recipe view holds distill.quant_aware only when the recipe sets it; whether it is set
    # comes from the whole recipe, so the stage never reads an undeclared section.
    import edgedistill.stages as stages_module

    seen = {}
    monkeypatch.setattr(stages_module, "on_policy_stage", lambda recipe, out, **kw: seen.update(kw) or {})
    monkeypatch.setattr(stages_module, "_quant_aware", lambda recipe, student, first: ("grids", first))
    recipe = tiny_recipe(on_policy={"fraction": 1.0}, quant_aware=quant_aware)
    stage = next(s for s in stages_for(recipe) if s.name == ON_POLICY)
    pipeline = Pipeline(stages_for(recipe), recipe, Path("unused"))
    stage.fn(pipeline.view(stage), Path("out"), distill=Path("d"), teacher=Path("t"), generate=Path("g"))
    assert seen["quant_aware"] == (None if quant_aware is None else ("grids", 0))
