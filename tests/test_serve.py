"""`edgedistill serve`: the OpenAI-compatible service, driven by the real `openai` client.

    .venv/bin/python -m pytest -q tests/test_serve.py

The service runs in uvicorn on a loopback port (a thread of the test process; the shutdown test
runs the command itself) over tiny random models written as F16 GGUFs and opened in llama.cpp. The
teacher endpoint is a real llama-cpp-python server, killed mid-test. To hold the model's worker busy
(a full queue, a timeout, a disconnect mid-answer), `Paced` hands the real runtime's tokens out only
once a gate opens, or a little apart; everything else is the real runtime.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from conftest import make_tiny_model
from test_generate import free_port, start_llama_server

from edgedistill.cli import main
from edgedistill.runtimes import open_runtime
from edgedistill.serve.app import ServeSettings, create_app
from edgedistill.serve.protocol import ApiError, parse_chat_request
from edgedistill.serve.queue import ModelQueue, TextAssembler
from edgedistill.serve.router import ConfidenceRouter
from edgedistill.serve.teacher import EndpointTeacher, LocalTeacher

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 16  # the answers the tests compare (the tiny random models rarely end one by themselves)
LIMIT = 64  # the service's --max-tokens
HELLO = [{"role": "user", "content": "Hello"}]
PROMPTS = [HELLO, [{"role": "system", "content": "kalo mine"}, {"role": "user", "content": "tu ra si 42"}]]


# --- the request's checks and the text sent (no model) -------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("body, param, code", [
    (b"{bad json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b"{}", "messages", "missing_required_parameter"),
    (b'{"messages": []}', "messages", "empty_array"),
    (b'{"messages": "hi"}', "messages", "invalid_type"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages[0].content[0]",
     "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', "max_tokens", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n", "unsupported_parameter"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', "tools",
     "unsupported_parameter"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true}', "logprobs", "unsupported_parameter"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}',
     "response_format", "unsupported_parameter"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', "stop",
     "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream", "invalid_type"),
])
def test_bad_requests_name_the_parameter(body, param, code):
    with pytest.raises(ApiError) as info:
        parse_chat_request(body)
    assert info.value.status == 400
    assert info.value.body() == {"error": {"message": info.value.message, "type": "invalid_request_error",
                                           "param": param, "code": code}}


@pytest.mark.unit
def test_a_request_as_clients_send_it():
    request = parse_chat_request(json.dumps({
        "model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                                                   "text": "there"}]},
                                   {"role": "assistant", "content": None}],
        "max_completion_tokens": 7, "stop": "END", "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.7, "seed": 3}).encode())
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                                {"role": "assistant", "content": ""}]
    assert (request.model, request.max_tokens, request.stop, request.stream, request.include_usage) == (
        "m", 7, ("END",), True, True)


@pytest.mark.unit
@pytest.mark.parametrize("pieces, stop, sent", [
    (["  \n", " Hello", " world", "  ", "\n"], (), ["", "Hello", " world", "", ""]),
    (["Hello", " wor", "ld. ", "More"], ("world",), ["Hello", "", "", ""]),
    (["a", "b<", "/s", ">c"], ("</s>",), ["a", "b", "", ""]),
    (["a<", "/x"], ("</s>",), ["a", "</x"]),  # held back until it is clear no stop string begins
    (["a ", "</"], ("</s>",), ["a", " </"]),  # a stop string's beginning at the answer's end
])
def test_text_is_stripped_and_cut_at_the_first_stop_string(pieces, stop, sent):
    assembler = TextAssembler(stop)
    out = [assembler.feed(piece) for piece in pieces]
    out[-1] += assembler.finish()
    assert out == sent


@pytest.mark.unit
def test_a_public_address_needs_an_api_key(monkeypatch, capsys):
    monkeypatch.delenv("EDGEDISTILL_API_KEY", raising=False)
    assert main(["serve", "no-such.gguf", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 is not a loopback address" in err and "export EDGEDISTILL_API_KEY" in err


@pytest.mark.unit
def test_a_route_file_needs_a_teacher(capsys, tmp_path):
    assert main(["serve", "no-such.gguf", "--route", str(tmp_path / "route.json")]) == 2
    assert "no --teacher is given" in capsys.readouterr().err


# --- the service over a tiny GGUF in llama.cpp --------------------------------------------------------

@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    """The tiny student (seed 0) and a tiny teacher of other weights (seed 1), as F16 GGUFs."""
    from edgedistill.export.gguf import write_gguf

    found = {}
    for role, seed in (("student", 0), ("teacher", 1)):
        folder = make_tiny_model(tmp_path_factory.mktemp(role), seed=seed)
        found[role] = write_gguf(folder, folder / f"tiny-{role}-f16.gguf")
    return found


@pytest.fixture(scope="module")
def student(ggufs):
    """The student in llama.cpp; the services' worker threads and the tests take turns with it."""
    return open_runtime(ggufs["student"], threads=1)


@pytest.fixture(scope="module")
def expected(student) -> list[str]:
    """The runtime's own greedy answers to PROMPTS, MAX_TOKENS tokens at most."""
    return [answer for answer, _ in student.generate(PROMPTS, MAX_TOKENS)]


@contextmanager
def running(app) -> Iterator[str]:
    """`app` in uvicorn on a free loopback port; yields its base URL (…/v1)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def health(url: str) -> dict:
    return httpx.get(url.removesuffix("/v1") + "/health", timeout=10).json()


def wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def service(student, expected) -> Iterator[str]:
    settings = ServeSettings(max_tokens=LIMIT, max_body_bytes=64 * 1024)
    with running(create_app(student, name="tiny-student", settings=settings)) as url:
        yield url


def streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


@pytest.mark.integration
def test_answers_are_the_runtimes_greedy_answers(service, student, expected):
    api = client(service)
    for messages, answer in zip(PROMPTS, expected):
        raw = api.chat.completions.with_raw_response.create(model="tiny-student", messages=messages,
                                                            max_tokens=MAX_TOKENS)
        completion = raw.parse()
        assert completion.choices[0].message.content == answer
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.usage.prompt_tokens == len(student.prompt_ids(messages))
        assert completion.x_edgedistill == {"answered_by": "student", "degraded": False}
        assert raw.headers["x-edgedistill-answered-by"] == "student"

        text, chunks = streamed(api.chat.completions.create(
            model="student", messages=messages, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True}))
        assert text == answer
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == completion.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
        assert all(c.x_edgedistill["answered_by"] == "student" for c in chunks)
    # no model named: the router chooses (the student, for now)
    response = httpx.post(f"{service}/chat/completions", json={"messages": HELLO, "max_tokens": MAX_TOKENS})
    assert response.json()["choices"][0]["message"]["content"] == expected[0]
    models = [m.id for m in api.models.list()]
    assert models == ["tiny-student", "student"]
    assert health(service)["answered_by"]["student"] >= 5


@pytest.mark.integration
def test_stop_strings_cut_the_answer(service, expected):
    answer = expected[0]
    stop = answer[len(answer) // 2:len(answer) // 2 + 3]
    cut = answer[:answer.index(stop)].rstrip()
    api = client(service)
    whole = api.chat.completions.create(model="student", messages=HELLO, max_tokens=MAX_TOKENS, stop=[stop])
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (cut, "stop")
    text, _ = streamed(api.chat.completions.create(model="student", messages=HELLO, max_tokens=MAX_TOKENS,
                                                   stop=stop, stream=True))
    assert text == cut


def post(url: str, body: bytes | dict, timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/chat/completions", content=content, headers={"Content-Type": "application/json"},
                      timeout=timeout)


@pytest.mark.integration
@pytest.mark.parametrize("body, status, param, code", [
    (b'{"model": "student", "messages": [', 400, None, "invalid_json"),
    ({"model": "student"}, 400, "messages", "missing_required_parameter"),
    ({"model": "gpt-4o", "messages": HELLO}, 404, "model", "model_not_found"),
    ({"model": "teacher", "messages": HELLO}, 404, "model", "model_not_found"),  # no --teacher given
    ({"model": "student", "messages": [{"role": "user", "content": "kalo " * 2500}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": "student", "messages": HELLO, "max_tokens": 2040}, 400, "max_tokens", "invalid_value"),
    ({"model": "student", "messages": [{"role": "user", "content": "x" * 70_000}]}, 413, None, "request_too_large"),
])
def test_bad_input_gets_an_openai_error_and_the_service_stays_up(service, expected, body, status, param, code):
    response = post(service, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and error["message"] and error["type"]
    answer = client(service).chat.completions.create(model="student", messages=HELLO, max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == expected[0]


@pytest.mark.integration
def test_the_openai_client_sees_the_errors_as_its_own(service, student):
    api = client(service)
    for error, call in [
        ((openai.NotFoundError, "model_not_found", "model"), lambda: api.chat.completions.create(
            model="gpt-4o", messages=HELLO)),
        ((openai.BadRequestError, "context_length_exceeded", "messages"), lambda: api.chat.completions.create(
            model="student", messages=[{"role": "user", "content": "kalo " * 2500}])),
        ((openai.NotFoundError, "unknown_url", None), lambda: api.completions.create(
            model="student", prompt="Hello")),  # the legacy completions route is not served
    ]:
        with pytest.raises(error[0]) as info:
            call()
        assert (info.value.code, info.value.param) == error[1:]
    assert health(service)["status"] == "ok"


@pytest.mark.integration
def test_an_api_key_is_checked_on_every_request(student, expected):
    with running(create_app(student, name="tiny", api_key="s3cret-key")) as url:
        with pytest.raises(openai.AuthenticationError) as info:
            client(url, "wrong").chat.completions.create(model="student", messages=HELLO, max_tokens=MAX_TOKENS)
        assert info.value.code == "invalid_api_key"
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 401
        answer = client(url, "s3cret-key").chat.completions.create(model="student", messages=HELLO,
                                                                   max_tokens=MAX_TOKENS)
        assert answer.choices[0].message.content == expected[0]


class Paced:
    """The real runtime, but each answer token comes only once `gate` is open and `delay_s` after the last."""

    def __init__(self, runtime, *, gate: threading.Event | None = None, delay_s: float = 0.0):
        self.runtime, self.gate, self.delay_s = runtime, gate, delay_s

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def greedy_ids(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        tokens = self.runtime.greedy_ids(prompt, max_new_tokens)
        try:
            for token in tokens:
                if self.gate is not None:
                    self.gate.wait()
                time.sleep(self.delay_s)
                yield token
        finally:
            tokens.close()


@pytest.mark.integration
def test_a_full_queue_answers_503_and_the_waiting_requests_are_answered(student, expected):
    gate = threading.Event()
    app = create_app(Paced(student, gate=gate), name="tiny", settings=ServeSettings(max_waiting=1))
    with running(app) as url:
        results = {}

        def ask(key: str) -> None:
            results[key] = client(url).chat.completions.create(model="student", messages=HELLO, max_tokens=MAX_TOKENS)

        first = threading.Thread(target=ask, args=("first",))
        first.start()
        wait_for(lambda: health(url)["student"]["busy"], "the first request to start")
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        wait_for(lambda: health(url)["student"]["waiting"] == 1, "the second request to wait")
        with pytest.raises(openai.APIStatusError) as info:
            client(url).chat.completions.create(model="student", messages=HELLO, max_tokens=MAX_TOKENS)
        assert (info.value.status_code, info.value.code) == (503, "server_overloaded")
        gate.set()
        first.join(60)
        second.join(60)
        assert [results[k].choices[0].message.content for k in ("first", "second")] == [expected[0]] * 2
        assert health(url)["errors"] == {"503": 1}


@pytest.mark.integration
def test_a_client_that_leaves_while_waiting_is_not_answered(student, expected):
    gate = threading.Event()
    with running(create_app(Paced(student, gate=gate), name="tiny")) as url:
        busy = threading.Thread(target=lambda: client(url).chat.completions.create(
            model="student", messages=HELLO, max_tokens=MAX_TOKENS))
        busy.start()
        wait_for(lambda: health(url)["student"]["busy"], "the first request to start")
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request waits in the queue
            post(url, {"model": "student", "messages": HELLO}, timeout=0.5)
        wait_for(lambda: health(url)["client_gone"] == 1, "the service to see the client go")
        gate.set()
        busy.join(60)
        wait_for(lambda: health(url)["student"]["cancelled"] == 1, "the waiting generation to be skipped")
        assert health(url)["student"]["answered"] == 1


@pytest.mark.integration
def test_a_request_past_its_timeout_gets_504_and_its_generation_stops(student, expected):
    gate = threading.Event()
    app = create_app(Paced(student, gate=gate), name="tiny", settings=ServeSettings(timeout_s=0.5))
    with running(app) as url:
        response = post(url, {"model": "student", "messages": HELLO, "max_tokens": MAX_TOKENS})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        gate.set()
        wait_for(lambda: health(url)["student"]["cancelled"] == 1, "the timed-out generation to stop")
        answer = client(url).chat.completions.create(model="student", messages=HELLO, max_tokens=MAX_TOKENS)
        assert answer.choices[0].message.content == expected[0]


@pytest.mark.integration
def test_a_client_that_disconnects_mid_stream_cancels_its_generation(student, expected):
    # 1000 tokens 10 ms apart: 10 s if the generation ran on, and "Hello" has no end within them
    app = create_app(Paced(student, delay_s=0.01), name="tiny", settings=ServeSettings(max_tokens=1000))
    with running(app) as url:
        body = {"model": "student", "messages": HELLO, "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as response:
            first = next(line for line in response.iter_lines() if '"content": "' in line and '"content": ""' not in line)
            assert first.startswith("data: ")  # the answer has begun; leaving the block closes the connection
        wait_for(lambda: health(url)["student"]["cancelled"] == 1, "the generation to be cancelled")
        status = health(url)
        assert (status["student"]["answered"], status["answered_by"]["student"], status["client_gone"]) == (0, 0, 1)
        answer = client(url).chat.completions.create(model="student", messages=HELLO, max_tokens=MAX_TOKENS)
        assert answer.choices[0].message.content == expected[0]


@pytest.mark.integration
def test_a_local_teacher_answers_when_asked_for(student, expected, ggufs):
    teacher_runtime = open_runtime(ggufs["teacher"], threads=1)
    teacher_answer = teacher_runtime.generate([HELLO], MAX_TOKENS)[0][0]
    assert teacher_answer != expected[0]
    teacher = LocalTeacher(ModelQueue(teacher_runtime, name="teacher", max_waiting=4, max_tokens=LIMIT), "tiny")
    with running(create_app(student, name="tiny", teacher=teacher)) as url:
        api = client(url)
        raw = api.chat.completions.with_raw_response.create(model="teacher", messages=HELLO, max_tokens=MAX_TOKENS)
        assert raw.parse().choices[0].message.content == teacher_answer
        assert raw.headers["x-edgedistill-answered-by"] == "teacher"
        text, chunks = streamed(api.chat.completions.create(model="teacher", messages=HELLO, max_tokens=MAX_TOKENS,
                                                            stream=True))
        assert text == teacher_answer and chunks[-1].x_edgedistill == {"answered_by": "teacher", "degraded": False}
        assert [m.id for m in api.models.list()] == ["tiny", "student", "teacher"]
        assert health(url)["answered_by"] == {"student": 0, "teacher": 2}


def route_file(folder: Path, threshold: float | None, rule: str = "min") -> Path:
    """A route.json as `edgedistill route` writes it, with only what serving reads."""
    path = folder / f"route-{threshold}.json"
    path.write_text(json.dumps({"format": 1, "artifact": "tiny", "rule": rule, "threshold": threshold}))
    return path


@pytest.mark.integration
def test_routing_defers_unsure_answers_to_the_teacher(student, expected, ggufs, tmp_path):
    from edgedistill.route import confidence

    teacher_runtime = open_runtime(ggufs["teacher"], threads=1)
    teacher_answer = teacher_runtime.generate([HELLO], MAX_TOKENS)[0][0]
    own = confidence(student, HELLO, expected[0], "min")  # the student's confidence in its greedy answer
    cases = {"above": (own + 1.0, "teacher", teacher_answer), "below": (own - 1.0, "student", expected[0]),
             "none": (None, "student", expected[0])}
    for case, (threshold, who, answer) in cases.items():
        teacher = LocalTeacher(ModelQueue(teacher_runtime, name="teacher", max_waiting=4, max_tokens=LIMIT), "tiny")
        router = ConfidenceRouter(route_file(tmp_path, threshold))
        with running(create_app(student, name="tiny", teacher=teacher, router=router)) as url:
            api = client(url)
            raw = api.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=MAX_TOKENS)
            assert raw.parse().choices[0].message.content == answer, case
            assert raw.headers["x-edgedistill-answered-by"] == who, case
            field = raw.parse().x_edgedistill
            assert (field.get("student_confidence") is None) == (threshold is None), case
            if threshold is not None:
                assert field["student_confidence"] == pytest.approx(own, abs=1e-3)
            text, chunks = streamed(api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=MAX_TOKENS,
                                                                stream=True))
            assert text == answer and chunks[-1].x_edgedistill["answered_by"] == who, case
            assert health(url)["deferred_to_teacher"] == (2 if who == "teacher" else 0)


@pytest.mark.unit
def test_a_route_file_of_another_kind_is_refused(tmp_path):
    bad = tmp_path / "route.json"
    bad.write_text(json.dumps({"format": 1, "rule": "margin", "threshold": 0.5}))
    with pytest.raises(Exception, match="label choices"):
        ConfidenceRouter(bad)
    bad.write_text("{not json")
    with pytest.raises(Exception, match="cannot be read"):
        ConfidenceRouter(bad)


@pytest.mark.integration
def test_a_killed_teacher_endpoint_loses_no_request(student, expected, ggufs):
    port = free_port()
    server = start_llama_server(port, str(ggufs["teacher"]), "--n_threads", "1")
    try:
        teacher = EndpointTeacher(f"http://127.0.0.1:{port}/v1", max_tokens=LIMIT)
        app = create_app(student, name="tiny", teacher=teacher, settings=ServeSettings(probe_interval_s=0.2))
        with running(app) as url:
            api = client(url)
            first = api.chat.completions.create(model="teacher", messages=HELLO, max_tokens=MAX_TOKENS)
            assert first.x_edgedistill == {"answered_by": "teacher", "degraded": False}
            assert first.choices[0].message.content != expected[0]
            # the endpoint's own token counts, passed on
            assert first.usage.completion_tokens >= 1 and first.usage.prompt_tokens >= 1
            assert health(url)["teacher"]["reachable"] is True

            # four clients ask the teacher five times each; it is killed after its third answer
            answers: list = []
            lock = threading.Lock()

            def ask() -> None:
                for _ in range(5):
                    answer = client(url).chat.completions.create(model="teacher", messages=HELLO,
                                                                 max_tokens=MAX_TOKENS)
                    with lock:
                        answers.append(answer)

            clients = [threading.Thread(target=ask) for _ in range(4)]
            for thread in clients:
                thread.start()
            wait_for(lambda: len(answers) >= 3, "three teacher answers")
            server.kill()
            server.wait()
            for thread in clients:
                thread.join(120)
            assert len(answers) == 20  # none dropped, none failed
            by = {(a.x_edgedistill["answered_by"], a.x_edgedistill["degraded"]) for a in answers}
            assert by == {("teacher", False), ("student", True)}
            degraded = [a for a in answers if a.x_edgedistill["degraded"]]
            assert all(a.choices[0].message.content == expected[0] for a in degraded)
            assert all(a.x_edgedistill["degraded_reason"].startswith("the teacher endpoint is unreachable")
                       for a in degraded)

            raw = api.chat.completions.with_raw_response.create(model="teacher", messages=HELLO,
                                                                max_tokens=MAX_TOKENS, stream=True)
            assert (raw.headers["x-edgedistill-answered-by"], raw.headers["x-edgedistill-degraded"]) == (
                "student", "true")
            text, chunks = streamed(raw.parse())
            assert text == expected[0] and chunks[-1].x_edgedistill["degraded"] is True

            status = health(url)
            assert status["status"] == "degraded" and status["teacher"]["reachable"] is False
            assert status["teacher"]["last_error"]
            assert status["answered_by"]["teacher"] + status["answered_by"]["student"] == 22
            assert status["degraded_answers"] == len(degraded) + 1
    finally:
        server.kill()
        server.wait()


@pytest.mark.integration
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_the_command_shuts_down_cleanly(ggufs, expected, signal_number):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("EDGEDISTILL_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "edgedistill.cli", "serve", str(ggufs["student"]),
                                "--port", str(port), "--threads", "1", "--max-tokens", str(LIMIT)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        def up() -> bool:
            assert process.poll() is None, process.stdout.read()
            try:
                return httpx.get(url.removesuffix("/v1") + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, "edgedistill serve to start", timeout_s=60)
        answer = client(url).chat.completions.create(model=ggufs["student"].stem, messages=HELLO,
                                                     max_tokens=MAX_TOKENS)
        assert answer.choices[0].message.content == expected[0]
        process.send_signal(signal_number)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "stopped" in output and "Traceback" not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
