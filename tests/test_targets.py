"""Device targets: every built-in profile loads; budgets turn bench and eval rows into pass/fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedistill.errors import EdgedistillError
from edgedistill.targets import (BUDGET_SOURCES, Budgets, Target, any_failed, builtin_targets, check_target,
                                 format_target_checks, kv_cache_bytes, load_target, preflight)

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "recipes" / "targets").glob("*.yaml"))


@pytest.mark.unit
def test_the_promised_profiles_ship():
    assert {"laptop-cpu", "raspberry-pi-5", "phone-8gb", "consumer-gpu"} <= set(builtin_targets())


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
@pytest.mark.unit
def test_every_profile_loads_by_path_and_by_name(path):
    target = load_target(path)
    assert target.name == path.stem
    assert target.description
    assert load_target(path.stem) == target
    # the shipped profiles set every budget, so a report shows them all
    assert all(getattr(target.budgets, b) is not None for b in BUDGET_SOURCES)


@pytest.mark.unit
def test_unknown_name_lists_the_builtin_targets():
    with pytest.raises(EdgedistillError) as err:
        load_target("toaster")
    assert "'toaster'" in str(err.value)
    assert "raspberry-pi-5" in err.value.hint and "phone-8gb" in err.value.hint


@pytest.mark.unit
def test_missing_yaml_file_is_refused(tmp_path):
    with pytest.raises(EdgedistillError, match="does not exist"):
        load_target(tmp_path / "nope.yaml")


@pytest.mark.unit
def test_unknown_key_is_refused_naming_file_and_key(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("name: board\ncontext_length: 1024\nbudgets:\n  max_memory_mb: 500\n  max_ram_mb: 400\n")
    with pytest.raises(EdgedistillError) as err:
        load_target(path)
    assert f"{path}: budgets.max_ram_mb: unknown key" in str(err.value)


@pytest.mark.unit
def test_bad_value_is_refused_naming_the_value(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("name: board\ncontext_length: 1024\nbudgets:\n  min_quality_share: 85\n")
    with pytest.raises(EdgedistillError, match=r"budgets.min_quality_share: .*\(got 85\)"):
        load_target(path)


TARGET = Target(name="t", context_length=2048, budgets=Budgets(
    max_memory_mb=400, max_file_mb=100, max_ttft_ms=500, min_decode_tokens_per_s=20, min_quality_share=0.85))
BENCH = {"artifact": "m-Q4_K_M.gguf", "file_mb": 80.0, "decode_tokens_per_s": 15.0, "prefill_tokens_per_s": 900.0,
         "ttft_ms": 250.0, "peak_rss_mb": 500.0, "threads": 2}


@pytest.mark.unit
def test_check_target_pass_fail_and_margins():
    checks = {c["budget"]: c for c in check_target(TARGET, BENCH, {"artifact": "m-Q4_K_M.gguf", "task_score": 0.9,
                                                                     "share_of_reference": 0.9})}
    assert list(checks) == list(BUDGET_SOURCES)
    assert checks["max_file_mb"] == {"budget": "max_file_mb", "limit": 100, "value": 80.0, "passed": True,
                                     "margin": 0.2}
    assert checks["max_memory_mb"]["passed"] is False and checks["max_memory_mb"]["margin"] == -0.25
    assert checks["max_ttft_ms"]["passed"] is True and checks["max_ttft_ms"]["margin"] == 0.5
    assert checks["min_decode_tokens_per_s"]["passed"] is False and checks["min_decode_tokens_per_s"]["margin"] == -0.25
    assert checks["min_quality_share"]["passed"] is True and checks["min_quality_share"]["margin"] == 0.0588


@pytest.mark.unit
def test_quality_without_eval_is_not_measured_and_not_a_failure():
    checks = check_target(Target(name="t", context_length=512, budgets=Budgets(max_file_mb=100, min_quality_share=0.85)),
                          BENCH)
    assert checks[-1] == {"budget": "min_quality_share", "limit": 0.85, "value": None, "passed": None, "margin": None}
    assert not any_failed(checks)


@pytest.mark.unit
def test_only_budgets_set_are_checked():
    assert check_target(Target(name="t", context_length=512), BENCH) == []


@pytest.mark.unit
def test_table_shows_results_and_the_this_machine_note():
    table = format_target_checks(TARGET, [("m-Q4_K_M.gguf", check_target(TARGET, BENCH))])
    assert "m-Q4_K_M.gguf:" in table
    assert "FAIL" in table and "pass" in table and "not measured" in table
    assert "-25%" in table and "+20%" in table
    assert "not on the target device" in table


SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}


@pytest.mark.unit
def test_kv_cache_of_a_smollm2_like_config():
    assert kv_cache_bytes(SMOLLM2, 2048) == 2 * 30 * 3 * 64 * 2048 * 2
    # without num_key_value_heads every attention head has its own K and V; head_dim is given or derived
    assert kv_cache_bytes({**SMOLLM2, "num_key_value_heads": None}, 2048) == 3 * kv_cache_bytes(SMOLLM2, 2048)
    assert kv_cache_bytes({**SMOLLM2, "head_dim": 128}, 2048) == 2 * kv_cache_bytes(SMOLLM2, 2048)


@pytest.mark.unit
def test_preflight_fits_a_large_budget_and_not_a_small_one():
    roomy = preflight(SMOLLM2, 105_000_000, Target(name="t", context_length=2048, budgets=Budgets(max_memory_mb=500)))
    assert roomy["kv_cache_mb"] == 45.0  # 47.2 MB = 45.0 MiB
    assert roomy["estimate_mb"] == pytest.approx(roomy["weights_mb"] + 45.0 + roomy["overhead_mb"], abs=0.1)
    assert roomy["fits"] is True and roomy["budget_mb"] == 500
    assert preflight(SMOLLM2, 105_000_000, Target(name="t", context_length=2048,
                                                  budgets=Budgets(max_memory_mb=100)))["fits"] is False
    assert preflight(SMOLLM2, 105_000_000, Target(name="t", context_length=2048))["fits"] is None


@pytest.mark.unit
def test_preflight_names_a_missing_config_key():
    with pytest.raises(EdgedistillError, match="num_hidden_layers"):
        kv_cache_bytes({"num_attention_heads": 4, "hidden_size": 64}, 128)


# --- a recipe's bench.target: validation, preflight before the long stages, bench rows, report table ---

TINY = ROOT / "recipes" / "tiny.yaml"


def _tiny_recipe_file(folder: Path, target: str | None = None, student: str | None = None) -> Path:
    """recipes/tiny.yaml in `folder` (prompts by absolute path), with a bench.target and another student."""
    text = TINY.read_text().replace("data/sentiment.jsonl", str(ROOT / "recipes" / "data" / "sentiment.jsonl"))
    if target is not None:
        text = text.replace("bench:\n", f"bench:\n  target: {target}\n")
    if student is not None:
        text = text.replace("student:\n  method: prune\n  keep_layers: 2\n", student)
    path = folder / "tiny.yaml"
    path.write_text(text)
    return path


@pytest.mark.unit
def test_recipe_bench_target_by_name_and_by_path_relative_to_the_recipe(tmp_path):
    from edgedistill.recipe import load_recipe
    from edgedistill.recipe import recipe_target

    assert recipe_target(load_recipe(_tiny_recipe_file(tmp_path, "phone-8gb"))) == load_target("phone-8gb")
    (tmp_path / "board.yaml").write_text("name: board\ncontext_length: 512\nbudgets:\n  max_memory_mb: 300\n")
    assert recipe_target(load_recipe(_tiny_recipe_file(tmp_path, "board.yaml"))).name == "board"
    assert recipe_target(load_recipe(TINY)) is None


@pytest.mark.unit
def test_misspelt_recipe_target_fails_at_load_naming_file_field_and_profiles(tmp_path):
    from edgedistill.recipe import load_recipe

    path = _tiny_recipe_file(tmp_path, "phone-8bg")
    with pytest.raises(EdgedistillError) as err:
        load_recipe(path)
    assert f"{path}: bench.target: unknown target 'phone-8bg'" in str(err.value)
    assert "phone-8gb" in err.value.hint and "raspberry-pi-5" in err.value.hint


@pytest.mark.unit
def test_bench_section_without_target_keeps_its_cache_key():
    from edgedistill.recipe import BenchConfig, load_recipe, section_dump

    recipe = load_recipe(TINY)
    assert "target" not in section_dump(recipe, ("bench",))["bench"]
    with_target = recipe.model_copy(update={"bench": BenchConfig(target="phone-8gb")})
    assert section_dump(with_target, ("bench",))["bench"]["target"] == "phone-8gb"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """The tiny recipe's random teacher (4 layers, width 64, 4 heads in 2 KV groups, MLP 128)."""
    from edgedistill.recipe import load_recipe
    from edgedistill.stages import teacher_stage

    out = tmp_path_factory.mktemp("run") / "teacher"
    out.mkdir()
    teacher_stage(load_recipe(TINY), out)
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    """A generate folder with a few chat rows, for the importance scores width pruning needs."""
    import json

    out = tmp_path_factory.mktemp("generate")
    rows = [{"id": str(i), "label": "positive", "messages": [
        {"role": "user", "content": f"Review {i}: the film was {'good ' * (i + 1)}"},
        {"role": "assistant", "content": "positive"}]} for i in range(6)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


STUDENTS = {
    "prune": "student:\n  method: prune\n  keep_layers: 2\n",
    "prune-explicit": "student:\n  method: prune\n  keep_layers: [0, 3]\n",
    "prune-width": ("student:\n  method: prune\n  keep_layers: 3\n  calibration_examples: 4\n"
                    "  width:\n    intermediate_size: 64\n    num_attention_heads: 2\n"),
    "prune-hidden": ("student:\n  method: prune\n  keep_layers: 2\n  calibration_examples: 4\n"
                     "  width:\n    hidden_size: 32\n"),
    "config": "student:\n  method: config\n  config:\n    num_hidden_layers: 1\n    intermediate_size: 96\n",
}


@pytest.mark.parametrize("student", list(STUDENTS))
@pytest.mark.integration
def test_estimated_student_has_the_built_students_parameters_and_shape(student, tiny_teacher, chats, tmp_path):
    import json

    from edgedistill.distill.student import build_student
    from edgedistill.preflight import meta_model, parameter_count, student_config
    from edgedistill.recipe import load_recipe

    recipe = load_recipe(_tiny_recipe_file(tmp_path, student=STUDENTS[student]))
    config = student_config(recipe, tiny_teacher)
    out = tmp_path / "student"
    out.mkdir()
    built = build_student(recipe, out, teacher=tiny_teacher, generate=chats)
    assert parameter_count(meta_model(config)) == built["student_parameters"]
    saved = json.loads((out / "config.json").read_text())
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        assert getattr(config, key) == saved.get(key, getattr(config, key)), key


@pytest.mark.integration
def test_progressive_student_is_pruned_from_the_last_step(tiny_teacher, tmp_path):
    from edgedistill.preflight import student_config
    from edgedistill.recipe import load_recipe

    recipe = load_recipe(_tiny_recipe_file(tmp_path, student=(
        "student:\n  method: prune\n  keep_layers: 2\nprogressive:\n  steps:\n    - keep_layers: 3\n"
        "      width:\n        intermediate_size: 96\n")))
    config = student_config(recipe, tiny_teacher)
    assert (config.num_hidden_layers, config.intermediate_size) == (2, 96)


@pytest.mark.integration
def test_gguf_weight_bytes_follow_the_bits_per_weight_table(tiny_teacher):
    from transformers import AutoConfig

    from edgedistill.formats import GGUF_QUANTS
    from edgedistill.preflight import gguf_weight_bytes, meta_model, parameter_count

    model = meta_model(AutoConfig.from_pretrained(tiny_teacher))
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    matrices = parameter_count(model) - vectors
    assert gguf_weight_bytes(model, "F16") == round((16 * matrices + 32 * vectors) / 8)
    # the tied output matrix's rows (64 wide) are not whole Q6_K blocks: llama.cpp keeps it in Q8_0;
    # the other matrices' rows are not whole k-quant blocks either: Q4_K falls back to Q5_0
    output = model.get_output_embeddings().weight.numel()
    assert gguf_weight_bytes(model, "Q4_K_M") == round((5.5 * (matrices - output) + 8.5 * output + 32 * vectors) / 8)
    assert [gguf_weight_bytes(model, q) for q in GGUF_QUANTS] == sorted(
        (gguf_weight_bytes(model, q) for q in GGUF_QUANTS), reverse=True)


def _preflight_stage(recipe):
    """The preflight stage as `edgedistill run` runs it, and the recipe view its function gets."""
    from edgedistill.pipeline import Pipeline
    from edgedistill.stages import stages_for

    stages = stages_for(recipe)
    stage = next(s for s in stages if s.name == "preflight")
    return stage, Pipeline(stages, recipe, Path("unused")).view(stage)


@pytest.mark.parametrize("budget_mb, warned", [(1, True), (100_000, False)])
@pytest.mark.integration
def test_preflight_warns_only_when_the_student_cannot_fit(budget_mb, warned, tiny_teacher, tmp_path, capsys):
    import json

    from edgedistill.layout import PREFLIGHT_JSON
    from edgedistill.recipe import load_recipe

    (tmp_path / "board.yaml").write_text(f"name: board\ncontext_length: 4096\nbudgets:\n  max_memory_mb: {budget_mb}\n")
    recipe = load_recipe(_tiny_recipe_file(tmp_path, "board.yaml"))
    stage, view = _preflight_stage(recipe)
    out = tmp_path / "preflight"
    out.mkdir()
    summary = stage.fn(view, out, teacher=tiny_teacher)  # reads only the sections the stage declares
    result = json.loads((out / PREFLIGHT_JSON).read_text())
    printed = capsys.readouterr().out
    assert "preflight for target board (context 4096 tokens, memory budget" in printed
    # teacher F16 + Q4_K_M, student F16 + Q8_0 + Q4_K_M: one line each
    assert [(r["model"], r["type"]) for r in result["rows"]] == [
        ("teacher", "F16"), ("teacher", "Q4_K_M"), ("student", "F16"), ("student", "Q8_0"), ("student", "Q4_K_M")]
    assert all(f"| {r['model']:<7} | {r['type']:<6} |" in printed for r in result["rows"])
    assert ("WARNING" in printed) is warned
    assert summary == {"target": "board",
                       "does_not_fit": ["student-q8_0.gguf", "student-q4_k_m.gguf"] if warned else []}
    if warned:
        assert "WARNING: student-q4_k_m.gguf does not fit board" in printed
        assert "student.keep_layers: 2" in printed and "shorter context" in printed and "4096 tokens" in printed
        assert all(r["fits"] is False for r in result["rows"])


@pytest.mark.unit
def test_preflight_is_a_stage_between_the_teacher_and_the_long_stages(tmp_path):
    from edgedistill.recipe import BenchConfig, load_recipe
    from edgedistill.stages import stages_for

    recipe = load_recipe(TINY)
    assert "preflight" not in [s.name for s in stages_for(recipe)]
    with_target = recipe.model_copy(update={"bench": BenchConfig(target="phone-8gb")})
    names = [s.name for s in stages_for(with_target)]
    assert names[:3] == ["teacher", "preflight", "generate"]
    stage, _ = _preflight_stage(with_target)
    assert stage.inputs == ("teacher",)
    # the report shows its estimate beside the bench rows' checks
    assert "preflight" in next(s for s in stages_for(with_target) if s.name == "report").inputs


@pytest.mark.parametrize("target", ["phone-8gb", None])
@pytest.mark.unit
def test_bench_stage_adds_the_target_checks_to_each_row(target, tmp_path, monkeypatch):
    import json

    from edgedistill.bench import latency
    from edgedistill.recipe import BenchConfig, load_recipe
    from edgedistill.records import BenchRow

    recipe = load_recipe(TINY).model_copy(update={"bench": BenchConfig(target=target)})
    monkeypatch.setattr(latency, "gguf_artifacts", lambda *folders: [])
    monkeypatch.setattr(latency, "bench_many", lambda artifacts, cfg: [BenchRow.from_dict(BENCH)])
    result = latency.bench_stage(recipe, tmp_path, teacher_gguf=tmp_path, export=tmp_path)
    row = json.loads((tmp_path / "bench.json").read_text())[0]
    if target is None:
        assert "target" not in row and result == {"artifacts": 1}
        return
    phone = load_target("phone-8gb")
    assert row["target"] == {"name": "phone-8gb", "checks": check_target(phone, BENCH)}
    assert result == {"artifacts": 1, "target": "phone-8gb", "target_failed": []}


@pytest.mark.unit
def test_report_device_target_table_takes_quality_from_eval_and_cites_the_preflight(tmp_path):
    from edgedistill.report.data import RunData
    from edgedistill.report.markdown import render_markdown
    from edgedistill.report.tables import target_table

    checks = check_target(TARGET, BENCH)
    row = {**BENCH, "target": {"name": "t", "checks": checks}, "task_score": 0.9, "share_of_reference": 0.9}
    preflight_json = {"target": "t", "context_length": 2048,
                      "rows": [{"artifact": "m-Q4_K_M.gguf", "estimate_mb": 321.5}]}
    data = RunData("run", None, [row], None, [row], {}, preflight=preflight_json)
    table = target_table(data)
    assert table.header == ["artifact", "peak RSS MB ≤ 400", "file MB ≤ 100", "TTFT ms ≤ 500",
                            "decode tok/s ≥ 20", "% of teacher ≥ 85", "preflight estimate MB", "result"]
    assert table.rows == [["`m-Q4_K_M.gguf`", "500.0 (**FAIL**)", "80.0 (pass)", "250.0 (pass)", "15.0 (**FAIL**)",
                           "90.0 (pass)", "321.5", "**FAIL**"]]
    assert "preflight.json: rows[].estimate_mb" in table.source
    assert "## Device target: t" in render_markdown(data)
    assert target_table(RunData("run", None, [BENCH], None, [BENCH], {})) is None
