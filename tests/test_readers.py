"""Reading user data for any task (issue 14, item 1): JSONL, CSV, Parquet, plain text and folders
written by Hugging Face `datasets` read into the same rows; prompt templates with named fields;
rows that are already chat messages. Small files in tmp_path only.

    python -m pytest -q tests/test_readers.py
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgedistill.data.readers import Row, read_rows
from edgedistill.data.templates import ChatPrompt, chat_messages, check_template, render, template_fields
from edgedistill.errors import EdgedistillError

EXAMPLES = [
    {"question": "Where is the Louvre?", "context": "The Louvre is in Paris, France.", "answer": "Paris"},
    {"question": "Who wrote Hamlet?", "context": "Hamlet, the play by Shakespeare, was first staged c. 1600.",
     "answer": "Shakespeare"},
    {"question": "What is 2+2, \"exactly\"?", "context": "Arithmetic, with a comma.\nAnd a second line.",
     "answer": "4"},
]

try:
    import datasets
except ImportError:
    datasets = None
NEEDS_DATASETS = pytest.mark.skipif(datasets is None, reason="the test dependency `datasets` is not installed: "
                                    "the hand-written save_to_disk folders below still cover the format")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_saved_dataset(folder: Path, rows: list[dict], class_labels: dict[str, list[str]] | None = None) -> Path:
    """A folder laid out as datasets 5.0's `Dataset.from_list(rows).save_to_disk(folder)` writes it
    (checked against a real one): one Arrow IPC *stream* file, state.json naming it, and
    dataset_info.json; the schema carries datasets' b"huggingface" features metadata, which is where
    ClassLabel names live."""
    table = pa.Table.from_pylist(rows)
    features = {column: {"dtype": "string", "_type": "Value"} for column in table.column_names}
    for column, names in (class_labels or {}).items():
        features[column] = {"names": names, "_type": "ClassLabel"}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features}),
                                              encoding="utf-8")
    return folder


def write_format(kind: str, folder: Path, rows: list[dict]) -> Path:
    if kind == "jsonl":
        return write_jsonl(folder / "prompts.jsonl", rows)
    if kind == "csv":
        return write_csv(folder / "prompts.csv", rows)
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), folder / "prompts.parquet")
        return folder / "prompts.parquet"
    if kind == "saved":
        return write_saved_dataset(folder / "saved", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "saved"))
    return folder / "saved"


# the rows' names: a CSV record is named by the line it starts on (the third record spans two lines)
WHERE = {
    "jsonl": ["prompts.jsonl:1", "prompts.jsonl:2", "prompts.jsonl:3"],
    "csv": ["prompts.csv:2", "prompts.csv:3", "prompts.csv:4"],
    "parquet": ["prompts.parquet row 1", "prompts.parquet row 2", "prompts.parquet row 3"],
    "saved": ["saved row 1", "saved row 2", "saved row 3"],
    "datasets": ["saved row 1", "saved row 2", "saved row 3"],
}


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "saved",
                                  pytest.param("datasets", marks=NEEDS_DATASETS)])
def test_every_format_reads_the_same_rows(tmp_path, kind):
    rows = read_rows(write_format(kind, tmp_path, EXAMPLES))
    assert rows == [Row(where, example) for where, example in zip(WHERE[kind], EXAMPLES)]


@pytest.mark.unit
def test_a_text_file_is_one_prompt_a_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffWhere is the Louvre?\r\n\n   \n  Who wrote Hamlet?  \n".encode())
    assert read_rows(path, text_field="question") == [
        Row("prompts.txt:1", {"question": "Where is the Louvre?"}),
        Row("prompts.txt:4", {"question": "  Who wrote Hamlet?  "})]


@pytest.mark.unit
def test_parquet_keeps_nested_columns_as_python_values(tmp_path):
    rows = [{"question": "q", "tags": ["a", "b"], "meta": {"k": 1, "ok": True}, "score": 0.5}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "nested.parquet")
    assert read_rows(tmp_path / "nested.parquet")[0].fields == rows[0]


@pytest.mark.unit
def test_class_labels_come_back_as_their_names(tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "unlabelled", "label": -1}]
    folder = write_saved_dataset(tmp_path / "saved", rows, class_labels={"label": ["negative", "positive"]})
    assert [row.fields["label"] for row in read_rows(folder)] == ["positive", "negative", None]


@pytest.mark.unit
@NEEDS_DATASETS
def test_a_real_datasets_folder_in_shards_with_class_labels_and_nested_columns(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
                                  "tags": datasets.Sequence(datasets.Value("string"))})
    rows = [{"text": f"review {i}", "label": i % 2, "tags": ["t"] * (i % 3)} for i in range(10)]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "reviews"), num_shards=3)
    read = read_rows(tmp_path / "reviews")
    assert [row.where for row in read] == [f"reviews row {i}" for i in range(1, 11)]
    assert [row.fields for row in read] == [{**row, "label": ["neg", "pos"][row["label"]]} for row in rows]


@pytest.mark.unit
@pytest.mark.parametrize("real", [False, pytest.param(True, marks=NEEDS_DATASETS)])
def test_a_folder_of_splits_is_refused_naming_them(tmp_path, real):
    folder = tmp_path / "squad"
    if real:
        split = datasets.Dataset.from_list(EXAMPLES)
        datasets.DatasetDict(train=split, validation=split).save_to_disk(str(folder))
    else:
        folder.mkdir()
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
        for split in ("train", "validation"):
            write_saved_dataset(folder / split, EXAMPLES)
    with pytest.raises(EdgedistillError, match=r"holds several splits \(train, validation\)") as caught:
        read_rows(folder)
    assert caught.value.hint == f"point data.prompts at one split, e.g. {folder / 'train'}"
    assert len(read_rows(folder / "validation")) == 3


@pytest.mark.unit
def test_a_ragged_csv_row_is_named_by_its_line(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text('question,answer\n"two\nlines",ok\n\nQ2,A2,extra\n', encoding="utf-8")
    with pytest.raises(EdgedistillError, match=r"prompts\.csv:5: 3 cells where the header has 2 \(question, answer\)"):
        read_rows(path)
    path.write_text("question,answer\nQ1\n", encoding="utf-8")
    with pytest.raises(EdgedistillError, match=r"prompts\.csv:2: 1 cells where the header has 2"):
        read_rows(path)


@pytest.mark.unit
def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("question,question\na,b\n", encoding="utf-8")
    with pytest.raises(EdgedistillError, match=r"prompts\.csv:1: the CSV header names 'question' more than once"):
        read_rows(path)


@pytest.mark.unit
@pytest.mark.parametrize("name,content", [("prompts.jsonl", "\n\n"), ("prompts.csv", "question,answer\n"),
                                          ("prompts.txt", "\n  \n"), ("prompts.csv", "")])
def test_a_source_without_examples_is_refused(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(EdgedistillError, match=f"{name} holds no examples"):
        read_rows(tmp_path / name)


@pytest.mark.unit
def test_an_empty_saved_dataset_is_refused(tmp_path):
    folder = write_saved_dataset(tmp_path / "saved", EXAMPLES)
    (folder / "state.json").write_text(json.dumps({"_data_files": []}))
    with pytest.raises(EdgedistillError, match="saved holds no examples"):
        read_rows(folder)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["prompts.json", "prompts.xlsx", "prompts"])
def test_an_unknown_format_names_the_supported_ones(tmp_path, name):
    (tmp_path / name).write_text("{}", encoding="utf-8")
    with pytest.raises(EdgedistillError, match="cannot read") as caught:
        read_rows(tmp_path / name)
    assert ".jsonl, .csv, .parquet, .txt" in caught.value.hint and "save_to_disk" in caught.value.hint


@pytest.mark.unit
def test_broken_sources_are_refused_clearly(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(EdgedistillError, match=r"broken\.parquet: not a readable Parquet file"):
        read_rows(tmp_path / "broken.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(EdgedistillError, match="without state.json"):
        read_rows(tmp_path / "plain")
    folder = write_saved_dataset(tmp_path / "saved", EXAMPLES)
    (folder / "data-00000-of-00001.arrow").write_bytes(b"garbage")
    with pytest.raises(EdgedistillError, match=r"data-00000-of-00001\.arrow: not a readable Arrow stream"):
        read_rows(folder)
    with pytest.raises(EdgedistillError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    write_jsonl(tmp_path / "lists.jsonl", [EXAMPLES[0]])
    with open(tmp_path / "lists.jsonl", "a", encoding="utf-8") as handle:
        handle.write('["not", "an", "object"]\n')
    with pytest.raises(EdgedistillError, match=r"lists\.jsonl:2: not a JSON object"):
        read_rows(tmp_path / "lists.jsonl")


@pytest.mark.unit
def test_template_fields_are_the_names_in_order_once_each():
    assert template_fields("{context}\n\nQ: {question} (about {context}) {{literal}} {{{answer}}}") == [
        "context", "question", "answer"]
    assert template_fields("no fields, {{just braces}}") == []


@pytest.mark.unit
def test_render_fills_fields_and_keeps_literal_braces():
    fields = {"question": "Why?", "tags": ["a", "é"], "meta": {"k": 1}, "n": 3, "ok": True, "x": 0.5}
    assert render('Reply as {{"answer": ...}}. {question} {tags} {meta} {n} {ok} {x}', fields, "p.jsonl:1") == (
        'Reply as {"answer": ...}. Why? ["a", "é"] {"k": 1} 3 True 0.5')


@pytest.mark.unit
@pytest.mark.parametrize("template,shown", [("{a.b}", "{a.b}"), ("{a[0]}", "{a[0]}"), ("{a!r}", "{a!r}"),
                                            ("{a:>5}", "{a:>5}"), ('Reply as {"answer": 1}', '{"answer": 1}')])
def test_attribute_index_conversion_and_format_spec_are_refused(template, shown):
    with pytest.raises(EdgedistillError) as caught:
        template_fields(template)
    assert caught.value.problem == f"task.prompt: {shown} is not a plain field name"
    assert "{{ and }}" in caught.value.hint


@pytest.mark.unit
@pytest.mark.parametrize("template,problem", [("Q: {}", "task.prompt: {} has no field name"),
                                              ("Q: {question", "task.prompt: not a valid template"),
                                              ("Q: }", "task.prompt: not a valid template")])
def test_unnamed_fields_and_stray_braces_are_refused(template, problem):
    with pytest.raises(EdgedistillError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        render(template, {"question": "q"}, "p.jsonl:1")


@pytest.mark.unit
def test_a_missing_field_names_the_example_and_the_fields_it_has():
    with pytest.raises(EdgedistillError) as caught:
        render("{context}\n\nQ: {question}", {"question": "Why?", "answer": "Because."}, "prompts.jsonl:12")
    assert caught.value.problem == ("prompts.jsonl:12: the prompt uses {context}, which this example does not have "
                                    "(it has: question, answer)")
    assert caught.value.hint == "add the field to every example or remove {context} from task.prompt"
    with pytest.raises(EdgedistillError) as caught:
        render("{persona}", {}, "prompts.csv:3", name="task.system")
    assert caught.value.hint == "add the field to every example or remove {persona} from task.system"


@pytest.mark.unit
@pytest.mark.parametrize("value,shown", [(None, "null"), ("", '""'), ("  \n", '"  \\n"'), ([], "[]"), ({}, "{}")])
def test_an_empty_field_is_refused(value, shown):
    with pytest.raises(EdgedistillError) as caught:
        render("Q: {question}", {"question": value}, "data row 4")
    assert caught.value.problem == f"data row 4: the prompt uses {{question}}, which is empty in this example ({shown})"


@pytest.mark.unit
def test_check_template_reports_several_failures_at_once():
    rows = [Row(f"p.jsonl:{i}", {"question": "q", "context": "c"}) for i in range(1, 11)]
    rows[1] = Row("p.jsonl:2", {"question": "q"})
    rows[4] = Row("p.jsonl:5", {"question": "q", "context": None})
    rows += [Row(f"p.jsonl:{i}", {"context": "c"}) for i in range(11, 16)]
    with pytest.raises(EdgedistillError) as caught:
        check_template("{context} {question}", rows)
    lines = caught.value.problem.splitlines()
    assert lines[0] == "7 of 15 examples cannot fill task.prompt:"
    assert lines[1] == "  p.jsonl:2: the prompt uses {context}, which this example does not have (it has: question)"
    assert lines[2].startswith("  p.jsonl:5: the prompt uses {context}, which is empty")
    assert [line.split(":")[1] for line in lines[3:6]] == ["11", "12", "13"]
    assert lines[6:] == ["  ... and 2 more"]
    assert "remove {context} from task.prompt" in caught.value.hint
    assert "remove {question} from task.prompt" in caught.value.hint
    assert check_template("{context} {question}", rows[:1]) is None


@pytest.mark.unit
def test_chat_rows_split_off_a_final_assistant_turn_as_the_reference():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
             {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    answered = turns + [{"role": "assistant", "content": "Rome.", "weight": 1}]
    assert chat_messages({"messages": answered}, "messages", "c.jsonl:1") == ChatPrompt(turns, "Rome.")
    assert chat_messages({"messages": turns}, "messages", "c.jsonl:1") == ChatPrompt(turns, None)
    assert chat_messages({"text": "not a chat row"}, "messages", "c.jsonl:1") is None


@pytest.mark.unit
@pytest.mark.parametrize("turns,problem", [
    ([{"role": "tool", "content": "x"}], "c.jsonl:3: 'messages' turn 1 has role \"tool\", not one of system, user, "
                                         "assistant"),
    ([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi."}],
     "c.jsonl:3: 'messages' has no user turn"),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}],
     "c.jsonl:3: 'messages' turn 2 is a system turn after the first"),
    ([{"role": "user", "content": ["parts"]}], "c.jsonl:3: 'messages' turn 1 (user) has content [\"parts\"], not text"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
     "c.jsonl:3: 'messages' ends with two assistant turns"),
    (["Hi"], "c.jsonl:3: 'messages' turn 1 is \"Hi\", not an object with a role and a content"),
    ("Hi", "c.jsonl:3: 'messages' is \"Hi\", not a list of chat turns"),
    ([], "c.jsonl:3: 'messages' is [], not a list of chat turns"),
])
def test_bad_chat_rows_are_refused(turns, problem):
    with pytest.raises(EdgedistillError) as caught:
        chat_messages({"messages": turns}, "messages", "c.jsonl:3")
    assert caught.value.problem == problem
    assert "at least one user turn" in caught.value.hint
