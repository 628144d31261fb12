"""Remote teachers: answers from an OpenAI-compatible /v1/chat/completions endpoint (vLLM, llama.cpp, TGI).

    python -m llama_cpp.server --model teacher.gguf --port 8000 &   # any OpenAI-compatible server
    # recipe: generate: {endpoint: {url: http://127.0.0.1:8000/v1, concurrency: 4}}
    edgedistill run recipe.yaml --out runs/remote --from generate

`answer_remote` sends one request per (prompt, sample) from a bounded thread pool and hands every
finished answer to `on_answer` at once, so the caller can append it to disk and a dead endpoint
loses nothing already answered. Only the standard library is used for HTTP: no client package
is needed on the machine that drives a cluster-served teacher.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from edgedistill.errors import EdgedistillError
from edgedistill.recipe import EndpointConfig

# Seconds before retry k is 2**k times this, capped: long enough for a restarting server, short
# enough that a dead one is reported within a minute at the default 3 retries.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 20.0
# The request's fault, not the server's: that example is skipped, the rest go on.
SKIP_STATUSES = {400, 413, 422}


@dataclass(frozen=True)
class Request:
    key: tuple[int, int]  # (example id, sample index)
    messages: list[dict[str, str]]
    seed: int


class EndpointDown(Exception):
    """The server is unreachable or failing (connection errors, timeouts, 5xx, 429): stop everything."""


class BadResponse(Exception):
    """This example's response is unusable (garbage, or a request the server refuses): retry, then skip it."""


class EndpointRefused(Exception):
    """Authentication, wrong URL or model (401, 403, 404): no retry helps."""


def chat_url(endpoint: EndpointConfig) -> str:
    base = endpoint.url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _headers(endpoint: EndpointConfig) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def parse_completion(body: bytes) -> tuple[str, bool]:
    """(answer, finished) from a chat-completions response body; finished is False for finish_reason "length"."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BadResponse(f"not a chat completion ({type(exc).__name__}: {exc}): {body[:200]!r}") from None
    if content is not None and not isinstance(content, str):
        raise BadResponse(f"message content is {type(content).__name__}, not text")
    return (content or "").strip(), choice.get("finish_reason") != "length"


def request_once(endpoint: EndpointConfig, request: Request, *, max_new_tokens: int,
                 temperature: float) -> tuple[str, bool]:
    payload = {"model": endpoint.model, "messages": request.messages, "max_tokens": max_new_tokens,
               "temperature": temperature, "seed": request.seed, "stream": False}
    post = urllib.request.Request(chat_url(endpoint), data=json.dumps(payload).encode(),
                                  headers=_headers(endpoint), method="POST")
    try:
        with urllib.request.urlopen(post, timeout=endpoint.timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = f"HTTP {exc.code}: {exc.read()[:200]!r}"
        if exc.code in SKIP_STATUSES:
            raise BadResponse(detail) from None
        if exc.code in (401, 403, 404):
            raise EndpointRefused(detail) from None
        raise EndpointDown(detail) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        # URLError wraps refused connections; OSError (timeouts too) and HTTPException are a dropped socket.
        raise EndpointDown(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
    return parse_completion(body)


def _with_retries(endpoint: EndpointConfig, request: Request, stop: threading.Event, **kwargs) -> tuple[str, bool] | None:
    """The answer, or None when the example is skipped; raises EndpointDown when the server stays down."""
    for attempt in range(endpoint.retries + 1):
        if stop.is_set():
            return None
        try:
            return request_once(endpoint, request, **kwargs)
        except (EndpointDown, BadResponse) as exc:
            last = exc
        if attempt < endpoint.retries:
            stop.wait(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt))
    if isinstance(last, BadResponse):
        return None
    raise last


def answer_remote(endpoint: EndpointConfig, requests: list[Request], *, max_new_tokens: int, temperature: float,
                  on_answer: Callable[[Request, str, bool], None],
                  on_skip: Callable[[Request, str], None]) -> None:
    """Answer `requests` with at most endpoint.concurrency in flight.

    `on_answer(request, answer, finished)` is called from worker threads (the caller locks);
    `on_skip(request, reason)` for examples whose responses stayed unusable after the retries.
    Raises EdgedistillError naming the URL and the last error when the endpoint stays down; the
    answers handed out before that are the caller's to keep.
    """
    stop = threading.Event()
    url = chat_url(endpoint)

    def work(request: Request) -> None:
        try:
            result = _with_retries(endpoint, request, stop, max_new_tokens=max_new_tokens, temperature=temperature)
        except BaseException:
            stop.set()  # no new requests to a server that is down; in-flight ones still land
            raise
        if result is not None:
            on_answer(request, *result)
        elif not stop.is_set():
            on_skip(request, "unusable responses after retries")

    with ThreadPoolExecutor(max_workers=endpoint.concurrency, thread_name_prefix="teacher-endpoint") as pool:
        futures = [pool.submit(work, request) for request in requests]
        wait(futures, return_when=FIRST_EXCEPTION)
        if stop.is_set():
            for future in futures:
                future.cancel()
        wait(futures)
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    for error in errors:
        if isinstance(error, EndpointRefused):
            raise EdgedistillError(f"the teacher endpoint {url} refused the request: {error}",
                                   "check generate.endpoint.url, .model and the API key in "
                                   f"${endpoint.api_key_env or '<api_key_env>'}")
    for error in errors:
        if isinstance(error, EndpointDown):
            raise EdgedistillError(
                f"the teacher endpoint {url} kept failing after {endpoint.retries} retries; last error: {error}",
                "the answers finished so far are kept: start the server again and rerun to answer the rest")
    if errors:
        raise errors[0]
