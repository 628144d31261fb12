"""The teacher the service may hand a request to: an OpenAI-compatible endpoint or a local model.

    edgedistill serve student.gguf --teacher http://gpu-box:8000/v1     # vLLM, llama.cpp's server, TGI
    edgedistill serve student.gguf --teacher runs/sentiment/teacher     # a local model, its own queue

An endpoint is asked through edgedistill.data.remote's request machinery (request_once: a deadline
over the whole request, no redirects, the key only under a name with API_KEY in it), greedily, one
request per call, with no retry: when it fails, the student answers at once and the response says
it is degraded, so no request is lost to a dead teacher. After a failure the endpoint is not asked
again for `RETRY_AFTER_S` (requests go straight to the student), and a probe of its /models route
every `PROBE_INTERVAL_S` tells /health whether it is reachable even without traffic.

An endpoint answers whole (no streaming from it): a streamed request that it answers gets the
answer as one chunk. A local teacher is a second runtime with a queue of its own (serve.queue).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError

from edgedistill.data.remote import BadResponse, EndpointError, Request, fetch_json, request_once
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import EndpointConfig
from edgedistill.serve.protocol import ApiError
from edgedistill.serve.queue import DONE, ERROR, STARTED, TEXT, Generation, ModelQueue, TextAssembler

# The teacher endpoint's key, when it needs one (sent as a bearer token; EndpointConfig refuses to
# send it over plain http to another machine).
TEACHER_API_KEY_ENV = "EDGEDISTILL_TEACHER_API_KEY"
# Seconds a failed endpoint is left alone before a request tries it again: a dead host that times
# out would otherwise cost every teacher request the teacher's whole timeout.
RETRY_AFTER_S = 5.0
PROBE_INTERVAL_S = 10.0
PROBE_TIMEOUT_S = 2.0


def teacher_unreachable(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="teacher_unreachable")


class EndpointTeacher:
    """An OpenAI-compatible chat endpoint as the teacher. `model`: the name it serves (default: the one
    model its /models lists, else "teacher"); `concurrency`: requests in flight to it at once."""

    kind = "endpoint"

    def __init__(self, url: str, *, model: str | None = None, max_tokens: int, concurrency: int = 4):
        key_env = TEACHER_API_KEY_ENV if os.environ.get(TEACHER_API_KEY_ENV) else None
        try:
            self.endpoint = EndpointConfig(url=url, model=model or "teacher", api_key_env=key_env, retries=0,
                                           concurrency=concurrency)
        except ValidationError as exc:
            problems = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
            raise EdgedistillError(f"--teacher {url}: {problems}",
                                   "pass the base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1, "
                                   "or the path of a local model") from None
        self.model_given = model is not None
        self.max_tokens = max_tokens
        self.reachable: bool | None = None  # None: not asked yet
        self.last_error: str | None = None
        self.changed_at = time.time()
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="serve-teacher")

    def models_url(self) -> str:
        base = self.endpoint.url.rstrip("/")
        return base.removesuffix("/chat/completions") + "/models"

    def _mark(self, reachable: bool, error: str | None) -> None:
        with self._lock:
            if reachable != self.reachable:
                self.changed_at = time.time()
            self.reachable, self.last_error = reachable, error
            self._retry_at = 0.0 if reachable else time.monotonic() + RETRY_AFTER_S

    def probe(self) -> None:
        """Ask the endpoint's /models (blocking, a short timeout); learns the served model's name."""
        try:
            listed = fetch_json(self.models_url(), self.endpoint, timeout_s=PROBE_TIMEOUT_S).get("data") or []
        except (OSError, ValueError, AttributeError) as exc:
            self._mark(False, f"{self.models_url()}: {type(exc).__name__}: {exc}")
            return
        ids = [entry.get("id") for entry in listed if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
        if not self.model_given and len(ids) == 1:
            self.endpoint = self.endpoint.model_copy(update={"model": ids[0]})
        self._mark(True, None)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, messages: list[dict[str, str]], max_tokens: int | None, stop: tuple[str, ...], *,
               timeout_s: float, stream: bool = True) -> Generation:
        generation = Generation(messages, max_tokens, stop, asyncio.get_running_loop(), stream=stream)
        with self._lock:
            resting = time.monotonic() < self._retry_at
        if resting:  # failed a moment ago: do not make this request wait for it again
            generation.emit(ERROR, teacher_unreachable(f"the teacher endpoint is unreachable: {self.last_error}"))
        else:
            self._pool.submit(self._ask, generation, timeout_s)
        return generation

    def _ask(self, generation: Generation, timeout_s: float) -> None:
        if generation.cancelled:
            return
        endpoint = self.endpoint.model_copy(update={"timeout_s": timeout_s})
        try:
            completion = request_once(endpoint, Request((0, 0), generation.messages, seed=0),
                                      max_new_tokens=generation.max_tokens or self.max_tokens, temperature=0.0)
        except BadResponse as exc:  # it answered, but not this request (too long for it, say)
            self._mark(True, None)
            generation.emit(ERROR, teacher_unreachable(f"the teacher endpoint refused this request: {exc}"))
            return
        except EndpointError as exc:
            self._mark(False, str(exc))
            generation.emit(ERROR, teacher_unreachable(f"the teacher endpoint is unreachable: {exc}"))
            return
        except Exception as exc:  # a bug here must not lose the request: the student answers it
            self._mark(False, f"{type(exc).__name__}: {exc}")
            generation.emit(ERROR, teacher_unreachable(f"asking the teacher endpoint failed: {exc}"))
            return
        self._mark(True, None)
        assembler = TextAssembler(generation.stop)
        text = assembler.feed(completion.text) + assembler.finish()
        generation.emit(STARTED, completion.prompt_tokens)
        if text:
            generation.emit(TEXT, text)
        # the server's count: the answer may have been cut at a stop string after it was counted
        generation.emit(DONE, "stop" if completion.finished or assembler.stopped else "length",
                        completion.completion_tokens)

    def status(self) -> dict:
        with self._lock:
            return {"kind": self.kind, "source": self.endpoint.url, "model": self.endpoint.model,
                    "reachable": self.reachable, "last_error": self.last_error,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.changed_at))}


class LocalTeacher:
    """A local model (GGUF, ONNX or HF folder) as the teacher: its own runtime and queue."""

    kind = "local"

    def __init__(self, queue: ModelQueue, source: str):
        self.queue, self.source = queue, source

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()

    def submit(self, messages: list[dict[str, str]], max_tokens: int | None, stop: tuple[str, ...], *,
               timeout_s: float, stream: bool = True) -> Generation:
        return self.queue.submit(messages, max_tokens, stop, stream=stream)  # the caller enforces timeout_s

    def status(self) -> dict:
        return {"kind": self.kind, "source": self.source, "reachable": True, "queue": self.queue.status()}


Teacher = EndpointTeacher | LocalTeacher
