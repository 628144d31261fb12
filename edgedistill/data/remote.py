"""Remote teachers: answers from an OpenAI-compatible /v1/chat/completions endpoint (vLLM, llama.cpp, TGI).

    python -m llama_cpp.server --model teacher.gguf --port 8000 &   # any OpenAI-compatible server
    # recipe: generate: {endpoint: {url: http://127.0.0.1:8000/v1, concurrency: 4}}
    edgedistill run recipe.yaml --out runs/remote --from generate

`answer_remote` sends one request per (prompt, sample) from a bounded thread pool and hands every
finished answer to `on_answer` at once, so the caller can append it to disk and a dead endpoint
loses nothing already answered. Only the standard library is used for HTTP: no client package
is needed on the machine that drives a cluster-served teacher.

`generate.endpoint.timeout_s` is a deadline for the whole request (connect, send, the whole
response): a watchdog shuts the socket when it passes, so a server that trickles a byte at a time
cannot hold the stage, whose per-read socket timeouts alone would never fire.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

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


class EndpointError(Exception):
    """What the server did (str) and the fix that fits it (`hint`)."""

    def __init__(self, problem: str, hint: str):
        super().__init__(problem)
        self.hint = hint


class EndpointDown(EndpointError):
    """The server is unreachable or failing (connection errors, timeouts, 5xx, 429): stop everything."""


class BadResponse(EndpointError):
    """This example's response is unusable (garbage, or a request the server refuses): retry, then skip it."""


class EndpointRefused(EndpointError):
    """Authentication, wrong URL or model (401, 403, 404): no retry helps."""


NOT_A_CHAT_ENDPOINT = ("generate.endpoint.url must be the base URL (e.g. http://host:8000/v1) of an OpenAI-compatible "
                       "server whose /chat/completions answers chat completions; try it with curl")
REFUSED_REQUEST = ("the server refused these prompts: lower generate.max_new_tokens or shorten the prompts to fit "
                   "the served model's context, and check generate.endpoint.model")
SERVER_DOWN = "the answers finished so far are kept: start the server again and rerun to answer the rest"


class _Deadline:
    """Shuts every socket of one request when `seconds` have passed since it started.

    A blocked read then ends at once (EOF or an error) and `expired` tells the caller why.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:  # connected just after the deadline
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown, also under TLS: the reading thread still owns the SSL object.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _WatchedConnection:
    """An http.client connection that hands its socket to a _Deadline once connected."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTP(_WatchedConnection, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(lambda *a, **kw: _WatchedHTTP(*a, deadline=self.deadline, **kw), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(lambda *a, **kw: _WatchedHTTPS(*a, deadline=self.deadline, **kw), req)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A chat endpoint answers where it is; following a redirect would carry the API key to
    wherever the server points (urllib keeps the Authorization header), so none is followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


def chat_url(endpoint: EndpointConfig) -> str:
    base = endpoint.url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _headers(endpoint: EndpointConfig) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


@dataclass(frozen=True)
class Completion:
    """One chat completion: the answer, whether it ended by itself (False for finish_reason "length"),
    when top_logprobs were asked for its tokens as the server reports them (see parse_logprobs), and
    the token counts of the server's `usage` where it gives them."""

    text: str
    finished: bool
    tokens: list[dict] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


NO_LOGPROBS = ("soft labels from an endpoint need the OpenAI API's logprobs/top_logprobs (vLLM has them; "
               "llama-cpp-python's server needs --logits_all true); or use response distillation, which needs "
               "only the answers: distill.kl_weight: 0")


def parse_completion(body: bytes, *, top_logprobs: int = 0) -> Completion:
    """The completion in a chat-completions response body; with `top_logprobs`, its tokens too
    (a server that gives none raises EndpointRefused: no retry brings them)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise BadResponse(f"not JSON: {body[:200]!r}", NOT_A_CHAT_ENDPOINT) from None
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise BadResponse(f"no choices[0].message.content in {body[:200]!r}", NOT_A_CHAT_ENDPOINT) from None
    if content is not None and not isinstance(content, str):
        raise BadResponse(f"choices[0].message.content is {type(content).__name__}, not text: {body[:200]!r}",
                          NOT_A_CHAT_ENDPOINT)
    tokens = parse_logprobs(choice) if top_logprobs else None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    counts = [usage.get(name) if isinstance(usage.get(name), int) else None
              for name in ("prompt_tokens", "completion_tokens")]
    return Completion((content or "").strip(), choice.get("finish_reason") != "length", tokens, *counts)


def parse_logprobs(choice: dict) -> list[dict]:
    """choices[0].logprobs.content as [{"token", "logprob", "bytes", "id", "top": [{"token", "logprob",
    "bytes", "id"}]}]: "bytes" and "id" where the server gives them (llama.cpp's server gives ids,
    OpenAI and vLLM bytes, llama-cpp-python's server only the text)."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list) or (content and not isinstance(content[0], dict)):
        raise EndpointRefused(f"the response has no choices[0].logprobs.content (got {choice.get('logprobs')!r:.120})",
                              NO_LOGPROBS)

    def entry(item: dict) -> dict:
        if not isinstance(item, dict) or not isinstance(item.get("logprob"), (int, float)):
            raise BadResponse(f"a logprobs entry without a numeric logprob: {item!r:.120}", NOT_A_CHAT_ENDPOINT)
        found = {"token": str(item.get("token", "")), "logprob": float(item["logprob"])}
        if isinstance(item.get("bytes"), list):
            found["bytes"] = item["bytes"]
        if isinstance(item.get("id"), int):
            found["id"] = item["id"]
        return found

    tokens = []
    for item in content:
        token = entry(item)
        top = item.get("top_logprobs")
        if not isinstance(top, list) or not top:
            raise EndpointRefused(f"a token without top_logprobs: {item!r:.120}", NO_LOGPROBS)
        token["top"] = [entry(alternative) for alternative in top]
        tokens.append(token)
    return tokens


def without_end_tokens(answer: str, end_texts: list[str]) -> str:
    """`answer` without the end-of-turn tokens (their texts, `end_texts`) a server left at its end:
    one that detokenizes special tokens, or stops only at its own eos, hands them back as text."""
    answer = answer.strip()
    while ending := next((text for text in end_texts if text and answer.endswith(text)), None):
        answer = answer[: -len(ending)].rstrip()
    return answer


def _timed_out(endpoint: EndpointConfig) -> EndpointDown:
    return EndpointDown(
        f"no complete response within generate.endpoint.timeout_s = {endpoint.timeout_s:g} s "
        "(the deadline covers connect, send and the whole answer)",
        "raise generate.endpoint.timeout_s, or check that the server is not stuck or overloaded (or lower "
        f"generate.endpoint.concurrency); {SERVER_DOWN}")


def request_once(endpoint: EndpointConfig, request: Request, *, max_new_tokens: int,
                 temperature: float, top_logprobs: int = 0) -> Completion:
    payload = {"model": endpoint.model, "messages": request.messages, "max_tokens": max_new_tokens,
               "temperature": temperature, "seed": request.seed, "stream": False}
    if top_logprobs:
        payload.update(logprobs=True, top_logprobs=top_logprobs)
    body = _post(endpoint, chat_url(endpoint), payload, no_logprobs_hint=NO_LOGPROBS if top_logprobs else None)
    return parse_completion(body, top_logprobs=top_logprobs)


def _post(endpoint: EndpointConfig, url: str, payload: dict, *, no_logprobs_hint: str | None) -> bytes:
    """The response body of one POST of `payload` to `url`, within endpoint.timeout_s; each failure
    raised as the EndpointError subclass that says what may be done about it (`no_logprobs_hint`:
    the fix when the payload asks for log-probs and the server cannot give them)."""
    post = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=_headers(endpoint), method="POST")
    with _Deadline(endpoint.timeout_s) as deadline:
        opener = urllib.request.build_opener(_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline),
                                             _NoRedirect())
        try:
            # The socket timeout bounds the connect; the deadline bounds everything after it.
            with opener.open(post, timeout=endpoint.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            error_body = exc.read()
            detail = f"HTTP {exc.code}: {error_body[:200]!r}"
            if no_logprobs_hint and exc.code < 600 and b"logprob" in error_body.lower():
                # the server cannot give log-probs (llama-cpp-python without logits_all answers 500):
                # no retry brings them
                raise EndpointRefused(detail, no_logprobs_hint) from None
            if exc.code in SKIP_STATUSES:
                raise BadResponse(detail, REFUSED_REQUEST) from None
            if 300 <= exc.code < 400:
                raise EndpointRefused(f"{detail}: the server redirects to {exc.headers.get('Location')!r}",
                                      "set generate.endpoint.url to the address it redirects to (redirects are "
                                      "not followed, so the API key goes only where the recipe says)") from None
            if exc.code in (401, 403, 404):
                raise EndpointRefused(detail, "check generate.endpoint.url, .model and the API key in "
                                      f"${endpoint.api_key_env or '<api_key_env>'}") from None
            raise EndpointDown(detail, SERVER_DOWN) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if deadline.expired or isinstance(reason, TimeoutError):
                raise _timed_out(endpoint) from None
            # URLError wraps refused connections; OSError and HTTPException are a dropped socket.
            raise EndpointDown(f"{type(exc).__name__}: {reason}", SERVER_DOWN) from None
    if deadline.expired:  # a body without Content-Length reads as ended when its socket is shut
        raise _timed_out(endpoint)
    return body


def completions_url(endpoint: EndpointConfig) -> str:
    """The endpoint's text-completions route (/v1/completions) beside its chat route."""
    base = endpoint.url.rstrip("/")
    return (base[: -len("/chat/completions")] if base.endswith("/chat/completions") else base) + "/completions"


NO_NEXT_TOKEN_LOGPROBS = (
    "on-policy distillation from an endpoint scores the student's tokens through the text-completions API "
    "(/v1/completions with logprobs: k, which vLLM, llama.cpp's server and llama-cpp-python's server with "
    "--logits_all true give); or remove distill.on_policy and distill from the endpoint's cached soft labels")


def next_token_top(endpoint: EndpointConfig, prompt: str, k: int) -> list[dict]:
    """The served model's `k` most likely next tokens after the raw text `prompt` (special-token
    text included, no chat template applied) as [{"token", "logprob", "bytes"?, "id"?}], asked
    through /v1/completions for one greedy token with `logprobs: k`."""
    payload = {"model": endpoint.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": k,
               "stream": False}
    return parse_next_token_top(_post(endpoint, completions_url(endpoint), payload,
                                      no_logprobs_hint=NO_NEXT_TOKEN_LOGPROBS))


def parse_next_token_top(body: bytes) -> list[dict]:
    """The first generated token's alternatives in a text-completions body: the legacy OpenAI form
    (logprobs.top_logprobs: [{text: logprob}], vLLM and llama-cpp-python) or the chat form
    (logprobs.content[0].top_logprobs, as llama.cpp's server may answer)."""
    try:
        choice = json.loads(body)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadResponse(f"no choices[0] in {body[:200]!r}", NOT_A_CHAT_ENDPOINT) from None
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        return parse_logprobs(choice)[0]["top"] if logprobs["content"] else []
    tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(tops, list) or not tops or not isinstance(tops[0], dict) or not tops[0]:
        raise EndpointRefused(f"the completion has no logprobs.top_logprobs (got {logprobs!r:.120})",
                              NO_NEXT_TOKEN_LOGPROBS)
    if not all(isinstance(lp, (int, float)) for lp in tops[0].values()):
        raise BadResponse(f"a top_logprobs entry without a numeric log-prob: {tops[0]!r:.120}", NOT_A_CHAT_ENDPOINT)
    return [{"token": str(token), "logprob": float(lp)} for token, lp in tops[0].items()]


T = TypeVar("T")
R = TypeVar("R")


def with_retries(endpoint: EndpointConfig, send: Callable[[], T], stop: threading.Event) -> T | BadResponse | None:
    """What `send()` returns; the last BadResponse when that request is given up on; None when
    stopped. Retries EndpointDown and BadResponse with backoff; raises EndpointDown when the server
    stays down, and EndpointRefused at once."""
    for attempt in range(endpoint.retries + 1):
        if stop.is_set():
            return None
        try:
            return send()
        except (EndpointDown, BadResponse) as exc:
            last = exc
        if attempt < endpoint.retries:
            stop.wait(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt))
    if isinstance(last, BadResponse):
        return last
    raise last


def in_pool(endpoint: EndpointConfig, items: list, work: Callable[[object, threading.Event], R], *, url: str,
            refused: str, down_hint: str | None = None, name: str = "teacher-endpoint") -> list[R]:
    """`work(item, stop)` for each item with at most endpoint.concurrency in flight; the results in order.

    The first error sets `stop` (work checks it between requests: with_retries returns None) and
    cancels what has not started; in-flight requests still land. Then an EndpointRefused raises
    EdgedistillError "the teacher endpoint URL <refused>: ...", an EndpointDown one naming the
    retries (hint: `down_hint`, or the error's), and any other error is raised as it is.
    """
    stop = threading.Event()

    def guarded(item):
        try:
            return work(item, stop)
        except BaseException:
            stop.set()  # no new requests to a server that is down
            raise

    with ThreadPoolExecutor(max_workers=endpoint.concurrency, thread_name_prefix=name) as pool:
        futures = [pool.submit(guarded, item) for item in items]
        wait(futures, return_when=FIRST_EXCEPTION)
        if stop.is_set():
            for future in futures:
                future.cancel()
        wait(futures)
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    for error in errors:
        if isinstance(error, EndpointRefused):
            raise EdgedistillError(f"the teacher endpoint {url} {refused}: {error}", error.hint)
    for error in errors:
        if isinstance(error, EndpointDown):
            raise EdgedistillError(
                f"the teacher endpoint {url} kept failing after {endpoint.retries} retries; last error: {error}",
                down_hint or error.hint)
    if errors:
        raise errors[0]
    return [future.result() for future in futures]


def answer_remote(endpoint: EndpointConfig, requests: list[Request], *, max_new_tokens: int, temperature: float,
                  on_answer: Callable[[Request, Completion], None],
                  on_skip: Callable[[Request, BadResponse], None], top_logprobs: int = 0) -> None:
    """Answer `requests` with at most endpoint.concurrency in flight, asking for each answer token's
    `top_logprobs` alternatives when it is not 0.

    `on_answer(request, completion)` is called from worker threads (the caller locks);
    `on_skip(request, error)` for examples whose responses stayed unusable after the retries: str(error)
    says what the server answered, error.hint the fix (`describe_skips` sums them up for a message).
    Raises EdgedistillError naming the URL and the last error when the endpoint stays down; the
    answers handed out before that are the caller's to keep.
    """
    def work(request: Request, stop: threading.Event) -> None:
        result = with_retries(endpoint, partial(request_once, endpoint, request, max_new_tokens=max_new_tokens,
                                                temperature=temperature, top_logprobs=top_logprobs), stop)
        if isinstance(result, Completion):
            on_answer(request, result)
        elif result is not None and not stop.is_set():
            on_skip(request, result)

    in_pool(endpoint, requests, work, url=chat_url(endpoint), refused="refused the request")


def describe_skips(skips: list[BadResponse]) -> tuple[str, str]:
    """(what the endpoint answered, the fix) for examples skipped after the retries, for the stage's error."""
    return f"{len(skips)}, the last one answered {skips[-1]}", "; ".join(dict.fromkeys(error.hint for error in skips))


def fetch_json(url: str, endpoint: EndpointConfig, *, payload: dict | None = None,
               timeout_s: float | None = None) -> object:
    """GET `url` (POST `payload` as JSON) with the endpoint's key, no redirects followed, and its parsed
    JSON body; raises OSError (urllib's HTTPError included), ValueError or http.client.HTTPException."""
    request = urllib.request.Request(url, data=None if payload is None else json.dumps(payload).encode(),
                                     headers=_headers(endpoint), method="GET" if payload is None else "POST")
    with urllib.request.build_opener(_NoRedirect()).open(request, timeout=timeout_s or endpoint.timeout_s) as response:
        return json.loads(response.read())


def _post_json(url: str, payload: dict, endpoint: EndpointConfig) -> object | None:
    try:
        return fetch_json(url, endpoint, payload=payload)
    except (OSError, ValueError, http.client.HTTPException):
        return None  # urllib's HTTPError is an OSError: this server has no such route


def endpoint_token_ids(endpoint: EndpointConfig, text: str) -> list[int] | None:
    """`text`'s token ids as the server's own tokenizer gives them, from whichever tokenize route it
    has (llama.cpp's server and vLLM: /tokenize; llama-cpp-python's: /extras/tokenize); None when it
    has none. Special-token text counts as special tokens; a server may put its BOS in front."""
    base = endpoint.url.rstrip("/")
    for suffix in ("/chat/completions", "/v1"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    attempts = [(f"{base}/tokenize", {"content": text, "add_special": False, "parse_special": True}),
                (f"{base}/tokenize", {"model": endpoint.model, "prompt": text, "add_special_tokens": False}),
                (f"{base}/extras/tokenize", {"input": text})]
    for url, payload in attempts:
        found = _post_json(url, payload, endpoint)
        tokens = found.get("tokens") if isinstance(found, dict) else None
        if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
            return tokens
    return None
