"""The two task recipes on the embedded teacher (issue 14, item 7): recipes/past-tense.yaml
(generation) and recipes/contacts.yaml (extraction), their data and the generator that writes it.

    .venv/bin/python -m pytest -q tests/test_task_recipes.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from edgedistill.data.answers import schema_validator
from edgedistill.data.prompts import check_data, load_examples, split_examples, task_schema
from edgedistill.evaluate.scorers import ScoreInput, build_scorers, default_scorers, score_all
from edgedistill.recipe import load_recipe

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"past-tense": "generation", "contacts": "extraction"}
TEACHER_BLOCKS = 30  # SmolLM2-135M-Instruct


def _make_task_data():
    # tools/ is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location("make_task_data", ROOT / "tools" / "make_task_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=sorted(RECIPES))
def recipe(request):
    return load_recipe(ROOT / "recipes" / f"{request.param}.yaml")


def test_recipe_loads_with_its_kind_and_passes_the_data_checks(recipe):
    assert recipe.task.kind == RECIPES[recipe.name]
    assert recipe.teacher.source == "smollm2-135m-instruct"
    check_data(recipe)


def test_enough_examples_held_out_with_references(recipe):
    examples = load_examples(recipe)
    assert len(examples) >= 400
    train, heldout = split_examples(recipe, examples)
    assert len(heldout) >= 80
    assert sum(example.reference is not None for example in heldout) >= 40
    assert len({example.messages[-1]["content"] for example in examples}) == len(examples)  # no repeated prompt


def test_student_keeps_at_most_a_third_of_the_teacher_blocks(recipe):
    kept = recipe.student.keep_layers
    assert recipe.student.method == "prune"
    assert (kept if isinstance(kept, int) else len(kept)) * 3 <= TEACHER_BLOCKS


def test_gold_answers_score_full_marks_on_the_task_scorers(recipe):
    # a reference that its own task's scorers do not give 1 (a gold object outside the schema, a
    # field the scorers cannot compare) would make the teacher's agreement with gold meaningless
    examples = load_examples(recipe)
    scorers = build_scorers(recipe.task.scorers or default_scorers(recipe.task.kind), base_dir=recipe.base_dir,
                            allow_code=False, schema=task_schema(recipe), labels=None)
    answers = [ex.reference if isinstance(ex.reference, str) else json.dumps(ex.reference, ensure_ascii=False)
               for ex in examples]
    results = score_all(scorers, [ScoreInput(answer, ex.reference, {}) for answer, ex in zip(answers, examples)])
    assert {name: result.mean for name, result in results.items()} == {name: 1.0 for name in results}


def test_extraction_gold_objects_follow_the_schema():
    recipe = load_recipe(ROOT / "recipes" / "contacts.yaml")
    validator = schema_validator(task_schema(recipe))
    examples = load_examples(recipe)
    assert all(isinstance(example.reference, dict) for example in examples)
    invalid = [example.where for example in examples if not validator.is_valid(example.reference)]
    assert invalid == []
    # the schema is strict enough to refuse what the teacher gets wrong in form
    assert not validator.is_valid({"name": "Ana Costa", "city": "Porto", "email": "https://post.example/ana"})
    assert not validator.is_valid({"name": "Ana Costa", "city": "Porto", "email": "ana@post.example", "phone": "1"})


def test_generation_references_differ_from_their_inputs_almost_always():
    # copying the input must not already be the answer (a past tense like "read" may equal the present)
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "past-tense.jsonl").read_text().splitlines()]
    assert sum(row["text"] == row["answer"] for row in rows) <= 0.05 * len(rows)


def test_generator_reproduces_the_committed_data_byte_for_byte(tmp_path):
    written = _make_task_data().write_all(tmp_path)
    assert sorted(path.name for path in written) == ["contacts.jsonl", "past-tense.jsonl"]
    for path in written:
        assert path.read_bytes() == (ROOT / "recipes" / "data" / path.name).read_bytes(), path.name
