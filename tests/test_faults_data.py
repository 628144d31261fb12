"""Bad user data gets a clear error (issue 13, items 6 and 7): prompts files and `eval --data` files
that are not UTF-8, hold a line that is not a JSON object or a line cut short; held-out prompts too
long for the context, skipped by the generate stage and by eval instead of crashing llama.cpp.

    python -m pytest -q tests/test_faults_data.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import random_teacher_recipe

from edgedistill.cli import main
from edgedistill.data import generate as generate_module
from edgedistill.data.prompts import load_examples, read_jsonl, split_examples
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate import task
from edgedistill.recipe import load_recipe

LONG_PROMPT = "word " * 20_000  # 100k characters
GOOD = {"text": "great film", "label": "positive"}


def make_recipe(folder: Path, prompts: Path):
    path = folder / "recipe.yaml"
    path.write_text(random_teacher_recipe(name="faults", prompt="Is this review positive or negative?\n\nReview: {text}",
                                          data=f"{{prompts: {prompts}, heldout_fraction: 0.3}}",
                                          generate="{max_new_tokens: 8}"))
    return load_recipe(path)


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def heldout_record(content: str, id_: int = 0) -> dict:
    return {"id": id_, "messages": [{"role": "user", "content": content}], "label": "positive",
            "choices": ["positive", "negative"]}


# --- item 6: one JSONL reader, clear errors --------------------------------------------------------

GOOD_LINE = json.dumps(GOOD).encode()
BAD_LINES = {
    "latin1": (b'{"text": "caf\xe9", "label": "positive"}', r"not UTF-8 \(byte 0xe9 at byte offset {offset}\)"),
    "number": (b"42", r"not a JSON object \(got a number: 42\)"),
    "array": (b'["great film", "positive"]', r"not a JSON object \(got an array"),
    "truncated": (b'{"text": "great fi', r"not valid JSON \(Unterminated string starting at column 10\)"),
}


@pytest.mark.unit
@pytest.mark.parametrize("kind", BAD_LINES)
def test_a_bad_prompts_line_names_file_line_and_fix(tmp_path, kind):
    bad, expected = BAD_LINES[kind]
    # a blank line before the bad one: line numbers count every line of the file
    prompts = write_lines(tmp_path / "p.jsonl", [GOOD_LINE, b"", GOOD_LINE, bad])
    offset = 2 * (len(GOOD_LINE) + 1) + 1 + bad.index(b"\xe9") if kind == "latin1" else 0
    with pytest.raises(EdgedistillError, match=f"{prompts}:4: " + expected.format(offset=offset)) as info:
        load_examples(make_recipe(tmp_path, prompts))
    assert info.value.hint
    assert "UnicodeDecodeError" not in str(info.value) and "AttributeError" not in str(info.value)


@pytest.mark.unit
def test_non_utf8_txt_and_csv_prompts_are_clear_errors(tmp_path):
    txt = write_lines(tmp_path / "p.txt", [b"first prompt", b"caf\xe9 au lait"])
    with pytest.raises(EdgedistillError, match=rf"{txt}:2: not UTF-8 \(byte 0xe9 at byte offset 16\)") as info:
        load_examples(make_recipe(tmp_path, txt))
    assert "save the file as UTF-8" in info.value.hint
    csv_file = write_lines(tmp_path / "p.csv", [b"text,label", b"caf\xe9,positive"])
    with pytest.raises(EdgedistillError, match=rf"{csv_file}:2: not UTF-8"):
        load_examples(make_recipe(tmp_path, csv_file))


@pytest.mark.unit
def test_utf8_with_a_byte_order_mark_reads(tmp_path):
    path = write_lines(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + GOOD_LINE, b"", GOOD_LINE])
    assert read_jsonl(path) == [GOOD, GOOD]


@pytest.mark.unit
@pytest.mark.parametrize("kind", BAD_LINES)
def test_eval_data_with_a_bad_line_exits_2_with_the_message(tmp_path, capsys, kind):
    bad, expected = BAD_LINES[kind]
    good = json.dumps(heldout_record("great film")).encode()
    data = write_lines(tmp_path / "heldout.jsonl", [good, bad])
    offset = len(good) + 1 + bad.index(b"\xe9") if kind == "latin1" else 0
    model = tmp_path / "model.gguf"
    model.touch()  # never opened: the data is read first
    assert main(["eval", str(model), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}:2: ") and "fix: " in err and "Traceback" not in err
    assert re.search(expected.format(offset=offset), err)


@pytest.mark.unit
def test_eval_data_missing_or_with_a_wrong_record_exits_2(tmp_path, capsys):
    model = tmp_path / "model.gguf"
    model.touch()
    assert main(["eval", str(model), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    data = write_lines(tmp_path / "heldout.jsonl", [b"", json.dumps({"messages": "hi", "label": "x",
                                                                       "choices": ["x"]}).encode()])
    assert main(["eval", str(model), "--data", str(data)]) == 2
    assert f"{data}:2: a held-out record needs messages (a list of chat messages)" in capsys.readouterr().err


# --- item 7: over-long held-out prompts --------------------------------------------------------------

class CharTokenizer:
    """One token per 4 characters of the prompt, as a teacher's tokenizer would count roughly."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return list(range(sum(len(m["content"]) for m in messages) // 4))


class FakeTeacher:
    def __init__(self, *args, **kwargs):
        pass

    def generate(self, conversations, max_new_tokens, logits_processor=None):
        return [("positive", True)] * len(conversations)


@pytest.mark.unit
def test_generate_skips_an_over_long_heldout_prompt_and_counts_it(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    rows = [{"text": f"review number {i}", "label": "positive"} for i in range(10)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = make_recipe(tmp_path, prompts)
    _, heldout = split_examples(recipe, load_examples(recipe))  # the split depends on the count only
    long_id = heldout[0].id
    rows[long_id]["text"] = LONG_PROMPT
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(generate_module, "_context_length", lambda teacher: 2048)
    monkeypatch.setattr(generate_module, "load_tokenizer", lambda teacher: CharTokenizer())
    monkeypatch.setattr(generate_module, "TorchChatModel", FakeTeacher)
    out = tmp_path / "generate"
    out.mkdir()
    result = generate_module.generate(recipe, out, teacher=tmp_path)
    written = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert long_id not in {row["id"] for row in written}
    assert result["heldout_skipped_too_long"] == 1 and result["heldout_examples"] == len(heldout) - 1
    assert result["skipped_too_long"] == 0


@pytest.mark.unit
def test_generate_refuses_when_no_heldout_prompt_fits(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": LONG_PROMPT, "label": "positive"}) + "\n" for _ in range(4)))
    monkeypatch.setattr(generate_module, "_context_length", lambda teacher: 2048)
    monkeypatch.setattr(generate_module, "load_tokenizer", lambda teacher: CharTokenizer())
    with pytest.raises(EdgedistillError, match="held-out prompts are too long for the teacher's context"):
        generate_module.generate(make_recipe(tmp_path, prompts), tmp_path, teacher=tmp_path)


class FakeRuntime:
    """One token per character; a context of `context_length` tokens."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.generated = 0

    def prompt_ids(self, messages, *, add_generation_prompt=True):
        return list(range(sum(len(m["content"]) for m in messages)))

    def generate(self, conversations, max_new_tokens):
        assert all(len(self.prompt_ids(c)) + max_new_tokens <= self.context_length for c in conversations)
        self.generated += len(conversations)
        return [("positive", True)] * len(conversations)


@pytest.mark.unit
def test_eval_skips_an_over_long_heldout_record_before_any_work(tmp_path, monkeypatch, capsys):
    data = tmp_path / "heldout.jsonl"
    records = [heldout_record("great", 0), heldout_record(LONG_PROMPT, 1), heldout_record("fine", 2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    opened = []

    def fake_open(artifact, device, dtype):
        opened.append(FakeRuntime(context_length=2048 if artifact.name == "big" else 64))
        return opened[-1]

    monkeypatch.setattr(task, "_open", fake_open)
    report = task.evaluate([tmp_path / "small", tmp_path / "big"], data, None, max_new_tokens=16)
    assert [r.examples for r in report.artifacts] == [2, 2]
    assert report.to_dict()["skipped_too_long"] == 1
    err = capsys.readouterr().err
    assert "skipping 1 of 3 held-out records" in err and f"{data}:2 (id 1: 100016 tokens" in err
    # every artifact checked first; the first one used stays open, so it is opened once
    assert len(opened) == 3 and sum(m.generated for m in opened) == 4


@pytest.mark.unit
def test_eval_refuses_when_no_heldout_record_fits(tmp_path, monkeypatch):
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps(heldout_record(LONG_PROMPT)) + "\n")
    monkeypatch.setattr(task, "_open", lambda artifact, device, dtype: FakeRuntime(2048))
    with pytest.raises(EdgedistillError, match="no held-out record fits the context") as info:
        task.evaluate([tmp_path / "m"], data, None, max_new_tokens=16)
    assert "--max-new-tokens" in info.value.hint


@pytest.mark.integration
def test_an_over_long_heldout_prompt_does_not_crash_llama_cpp(tmp_path, tiny_llama_dir, capsys):
    from edgedistill.export.gguf import write_gguf

    gguf = write_gguf(tiny_llama_dir, tmp_path / "model-f16.gguf")
    data = tmp_path / "heldout.jsonl"
    records = [heldout_record("ka lo mi", 0), heldout_record(LONG_PROMPT, 1), heldout_record("ne tu", 2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval.json"
    assert main(["eval", str(gguf), "--data", str(data), "--max-new-tokens", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["skipped_too_long"] == 1 and report["artifacts"][0]["examples"] == 2
    assert f"{data}:2 (id 1:" in capsys.readouterr().err


@pytest.mark.unit
@pytest.mark.parametrize("name, content, problem", [
    ("calib.txt", b"caf\xe9 text\n", "calib.txt:1: not UTF-8 (byte 0xe9 at byte offset 3)"),
    ("calib.jsonl", b'{"text": "a"}\n42\n', "calib.jsonl:2: not a JSON object (got a number: 42)"),
    ("calib.jsonl", b'{"text": "a"}\n{"text": "cut\n', "calib.jsonl:2: not valid JSON"),
    ("calib.jsonl", b'{"prompt": "a"}\n', "calib.jsonl:1 has neither 'messages' nor 'text'"),
])
def test_calibration_text_is_read_like_every_other_data_file(tmp_path, name, content, problem):
    from edgedistill.data.calibration import calibration_texts

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EdgedistillError) as info:
        calibration_texts(path, tokenizer=None)
    assert problem in info.value.problem
