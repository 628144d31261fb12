"""The export check after the teacher stage (edgedistill.export.check): the exporters' config rules,
run on the teacher and on the config the student will have, before any generation or training.

    .venv/bin/python -m pytest -q tests/test_export_preflight.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_model, tiny_config

from edgedistill.errors import EdgedistillError
from edgedistill.export.check import check_exports, planned_exports
from edgedistill.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
# a rope scaling the GGUF exporter refuses (it writes linear and llama3 ones)
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# SmolLM2-135M-Instruct's shape, the default recipe's teacher
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0)


def recipe_with(path: Path = ROOT / "recipes" / "tiny.yaml", **sections) -> Recipe:
    """A shipped recipe with some sections' fields replaced (paths stay relative to recipes/)."""
    raw = load_recipe(path).model_dump()
    for section, fields in sections.items():
        merge = raw.get(section) is not None and isinstance(fields, dict)
        raw[section] = {**raw[section], **fields} if merge else fields
    return Recipe.model_validate(raw)


def config_folder(folder: Path, model_type: str = "llama", **overrides) -> Path:
    """A teacher folder holding only config.json: all the check reads."""
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    folder.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("vocab_size", 450)  # without training the tiny tokenizer for its size
    config = tiny_config(model_type, architectures=[architecture], **overrides)
    (folder / "config.json").write_text(config.to_json_string())
    return folder


@pytest.mark.integration
def test_a_yarn_rope_teacher_stops_the_run_before_generate(tmp_path):
    from edgedistill.pipeline import Pipeline
    from edgedistill.stages import stages_for

    teacher = make_tiny_model(tmp_path / "yarn", rope_scaling=YARN_ROPE)
    recipe = recipe_with(teacher={"source": str(teacher), "random": None, "tokenizer": None})
    run = tmp_path / "run"
    for attempt in ("running", "up to date"):  # the check also runs when the teacher stage is skipped
        logged: list[str] = []
        with pytest.raises(EdgedistillError, match="rope_scaling") as error:
            Pipeline(stages_for(recipe), recipe, run, log=logged.append).run()
        assert any(line.startswith(f"[teacher] {attempt}") for line in logged), logged
        assert not (run / "generate").exists() and not list((run / ".partial").glob("generate*"))
        problem = error.value.problem
        assert "teacher_gguf: teacher GGUF" in problem and "export: student GGUF" in problem
        assert "export_onnx" not in problem  # the ONNX paths take rope scaling
        assert "teacher.source" in error.value.hint


@pytest.mark.unit
def test_only_the_exports_the_run_makes_are_checked(tmp_path):
    yarn = config_folder(tmp_path / "yarn", rope_scaling=YARN_ROPE)
    config = json.loads((yarn / "config.json").read_text())
    recipe = recipe_with(export={"onnx": ["int4", "fp16"]})
    rules = {(e.role, e.format): e.rule for e in planned_exports(recipe)}
    assert list(rules) == [("teacher", "GGUF"), ("student", "GGUF"), ("student", "ONNX int4"), ("student", "ONNX fp16")]
    with pytest.raises(EdgedistillError, match="rope_scaling"):
        rules["student", "GGUF"](config, "config.json")
    rules["student", "ONNX int4"](config, "config.json")  # a GGUF-only rule does not hold back an ONNX export
    # a run that goes no further than export_onnx (--to) makes no GGUF file of the teacher
    stages = ("teacher", "generate", "logits", "student", "distill", "export_onnx")
    assert check_exports(recipe, yarn, stages) == ["export_onnx: student ONNX int4", "export_onnx: student ONNX fp16"]
    assert check_exports(recipe, yarn, ("teacher", "generate")) == []
    # without export.onnx there is no ONNX export to check
    assert [e.format for e in planned_exports(recipe_with(export={"onnx": []}))] == ["GGUF", "GGUF"]


@pytest.mark.integration
def test_the_tiny_recipe_passes_on_its_teacher(tmp_path):
    from edgedistill.stages import teacher_stage

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    teacher_stage(recipe, teacher)
    assert check_exports(recipe, teacher) == [
        "teacher_gguf: teacher GGUF", "export: student GGUF", "export_onnx: student ONNX int4"]


@pytest.mark.unit
def test_the_default_recipe_passes_on_a_smollm2_shaped_teacher(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    teacher = config_folder(tmp_path / "teacher", **SMOLLM2_135M)
    assert check_exports(recipe, teacher) == [
        "teacher_gguf: teacher GGUF", "export: student GGUF", "export_onnx: student ONNX int4"]


@pytest.mark.unit
def test_a_qwen2_student_with_pruned_heads_names_the_width_field(tmp_path):
    teacher = config_folder(tmp_path / "qwen2", "qwen2")
    depth_only = recipe_with(student={"keep_layers": 1})
    assert "export: student GGUF" in check_exports(depth_only, teacher)
    pruned = recipe_with(student={"keep_layers": 1, "width": {"num_attention_heads": 2}})
    with pytest.raises(EdgedistillError, match=r"export: student GGUF: .*`head_dim`.*qwen2") as error:
        check_exports(pruned, teacher)
    assert "teacher_gguf" not in error.value.problem  # the teacher itself exports
    assert error.value.hint.startswith("change student.width.num_attention_heads")


@pytest.mark.unit
def test_lora_targets_a_gguf_lora_cannot_carry_are_refused(tmp_path):
    teacher = config_folder(tmp_path / "teacher")
    recipe = recipe_with(lora={"target_modules": ["q_proj", "embed_tokens"]})
    with pytest.raises(EdgedistillError, match=r"GGUF LoRA: .*\['embed_tokens'\]") as error:
        check_exports(recipe, teacher)
    assert "lora.target_modules" in error.value.hint


@pytest.mark.unit
def test_the_check_adds_no_stage_and_rides_on_the_teacher_stage():
    from edgedistill.stages import stages_for

    stages = stages_for(load_recipe(ROOT / "recipes" / "tiny.yaml"))
    assert [s.name for s in stages] == ["teacher", "generate", "logits", "student", "distill", "export", "export_onnx",
                                        "teacher_gguf", "bench", "eval", "report"]
    assert stages[0].check is not None and all(s.check is None for s in stages[1:])
