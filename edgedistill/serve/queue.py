"""One loaded model's answers, one at a time, behind a bounded queue.

    python -m pytest -q tests/test_serve.py -k queue

A runtime is not thread-safe (llama.cpp's context, ONNX Runtime GenAI's generator and PyTorch's KV
cache each hold one sequence), so every call into it happens on the model's own worker thread, one
generation after another. Requests wait in a queue of at most `max_waiting`; past that the service
answers 503 at once rather than letting latency grow without bound. The event loop hands a request
over as a `Generation` and reads its events (started, text pieces, done, or an error) from an
asyncio queue that the worker fills; `Generation.cancel()` (a timeout, a client gone) stops the
worker at the next token.

The text sent is the runtime's own greedy answer: prompt_ids, greedy_ids until an end token, decoded
by the runtime's decode, stripped of surrounding whitespace as every runtime's generate strips it,
and cut before the first of the request's stop strings.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from jinja2.exceptions import TemplateError

from edgedistill.errors import EdgedistillError
from edgedistill.runtimes import Runtime
from edgedistill.runtimes.common import stream_pieces
from edgedistill.serve.protocol import ApiError, overloaded

log = logging.getLogger(__name__)

# the events a Generation receives, each a tuple starting with its kind
STARTED = "started"  # (STARTED, prompt_tokens | None)
TEXT = "text"  # (TEXT, piece)
DONE = "done"  # (DONE, finish_reason, completion_tokens | None)
ERROR = "error"  # (ERROR, ApiError)


class TextAssembler:
    """The answer's text as it may be sent, piece by piece: leading and trailing whitespace left out
    (a trailing run is held back until text follows it), and nothing from the first stop string on
    (a piece that may begin one is held back until it is clear). `stopped` once a stop string came."""

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop, self.pending, self.started, self.stopped = stop, "", False, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + piece
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, self.pending = True, ""
            return text[:min(found)].rstrip()
        begun = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        sent = text[:len(text) - begun].rstrip()
        self.pending = text[len(sent):]
        return sent

    def finish(self) -> str:
        """What was held back, at the answer's end (a stop string's beginning that never completed)."""
        rest, self.pending = self.pending.rstrip(), ""
        return "" if self.stopped else rest


class Generation:
    """One request handed to a model's worker thread; its events arrive on `events` in the event loop."""

    def __init__(self, messages: list[dict[str, str]], max_tokens: int | None, stop: tuple[str, ...],
                 loop: asyncio.AbstractEventLoop, *, stream: bool = True, judge=None, count: str | None = None):
        self.messages, self.max_tokens, self.stop = messages, max_tokens, stop
        # count: a text whose length in the model's tokens the worker puts in `counted_tokens` before
        # the STARTED event (a plan from a teacher endpoint, which does not say how long it was)
        self.count, self.counted_tokens = count, None
        # judge(runtime, messages, answer) -> float, run on the worker after the answer, before its last
        # events: the routed student's confidence in it (`confidence`), which the handler reads
        self.judge, self.confidence = judge, None
        # False: the text comes as one TEXT event at the end. Waking the event loop for every token
        # costs a thread switch each (and a GIL hand-over) that a whole answer does not need.
        self.stream = stream
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop at the next token (or skip it, still waiting): nobody reads the answer any more."""
        self._cancelled.set()

    def emit(self, *event) -> None:
        """From any thread: an event for the request's handler."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop has closed (shutdown): nobody is left to read it


class ModelQueue:
    """A loaded runtime's worker thread and its queue. `max_tokens`: the most tokens one answer may
    take (a request asking for more is refused before it is queued; see check_max_tokens)."""

    def __init__(self, runtime: Runtime, *, name: str, max_waiting: int, max_tokens: int):
        self.runtime, self.name, self.max_waiting, self.max_tokens = runtime, name, max_waiting, max_tokens
        self._jobs: queue.Queue[Generation | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._current: Generation | None = None
        self._closed = False
        self.counts = {"answered": 0, "cancelled": 0, "failed": 0}
        self._thread = threading.Thread(target=self._work, name=f"serve-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check_max_tokens(self, max_tokens: int | None) -> None:
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise ApiError(400, f"max_tokens is too large: {max_tokens}. This service answers with at most "
                           f"{self.max_tokens} completion tokens (edgedistill serve --max-tokens).",
                           param="max_tokens", code="invalid_value")

    def submit(self, messages: list[dict[str, str]], max_tokens: int | None, stop: tuple[str, ...], *,
               stream: bool = True, judge=None, count: str | None = None) -> Generation:
        """The request, queued; ApiError 503 when `max_waiting` requests already wait or the service stops."""
        self.check_max_tokens(max_tokens)
        generation = Generation(messages, max_tokens, stop, asyncio.get_running_loop(), stream=stream, judge=judge,
                                count=count)
        with self._lock:
            if self._closed:
                raise overloaded("The service is shutting down.")
            if self._waiting >= self.max_waiting:
                raise overloaded(f"The {self.name} is busy: {self._waiting} requests are waiting already "
                                 f"(edgedistill serve --queue {self.max_waiting}). Retry shortly.")
            self._waiting += 1
            self._jobs.put(generation)
        return generation

    def status(self) -> dict:
        with self._lock:
            return {"waiting": self._waiting, "max_waiting": self.max_waiting, "busy": self._current is not None,
                    **self.counts}

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, answer the waiting ones 503, cancel the running one, end the thread."""
        with self._lock:
            self._closed = True
            current = self._current
            waiting = []
            while True:
                try:
                    waiting.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._waiting = 0
        for generation in waiting:
            if generation is not None:
                generation.emit(ERROR, overloaded("The service is shutting down."))
        if current is not None:
            current.cancel()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _work(self) -> None:
        while (generation := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self._current = generation
            try:
                if generation.cancelled:
                    self._count("cancelled")
                    continue
                self._answer(generation)
            except Exception as exc:  # a bug or a runtime failure: this request fails, the service goes on
                log.exception("the %s failed while answering", self.name)
                self._count("failed")
                generation.emit(ERROR, ApiError(500, f"The {self.name} failed while answering: "
                                                f"{type(exc).__name__}: {exc}", type="server_error",
                                                code="generation_failed"))
            finally:
                with self._lock:
                    self._current = None

    def _prompt(self, generation: Generation) -> tuple[list[int], int] | None:
        """The prompt's ids and how many tokens the answer may take, or None (an error was sent)."""
        try:
            prompt = self.runtime.prompt_ids(generation.messages)
        except (TemplateError, EdgedistillError) as exc:  # a template's raise_exception: roles out of order
            generation.emit(ERROR, ApiError(400, f"The {self.name}'s chat template cannot render these messages: "
                                            f"{exc}", param="messages", code="invalid_value"))
            return None
        context = self.runtime.context_length
        if context is None:
            return prompt, generation.max_tokens or self.max_tokens
        asked = generation.max_tokens or 1
        if len(prompt) + asked > context:
            generation.emit(ERROR, ApiError(
                400, f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt) + asked} tokens ({len(prompt)} in the messages, {asked} in the completion). Please "
                "reduce the length of the messages or completion.", param="messages", code="context_length_exceeded"))
            return None
        return prompt, generation.max_tokens or min(self.max_tokens, context - len(prompt))

    def _answer(self, generation: Generation) -> None:
        found = self._prompt(generation)
        if found is None:
            return
        prompt, max_new_tokens = found
        if generation.count is not None:
            generation.counted_tokens = len(self.runtime.encode(generation.count, add_special=False))
        generation.emit(STARTED, len(prompt))
        runtime, ids, finish = self.runtime, [], ["length"]
        tokens = runtime.greedy_ids(prompt, max_new_tokens)

        def answer_tokens():
            for token in tokens:
                if generation.cancelled:
                    return
                if runtime.is_end(token):
                    finish[0] = "stop"
                    return
                ids.append(token)
                yield token

        assembler, sent, held = TextAssembler(generation.stop), "", []
        try:
            for piece in stream_pieces(answer_tokens(), runtime.decode):
                sent += piece
                if text := assembler.feed(piece):
                    if generation.stream:
                        generation.emit(TEXT, text)
                    else:
                        held.append(text)
                if assembler.stopped:
                    finish[0] = "stop"
                    break
        finally:
            tokens.close()
        if generation.cancelled:
            self._count("cancelled")
            return
        # stream_pieces holds back a last piece that ends inside a character; the whole answer has it
        whole = runtime.decode(ids) if ids else ""
        rest = whole[len(sent):] if whole.startswith(sent) and not assembler.stopped else ""
        text = "".join(held) + assembler.feed(rest) + assembler.finish()
        if generation.judge is not None:
            generation.confidence = generation.judge(runtime, generation.messages, text)
        if text:
            generation.emit(TEXT, text)
        self._count("answered")
        generation.emit(DONE, finish[0], len(ids))
