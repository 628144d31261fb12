"""Recipes: every shipped recipe loads; broken ones fail naming the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe, load_recipe, section_dump

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"default.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.resolve(recipe.data.prompts).is_file()


def test_default_student_is_at_most_half_the_teacher():
    # SmolLM2-135M: 30 blocks of 3.54 M parameters plus 28.3 M of tied embeddings.
    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    kept = recipe.student.keep_layers
    student = 28.3e6 + 3.54e6 * (kept if isinstance(kept, int) else len(kept))
    assert student <= 0.5 * 134.5e6


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data.jsonl").write_text('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


GOOD = """
name: t
task:
  labels: [positive, negative]
  prompt: "Sentiment? {text}"
data:
  prompts: data.jsonl
student:
  method: prune
  keep_layers: 1
"""


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert recipe.teacher.source == "smollm2-135m-instruct"
    assert recipe.distill.epochs > 0
    assert recipe.resolve(recipe.data.prompts) == (tmp_path / "data.jsonl").resolve()


@pytest.mark.parametrize("mutation, expected", [
    (lambda t: t.replace("keep_layers", "keep_layer"), ["student.keep_layer", "unknown key"]),
    (lambda t: t + "distill:\n  epochs: -1\n", ["distill.epochs", "greater than 0", "-1"]),
    (lambda t: t + "distill:\n  kl_weight: 2\n", ["distill.kl_weight", "less than or equal to 1"]),
    (lambda t: t + "export:\n  quants: [Q3_XXL]\n", ["export.quants", "Q3_XXL"]),
    (lambda t: t.replace("task:\n", "task:\n  kind: generation\n"), ["task", "labels only apply to kind classification"]),
    (lambda t: t.replace("  labels: [positive, negative]\n", ""), ["task", "classification task needs labels"]),
    (lambda t: t.replace("task:\n  labels: [positive, negative]\n", "task:\n  kind: extraction\n"),
     ["task", "extraction task needs schema"]),
    (lambda t: t.replace("task:\n", "task:\n  scorers: [regex]\n"), ["task.scorers.0", "regex scorer needs it"]),
    (lambda t: t.replace("task:\n", "task:\n  scorers: [bleu]\n"), ["task.scorers.0.name", "'label'", "'chrf'"]),
    (lambda t: t.replace("data.jsonl", "missing.jsonl"), ["data.prompts", "missing.jsonl", "does not exist"]),
    (lambda t: t.replace("  method: prune\n  keep_layers: 1\n", "  method: prune\n"), ["needs keep_layers"]),
    (lambda t: t + "colour: blue\n", ["colour", "unknown key"]),
    (lambda t: t.replace("name: t", "name: [t"), ["not valid YAML"]),
])
def test_broken_recipes_name_file_field_and_reason(tmp_path, mutation, expected):
    path = _write(tmp_path, mutation(GOOD))
    with pytest.raises(EdgedistillError) as error:
        load_recipe(path)
    message = str(error.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_model_sources_are_relative_to_the_recipe_when_they_are_there(tmp_path, monkeypatch):
    recipe = load_recipe(_write(tmp_path, GOOD))
    (tmp_path / "models" / "student").mkdir(parents=True)
    monkeypatch.chdir(tmp_path.parent)
    assert recipe.source("models/student") == str(tmp_path / "models" / "student")
    # Not a path beside the recipe: a built-in name, or a path from the working folder, as given.
    assert recipe.source("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_progressive_needs_a_pruned_student(tmp_path):
    text = GOOD.replace("  method: prune\n  keep_layers: 1\n", "  method: config\n  config: {num_hidden_layers: 1}\n")
    with pytest.raises(EdgedistillError, match="progressive distillation prunes"):
        load_recipe(_write(tmp_path, text + "progressive:\n  steps:\n    - keep_layers: 2\n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(EdgedistillError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_section_dump_takes_sections_and_fields(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    dumped = section_dump(recipe, ("seed", "distill.topk", "student"))
    assert dumped["seed"] == 0
    assert dumped["distill.topk"] == recipe.distill.topk
    assert dumped["student"]["keep_layers"] == 1
