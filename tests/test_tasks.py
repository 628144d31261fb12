"""Task kinds beyond labels (issue 14): examples from templates over any field, chat rows and
references; the generate stage's extraction filter; eval's scorers with intervals; teacher-built
references (in eval, and built from a prompt file by `edgedistill eval --build-references`); the
PyTorch student's eval row.

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
    # the distilled student in PyTorch is a row of its own, before its exports
    names = [row["artifact"] for row in report["artifacts"]]
    assert names == ["teacher-f16.gguf", "teacher-q4_k_m.gguf", "student (PyTorch)/", "student-f16.gguf",
                     "student-q8_0.gguf"]
    assert report["artifacts"][2]["path"] == str(run / "distill")
    markdown = (run / "report" / "report.md").read_text()
    assert "(chrf over 4)" in markdown and "## Scores by scorer" in markdown
    for row in report["artifacts"]:
        low, high = row["task_score_interval"]
        cell = f"{row['task_score']:.3f} [{low:.2f}, {high:.2f}]"  # the task score with its interval
        assert cell in next(line for line in markdown.splitlines() if line.startswith(f"| `{row['artifact']}` |"))


def heldout_file(folder: Path, records: list[dict], task_json: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / layout.HELDOUT_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records))
    if task_json is not None:
        (folder / layout.TASK_JSON).write_text(json.dumps(task_json))
    return folder / layout.HELDOUT_JSONL


GENERATION_TASK = {"kind": "generation", "labels": None, "schema": None, "scorers": None}
# q0..q19 carry gold, q20..q39 none; the teacher gets half the gold right and answers every prompt
HALF_GOLD = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}],
              **({"reference": f"the answer is {i}"} if i < 20 else {})} for i in range(40)]
HALF_RIGHT_TEACHER = {f"q{i}": f"the answer is {i}" if i % 2 or i >= 20 else f"maybe {i}" for i in range(40)}


@pytest.mark.unit
def test_the_teachers_answers_become_references_where_there_is_no_gold(tmp_path, monkeypatch):
    data = heldout_file(tmp_path / "generate", HALF_GOLD, GENERATION_TASK)
    teacher = ScriptedRuntime(HALF_RIGHT_TEACHER)
    student = ScriptedRuntime({f"q{i}": f"the answer is {i}" for i in range(40)})  # gold-perfect, teacher-like
    monkeypatch.setattr(task, "_open", lambda artifact, device, dtype: teacher if artifact.name == "teacher" else student)
    report = task.evaluate([tmp_path / "student"], data, tmp_path / "teacher", max_new_tokens=8,
                           score_records=0).to_dict()
    ref, row = report["reference"], report["artifacts"][0]
    assert report["teacher_built_references"] == 20 and "unusable_teacher_answers" not in report
    # the reference is scored on the gold half alone: its agreement with gold, not with itself
    assert ref["scores"]["exact_match"]["n"] == 20 and ref["scores"]["exact_match"]["mean"] == 0.5
    assert ref["agreement_with_gold"]["exact_match"]["mean"] == 0.5 and ref["agreement_with_gold"]["chrf"]["n"] == 20
    assert set(ref["agreement_with_gold"]) == {"chrf", "rouge_l", "exact_match"}
    # the student is scored on all 40: 20 against gold, 20 against the teacher's answers
    exact = row["scores"]["exact_match"]
    assert (exact["n"], exact["n_gold"], exact["n_teacher_built"], exact["mean"]) == (40, 20, 20, 1.0)
    # its share of the teacher over the 20 examples both are scored on: 1.0 / 0.5 on exact match, and
    # on chrf (the task score) above 1 with an interval around it
    assert row["share_of_reference"] > 1 and row["share_of_reference_interval"][0] <= row["share_of_reference"]
    assert row["answers"][25] == {"id": 25, "answer": "the answer is 25", "reference": "the answer is 25",
                                  "reference_source": "teacher"}
    assert row["answers"][5] == {"id": 5, "answer": "the answer is 5", "reference": "the answer is 5"}
    assert "teacher-built references: 20 of 40" in task.format_eval(task.EvalReport.from_dict(report))


@pytest.mark.unit
def test_without_a_reference_records_without_gold_are_skipped(tmp_path, monkeypatch):
    data = heldout_file(tmp_path / "generate", HALF_GOLD, GENERATION_TASK)
    monkeypatch.setattr(task, "_open", lambda artifact, device, dtype: ScriptedRuntime(HALF_RIGHT_TEACHER))
    report = task.evaluate([tmp_path / "m"], data, None, max_new_tokens=8).to_dict()
    exact = report["artifacts"][0]["scores"]["exact_match"]
    assert (exact["n"], exact["skipped_no_reference"], exact["mean"]) == (20, 20, 0.5)
    assert "n_gold" not in exact and "teacher_built_references" not in report
    assert report["artifacts"][0]["task_score_interval"][0] < report["artifacts"][0]["task_score"]


@pytest.mark.unit
def test_an_extraction_reference_is_the_teachers_json_when_it_follows_the_schema(tmp_path, monkeypatch):
    records = [{"id": i, "messages": [{"role": "user", "content": f"e{i}"}]} for i in range(3)]
    data = heldout_file(tmp_path / "generate", records, {"kind": "extraction", "labels": None, "schema": SCHEMA,
                                                         "scorers": None})
    teacher = ScriptedRuntime({"e0": 'Here: {"city": "Paris", "year": 1889}', "e1": '{"city": "Rome"}', "e2": ""})
    student = ScriptedRuntime({"e0": '{"city": "paris", "year": 1889}', "e1": '{"city": "Rome", "year": 1}'})
    monkeypatch.setattr(task, "_open", lambda artifact, device, dtype: teacher if artifact.name == "teacher" else student)
    report = task.evaluate([tmp_path / "student"], data, tmp_path / "teacher", max_new_tokens=8,
                           score_records=0).to_dict()
    row = report["artifacts"][0]
    assert report["teacher_built_references"] == 1 and report["unusable_teacher_answers"] == 2
    assert row["answers"][0]["reference"] == {"city": "Paris", "year": 1889}  # the JSON value, not the text
    assert row["scores"]["json_fields"]["mean"] == 1.0 and row["scores"]["json_fields"]["n_teacher_built"] == 1
    assert row["scores"]["json_parse"]["n"] == 3  # a scorer that needs no reference scores every example
    assert "agreement_with_gold" not in report["reference"]  # no gold to agree with


def scripted_models(monkeypatch, tables: dict[str, dict[str, str]]) -> None:
    """`_open` gives each artifact, by its name, the scripted answers of `tables`."""
    monkeypatch.setattr(task, "_open", lambda artifact, device, dtype: ScriptedRuntime(tables[artifact.name]))


@pytest.mark.unit
def test_eval_builds_a_reference_set_from_prompts_alone_and_scores_models_on_it_later(tmp_path, monkeypatch, capsys):
    from edgedistill.cli import main

    prompts = write(tmp_path, "prompts.jsonl", "".join(json.dumps(row) + "\n" for row in [
        {"text": "q0", "answer": "the answer is 0"}, {"text": "q1", "answer": "the answer is 1"},
        {"text": "q2"}, {"text": "q3"}, {"text": "q4"}]))
    for model in ("teacher", "student"):
        (tmp_path / model).mkdir()
    scripted_models(monkeypatch, {"teacher": {"q0": "the answer is 0", "q1": "no", "q2": "two", "q3": "", "q4": "four"},
                                  "student": {"q0": "the answer is 0", "q2": "two", "q4": "five"}})
    saved, summary = tmp_path / "set" / "heldout.jsonl", tmp_path / "built.json"
    assert main(["eval", "--build-references", str(prompts), "--reference", str(tmp_path / "teacher"),
                 "--save", str(saved), "--json", str(summary)]) == 0
    printed = capsys.readouterr().out
    assert "5 held-out records, 2 with a gold reference, 2 with teacher/'s answer as theirs" in printed
    assert "1 without a reference" in printed and "agreement with the 2 gold references" in printed
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert records[0] == {"id": 0, "messages": [{"role": "user", "content": "q0"}], "reference": "the answer is 0"}
    assert records[2]["reference"] == "two" and records[2]["reference_source"] == "teacher"
    assert "reference" not in records[3]  # the teacher's empty answer is no reference
    assert json.loads((saved.parent / layout.TASK_JSON).read_text())["kind"] == "generation"
    built = json.loads(summary.read_text())
    assert built["teacher_built_references"] == 2 and built["agreement_with_gold"]["exact_match"]["mean"] == 0.5

    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "student"), "--data", str(saved), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    exact = report["artifacts"][0]["scores"]["exact_match"]
    assert report["teacher_built_references"] == 2
    assert (exact["n_gold"], exact["n_teacher_built"], exact["skipped_no_reference"]) == (2, 2, 1)
    # with the teacher again as reference: it is scored on the gold records only, the saved references stay
    assert main(["eval", str(tmp_path / "student"), "--data", str(saved), "--reference", str(tmp_path / "teacher"),
                 "--score-records", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["reference"]["scores"]["exact_match"]["n"] == 2 and report["teacher_built_references"] == 2
    assert report["unusable_teacher_answers"] == 1  # q3: the teacher answers it empty again
    assert report["reference"]["agreement_with_gold"]["exact_match"] == {"mean": 0.5, "low": 0.0, "high": 1.0, "n": 2}


@pytest.mark.unit
def test_building_references_refuses_what_it_cannot_do(tmp_path, monkeypatch, capsys):
    from edgedistill.cli import main

    prompts = write(tmp_path, "prompts.txt", "q0\nq1\n")
    (tmp_path / "teacher").mkdir()
    scripted_models(monkeypatch, {"teacher": {"q0": "zero", "q1": "one"}})
    base = ["eval", "--build-references", str(prompts), "--reference", str(tmp_path / "teacher")]
    cases = [(base, "needs --save"),
             (base + ["--save", str(prompts)], "exists"),
             (base + ["--save", str(tmp_path / "set.json")], "a held-out set is a .jsonl file"),
             (base + [str(tmp_path / "teacher"), "--save", str(tmp_path / "x.jsonl")], "it scores no model"),
             (base + ["--save", str(tmp_path / "x.jsonl"), "--recipe", str(ROOT / "recipes" / "default.yaml")],
              "a classification task is scored against gold labels"),
             (["eval", str(tmp_path / "teacher"), "--data", str(prompts), "--save", str(tmp_path / "y.jsonl")],
              "--save only apply to --build-references")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "x.jsonl").exists()
    assert main(base + ["--save", str(tmp_path / "x.jsonl")]) == 0  # a .txt line is a {text} prompt
    saved = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert [record["reference"] for record in saved] == ["zero", "one"]


@pytest.mark.unit
def test_references_built_through_a_recipe_use_its_template_and_schema(tmp_path, monkeypatch):
    from edgedistill.cli import main

    path = recipe_with(tmp_path, f'task:\n  kind: extraction\n  prompt: "Extract: {{text}}"\n  schema: {json.dumps(SCHEMA)}\n',
                       [{"text": "unused"}, {"text": "unused"}])
    prompts = rows_file(tmp_path / "new", [{"text": "a"}, {"text": "b", "answer": {"city": "Oslo", "year": 1048}}])
    (tmp_path / "teacher").mkdir()
    scripted_models(monkeypatch, {"teacher": {"Extract: a": '{"city": "Rome", "year": 2000}',
                                              "Extract: b": '{"city": "Oslo", "year": 1048}'}})
    saved = tmp_path / "set" / "heldout.jsonl"
    assert main(["eval", "--build-references", str(prompts), "--reference", str(tmp_path / "teacher"),
                 "--save", str(saved), "--recipe", str(path)]) == 0
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert records[0]["messages"] == [{"role": "user", "content": "Extract: a"}]
    assert records[0]["reference"] == {"city": "Rome", "year": 2000} and records[0]["reference_source"] == "teacher"
    assert records[1]["reference"] == {"city": "Oslo", "year": 1048} and "reference_source" not in records[1]
    assert json.loads((saved.parent / layout.TASK_JSON).read_text())["schema"] == SCHEMA
