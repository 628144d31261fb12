"""Faults of a remote teacher endpoint: a server that trickles bytes, and answers that are not chat completions.

    python -m pytest -q tests/test_faults_endpoint.py

Each test starts a real http.server on loopback that misbehaves one way and calls the client
(edgedistill/data/remote.py) directly; one goes through the whole generate stage.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import random_teacher_recipe

from edgedistill.data import remote
from edgedistill.data.generate import generate
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import EndpointConfig, load_recipe
from edgedistill.stages import teacher_stage

ROOT = Path(__file__).resolve().parent.parent
# The trickling server gives up after this long, so a client that never stops reading cannot hang the suite.
TRICKLE_MAX_S = 15.0


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def serve():
    """serve(handler) -> base URL of a loopback server whose do_POST is `handler(self)`; all stopped after the test."""
    servers = []

    def start(handle) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                handle(self)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def trickle(handler: BaseHTTPRequestHandler, *, headers_first: bool = True) -> None:
    """A byte every 0.2 s, for as long as the client reads (at most TRICKLE_MAX_S)."""
    deadline = time.monotonic() + TRICKLE_MAX_S
    try:
        if headers_first:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()  # no Content-Length: the body ends when the socket does
            handler.wfile.flush()
        # The body starts a chat completion; without headers, a status line that never ends.
        payload = b'{"choices": [{"message": {"content": "' if headers_first else b"HTTP/1.0 200 OK"
        index = 0
        while time.monotonic() < deadline:
            handler.wfile.write(payload[index:index + 1] or b"a")
            handler.wfile.flush()
            index += 1
            time.sleep(0.2)
    except OSError:
        pass  # the client hung up: what the deadline is for


def answer(handler: BaseHTTPRequestHandler, body: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def request(i: int = 0) -> remote.Request:
    return remote.Request((i, 0), [{"role": "user", "content": f"q{i}"}], seed=i)


def ask(url: str, n: int = 1, **endpoint) -> tuple[list, list]:
    answers, skipped = [], []
    remote.answer_remote(EndpointConfig(url=url, concurrency=1, **endpoint), [request(i) for i in range(n)],
                         max_new_tokens=8, temperature=0.0, on_answer=lambda r, c: answers.append((r.key, c.text)),
                         on_skip=lambda r, error: skipped.append(error))
    return answers, skipped


def bounded(call, limit_s: float = 10.0):
    """call() in a thread; fails the test (instead of hanging it) when it has not returned within limit_s."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), f"still waiting on the endpoint after {limit_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --- a server that trickles -----------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("headers_first", [True, False], ids=["trickled-body", "trickled-headers"])
def test_a_trickling_server_fails_at_the_deadline(serve, headers_first):
    url = serve(lambda handler: trickle(handler, headers_first=headers_first))
    with pytest.raises(EdgedistillError) as info:
        bounded(lambda: ask(url, timeout_s=1, retries=0))
    message = str(info.value)
    assert f"{url}/chat/completions kept failing after 0 retries" in message
    assert "no complete response within generate.endpoint.timeout_s = 1 s" in message
    assert "fix: raise generate.endpoint.timeout_s, or check that the server" in message


@pytest.mark.integration
def test_the_deadline_covers_the_whole_request_and_retries_each_try(serve):
    tries = []
    url = serve(lambda handler: (tries.append(1), trickle(handler)))
    endpoint = EndpointConfig(url=url, timeout_s=0.5, retries=1)
    with pytest.raises(remote.EndpointDown, match="timeout_s = 0.5 s"):
        bounded(lambda: remote.request_once(endpoint, request(), max_new_tokens=8, temperature=0.0))
    with pytest.raises(EdgedistillError, match="after 1 retries; last error: no complete response"):
        bounded(lambda: ask(url, timeout_s=0.5, retries=1))
    assert len(tries) == 3


@pytest.mark.integration
def test_a_slow_but_complete_answer_within_the_deadline_is_kept(serve):
    body = json.dumps({"choices": [{"message": {"content": "positive"}, "finish_reason": "stop"}]}).encode()

    def slow(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for half in (body[:10], body[10:]):
            handler.wfile.write(half)
            handler.wfile.flush()
            time.sleep(0.2)

    url = serve(slow)
    assert bounded(lambda: ask(url, timeout_s=5, retries=0)) == ([((0, 0), "positive")], [])


# --- answers that are not chat completions ----------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("body, named", [
    (b"not json", "not JSON: b'not json'"),
    (b'{"object": "list", "data": []}', "no choices[0].message.content in b'{\"object\": \"list\""),
    (b'{"choices": []}', "no choices[0].message.content in b'{\"choices\": []}'"),
    (b'{"choices": [{"message": {"content": ["a"]}}]}', "choices[0].message.content is list, not text"),
])
def test_an_answer_that_is_not_a_chat_completion_is_named(serve, body, named):
    url = serve(lambda handler: answer(handler, body))
    endpoint = EndpointConfig(url=url, timeout_s=5, retries=0)
    with pytest.raises(remote.BadResponse) as info:
        remote.request_once(endpoint, request(), max_new_tokens=8, temperature=0.0)
    assert named in str(info.value) and info.value.hint == remote.NOT_A_CHAT_ENDPOINT
    answers, skipped = bounded(lambda: ask(url, n=2, timeout_s=5, retries=1))
    assert answers == [] and len(skipped) == 2 and all(named in str(error) for error in skipped)


@pytest.mark.unit
def test_describe_skips_names_the_answer_the_count_and_the_fitting_fix():
    garbage = remote.BadResponse("not JSON: b'<html>'", remote.NOT_A_CHAT_ENDPOINT)
    refused = remote.BadResponse("HTTP 413: b'too long'", remote.REFUSED_REQUEST)
    problem, hint = remote.describe_skips([garbage] * 3)
    assert problem == "3, the last one answered not JSON: b'<html>'" and hint == remote.NOT_A_CHAT_ENDPOINT
    problem, hint = remote.describe_skips([garbage, refused])
    assert problem == "2, the last one answered HTTP 413: b'too long'"
    assert hint == f"{remote.NOT_A_CHAT_ENDPOINT}; {remote.REFUSED_REQUEST}"
    assert "max_new_tokens" not in remote.NOT_A_CHAT_ENDPOINT and "max_new_tokens" in remote.REFUSED_REQUEST


# --- through the generate stage ----------------------------------------------------------------------

@pytest.mark.integration
def test_the_generate_stage_says_what_the_endpoint_answered(serve, tmp_path):
    url = serve(lambda handler: answer(handler, b"<html>a login page</html>"))
    prompts = ROOT / "recipes" / "data" / "sentiment.jsonl"
    (tmp_path / "recipe.yaml").write_text(random_teacher_recipe(
        name="faults", prompt="Is this review positive or negative? Answer with one word.\n\nReview: {text}",
        data=f"{{prompts: {prompts}, heldout_fraction: 0.2, limit: 10}}",
        generate=f"{{max_new_tokens: 8, endpoint: {{url: '{url}', retries: 0, timeout_s: 5}}}}"))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    teacher_stage(recipe, teacher)
    out = tmp_path / "generate"
    out.mkdir()
    with pytest.raises(EdgedistillError) as info:
        generate(recipe, out, teacher=teacher)
    message = str(info.value)
    assert "endpoint failures: 8, the last one answered not JSON: b'<html>a login page</html>'" in message
    assert f"fix: {remote.NOT_A_CHAT_ENDPOINT}" in message and "max_new_tokens" not in message


# --- the API key goes only where the recipe says --------------------------------------------------

@pytest.mark.integration
def test_a_redirect_is_not_followed_so_the_key_stays_home(serve, monkeypatch):
    reached = []

    def elsewhere(handler):
        reached.append(handler.headers.get("Authorization"))
        answer(handler, json.dumps({"choices": [{"message": {"content": "positive"}}]}).encode())

    other = serve(elsewhere)

    def redirect(handler):
        handler.send_response(307)
        handler.send_header("Location", other + "/chat/completions")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    url = serve(redirect)
    monkeypatch.setenv("TEST_API_KEY", "secret")
    endpoint = EndpointConfig(url=url, timeout_s=5, retries=0, api_key_env="TEST_API_KEY")
    with pytest.raises(remote.EndpointRefused) as info:
        remote.request_once(endpoint, request(), max_new_tokens=8, temperature=0.0)
    assert "HTTP 307" in str(info.value) and "redirects to" in str(info.value) and other in str(info.value)
    assert "set generate.endpoint.url to the address it redirects to" in info.value.hint
    assert reached == []
