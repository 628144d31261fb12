"""Task kinds beyond labels (issue 14): examples from templates over any field, chat rows and
references; the generate stage's extraction filter; eval's scorers with intervals.

    python -m pytest -q tests/test_tasks.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import random_teacher_recipe

from edgedistill import layout
from edgedistill.data.generate import build_rows
from edgedistill.data.prompts import check_data, heldout_record, load_examples, task_file
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate import task
from edgedistill.recipe import SCORER_NAMES, load_recipe

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
          "required": ["city", "year"]}


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def rows_file(folder: Path, rows: list[dict]) -> Path:
    return write(folder, "data.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def recipe_with(folder: Path, task_yaml: str, rows: list[dict], data_extra: str = "") -> Path:
    rows_file(folder, rows)
    text = random_teacher_recipe(name="t", prompt="unused {text}", data="{prompts: data.jsonl" + data_extra + "}",
                                 generate="{max_new_tokens: 8}")
    start, end = text.index("task:"), text.index("data:")
    return write(folder, "recipe.yaml", text[:start] + task_yaml + text[end:])


QA = [{"question": f"q{i}", "context": f"c{i}", "answer": f"a{i}"} for i in range(5)]


@pytest.mark.unit
def test_the_scorer_lists_agree():
    from edgedistill.evaluate.scorers import NAMES

    assert set(SCORER_NAMES) == set(NAMES)


@pytest.mark.unit
def test_generation_examples_fill_any_field_and_carry_their_reference(tmp_path):
    path = recipe_with(tmp_path, 'task:\n  kind: generation\n  system: "You answer from {context}."\n'
                                 '  prompt: "Question: {question}"\n', QA + [{"question": "q5", "context": "c5"}])
    examples = load_examples(load_recipe(path))
    assert examples[0].messages == [{"role": "system", "content": "You answer from c0."},
                                    {"role": "user", "content": "Question: q0"}]
    assert [ex.reference for ex in examples] == ["a0", "a1", "a2", "a3", "a4", None]  # references are optional
    assert examples[0].label is None and examples[0].where == "data.jsonl:1"


@pytest.mark.unit
def test_a_missing_template_field_names_the_example_and_the_field(tmp_path):
    path = recipe_with(tmp_path, 'task:\n  kind: generation\n  prompt: "{question} {context}"\n',
                       QA[:2] + [{"question": "q"}])
    with pytest.raises(EdgedistillError) as info:
        check_data(load_recipe(path))
    assert "1 of 3 examples cannot fill task.prompt" in info.value.problem
    assert "data.jsonl:3: the prompt uses {context}, which this example does not have (it has: question)" \
        in info.value.problem


@pytest.mark.unit
def test_chat_rows_keep_their_conversation_and_their_last_answer_is_the_reference(tmp_path):
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                           {"role": "assistant", "content": f"Hello {i}"}]} for i in range(3)]
    path = recipe_with(tmp_path, "task:\n  kind: generation\n", chats)
    examples = load_examples(load_recipe(path))
    assert examples[1].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 1"}]
    assert examples[1].reference == "Hello 1"


@pytest.mark.unit
def test_the_classification_prompt_is_what_it_was(tmp_path):
    # the default recipe's prompts, byte for byte: {text} filled with the stripped text
    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "sentiment.jsonl").read_text().splitlines()]
    for example, row in zip(load_examples(recipe), rows):
        assert example.messages == [{"role": "user", "content": recipe.task.prompt.replace("{text}", row["text"].strip())}]
        assert example.label == row["label"]
        assert set(heldout_record(recipe, example)) == {"id", "messages", "label", "choices"}
    assert task_file(recipe) is None  # so the generate stage's files, and every key after it, are unchanged


@pytest.mark.unit
def test_extraction_keeps_only_answers_that_follow_the_schema(tmp_path):
    rows = [{"text": f"t{i}", "answer": {"city": "Paris", "year": 1889}} for i in range(3)]
    path = recipe_with(tmp_path, f'task:\n  kind: extraction\n  prompt: "Extract: {{text}}"\n  schema: {json.dumps(SCHEMA)}\n',
                       rows)
    recipe = load_recipe(path)
    examples = load_examples(recipe)
    done = {(0, 0): {"answer": '{"city": "Paris", "year": 1889}', "finished": True},
            (1, 0): {"answer": 'Sure! ```json\n{"city": "Rome", "year": 2000}\n```', "finished": True},
            (2, 0): {"answer": '{"city": "Paris"}', "finished": True}}  # no year: not the schema's
    kept, counts = build_rows(recipe, examples, done)
    assert [row["id"] for row in kept] == [0, 1] and counts["dropped_failed_format"] == 1
    assert task_file(recipe)["schema"] == SCHEMA and task_file(recipe)["kind"] == "extraction"


@pytest.mark.unit
def test_a_schema_that_is_not_json_schema_stops_the_run_before_any_work(tmp_path):
    write(tmp_path, "schema.json", json.dumps({"type": "objekt"}))
    path = recipe_with(tmp_path, 'task:\n  kind: extraction\n  prompt: "{text}"\n  schema: schema.json\n',
                       [{"text": "a"}, {"text": "b"}])
    with pytest.raises(EdgedistillError, match="JSON Schema is not valid at type"):
        check_data(load_recipe(path))


class ScriptedRuntime:
    """Answers each prompt with the text a table gives for it."""

    context_length = None

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def prompt_ids(self, messages, *, add_generation_prompt=True):
        return [0]

    def generate(self, conversations, max_new_tokens):
        return [(self.answers.get(c[-1]["content"], ""), True) for c in conversations]


@pytest.mark.unit
def test_eval_scores_generation_with_every_scorer_and_an_interval(tmp_path, monkeypatch):
    run = tmp_path / "generate"
    run.mkdir()
    records = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}], "reference": f"the answer is {i}"}
               for i in range(40)]
    (run / layout.HELDOUT_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / layout.TASK_JSON).write_text(json.dumps({"kind": "generation", "labels": None, "schema": None,
                                                    "scorers": None}))
    teacher = ScriptedRuntime({f"q{i}": f"the answer is {i}" for i in range(40)})
    student = ScriptedRuntime({f"q{i}": f"the answer is {i}" if i % 4 else "no idea" for i in range(40)})
    monkeypatch.setattr(task, "_open", lambda artifact, device, dtype: teacher if artifact.name == "teacher" else student)
    report = task.evaluate([tmp_path / "student"], run / layout.HELDOUT_JSONL, tmp_path / "teacher",
                           max_new_tokens=8, score_records=0).to_dict()
    ref, row = report["reference"], report["artifacts"][0]
    assert set(row["scores"]) == {"chrf", "rouge_l", "exact_match"}
    assert ref["scores"]["exact_match"]["mean"] == 1.0 and row["scores"]["exact_match"]["mean"] == 0.75
    assert row["task_score"] == row["scores"]["chrf"]["mean"] < 1  # the first scorer is the task score
    low, high = row["scores"]["exact_match"]["low"], row["scores"]["exact_match"]["high"]
    assert 0.55 < low < 0.75 < high <= 0.9  # 30 of 40: a wide interval
    assert row["share_of_reference_interval"][0] < row["share_of_reference"] <= row["share_of_reference_interval"][1]
    assert row["within_noise_of_reference"] is False
    assert row["answers"][0] == {"id": 0, "answer": "no idea", "reference": "the answer is 0"}


@pytest.mark.unit
def test_classification_eval_keeps_its_numbers_and_gains_intervals(tmp_path, monkeypatch):
    records = [{"id": i, "messages": [{"role": "user", "content": f"r{i}"}], "label": "positive" if i % 2 else "negative",
                "choices": ["positive", "negative"]} for i in range(10)]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    model = ScriptedRuntime({f"r{i}": "positive" for i in range(10)})
    monkeypatch.setattr(task, "_open", lambda artifact, device, dtype: model)
    row = task.evaluate([tmp_path / "m"], data, None, max_new_tokens=4).to_dict()["artifacts"][0]
    assert (row["correct"], row["unparsed"], row["task_score"]) == (5, 0, 0.5)
    assert row["scores"]["label"]["mean"] == 0.5 and row["scores"]["label"]["n"] == 10


@pytest.mark.integration
def test_a_generation_recipe_runs_end_to_end(tmp_path, capsys):
    from edgedistill.cli import main

    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(16)]
    path = recipe_with(tmp_path, 'task:\n  kind: generation\n  prompt: "Answer briefly. {question}"\n', rows,
                       ", heldout_fraction: 0.25")
    path.write_text(path.read_text() + "distill: {epochs: 1}\nexport: {quants: [Q8_0]}\n"
                    "bench: {prompt_tokens: 16, gen_tokens: 4, repetitions: 1}\neval: {max_new_tokens: 8, score_records: 2}\n")
    run = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run)]) == 0
    assert json.loads((run / "generate" / layout.TASK_JSON).read_text())["kind"] == "generation"
    report = json.loads((run / "eval" / layout.EVAL_JSON).read_text())
    for row in [report["reference"], *report["artifacts"]]:
        assert set(row["scores"]) == {"chrf", "rouge_l", "exact_match"} and row["scores"]["chrf"]["n"] == 4
        assert row["task_score"] == row["scores"]["chrf"]["mean"] and "correct" not in row
    assert "(chrf over 4)" in (run / "report" / "report.md").read_text()
