"""The FastAPI app of `edgedistill serve`: /v1/chat/completions (whole or streamed as server-sent
events), /v1/models and /health over an opened runtime.

    python -c "from edgedistill.runtimes import open_runtime; from edgedistill.serve.app import create_app; \
create_app(open_runtime('model.gguf'), name='model')"

`create_app` takes runtimes already opened, so tests and tools build the same app the command runs.
A request's life: the body is read up to the size limit (413), parsed (400), its model resolved
(404: unknown; the router decides for the served name), then queued for the model's worker (503
when the queue is full). The first event from the worker decides the response: an error (a prompt
past the context: 400) is sent as such, otherwise the answer is, whole or chunk by chunk. The
per-request timeout covers the wait in the queue and the answer (504, or an error event in a
stream); a client that goes away cancels its generation at the next token. A request for the
teacher that the teacher cannot answer is answered by the student, marked degraded.

With a PlanRouter (`--plan`, serve.plan) a request for the served name is planned: the teacher's
plan comes whole first (at most plan_max_tokens, within the teacher's share of the timeout), then
the student's answer following it is sent, whole or streamed, as any student answer is; when the
teacher cannot plan, or the plan beside the request does not fit the student's context, the
student answers the request as it came, marked degraded.

Every answer says who gave it: `x_edgedistill: {"answered_by", "degraded"}` in the body (every
chunk of a stream too) and the X-Edgedistill-Answered-By / X-Edgedistill-Degraded headers; /health
counts answers by who gave them. A planned answer is "student+teacher-plan", and its field adds
`plan` and `teacher_tokens`: the plan's length as the teacher counted it (a local teacher, or an
endpoint's `usage`), or in the student's tokens when an endpoint does not say (a distilled student
shares the teacher's tokenizer); /health adds them up in `teacher_plan_tokens`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from edgedistill.runtimes import Runtime
from edgedistill.serve.protocol import (SSE_DONE, Answerer, ApiError, ChatRequest, Completion, parse_chat_request,
                                        sse, usage)
from edgedistill.serve.queue import DONE, ERROR, STARTED, TEXT, Generation, ModelQueue
from edgedistill.serve.plan import student_messages, teacher_messages
from edgedistill.serve.router import PLAN, PLANNED, ROUTED, STUDENT, TEACHER, ExplicitRouter, PlanRouter, Router, Who
from edgedistill.serve.teacher import PROBE_INTERVAL_S, EndpointTeacher, Teacher

@dataclass(frozen=True)
class ServeSettings:
    max_waiting: int = 32  # requests that may wait for a model while it answers another; more get 503
    max_tokens: int = 1024  # the most completion tokens one request may ask for
    timeout_s: float = 120.0  # per request: queue wait and answer
    max_body_bytes: int = 1 << 20
    # A request for the teacher gets this share of timeout_s; the student answers in the rest when
    # the teacher has not.
    teacher_share: float = 0.5
    probe_interval_s: float = PROBE_INTERVAL_S


class ClientGone(Exception):
    """The client closed its connection before the answer began."""


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects: once the body is read, the server's receive() answers
    only that. One wait per request, instead of polling Request.is_disconnected(), which would wake
    the event loop (and take the GIL from the worker thread) for every waiting request again and again."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _served_ids(name: str, teacher: Teacher | None) -> list[str]:
    return [name, STUDENT] + ([TEACHER] if teacher is not None else [])


def create_app(student: Runtime, *, name: str, settings: ServeSettings = ServeSettings(),
               teacher: Teacher | None = None, router: Router | None = None, api_key: str | None = None,
               artifact: str | None = None) -> FastAPI:
    """The service over the opened runtime `student`, served as model `name`; `api_key`: required as
    a bearer token on every request when given."""
    router = router or ExplicitRouter()
    students = ModelQueue(student, name=STUDENT, max_waiting=settings.max_waiting, max_tokens=settings.max_tokens)
    planning = isinstance(router, PlanRouter)
    answered: Counter[str] = Counter({STUDENT: 0, TEACHER: 0, **({PLANNED: 0} if planning else {})})
    counts: Counter[str] = Counter()  # degraded answers and errors by status
    started_at = time.time()

    async def probe_teacher() -> None:
        while True:
            await asyncio.to_thread(teacher.probe)
            await asyncio.sleep(settings.probe_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        students.start()
        if teacher is not None:
            teacher.start()
        prober = asyncio.create_task(probe_teacher()) if isinstance(teacher, EndpointTeacher) else None
        try:
            yield
        finally:
            if prober is not None:
                prober.cancel()
                with suppress(asyncio.CancelledError):
                    await prober
            await asyncio.to_thread(students.stop)
            if teacher is not None:
                await asyncio.to_thread(teacher.stop)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>', the key "
                           "being the server's EDGEDISTILL_API_KEY.", code="invalid_api_key")

    app = FastAPI(title="edgedistill serve", lifespan=lifespan, dependencies=[Depends(check_key)],
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        counts[f"errors_{exc.status}"] += 1
        return JSONResponse(exc.body(), status_code=exc.status,
                            headers={"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = (f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404
                   else f"{exc.detail}: {request.method} {request.url.path}.")
        return await api_error(request, ApiError(exc.status_code, message, code="unknown_url"))

    def resolve(request: ChatRequest) -> Who:
        if request.model in (None, name):
            return router.choose(request)
        if request.model == STUDENT or (request.model == TEACHER and teacher is not None):
            return request.model
        raise ApiError(404, f"The model `{request.model}` does not exist or you do not have access to it. This "
                       f"service answers as: {', '.join(_served_ids(name, teacher))}.", param="model",
                       code="model_not_found")

    async def next_event(generation: Generation, deadline: float, gone: asyncio.Task | None = None) -> tuple:
        """The generation's next event by `deadline` (loop time), unless the client is `gone` first."""
        getter = asyncio.ensure_future(generation.events.get())
        await asyncio.wait({getter} | ({gone} if gone is not None else set()),
                           timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                           return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        generation.cancel()
        if gone is not None and gone.done():
            raise ClientGone()
        raise ApiError(504, f"No answer within the service's per-request timeout of {settings.timeout_s:g} s "
                       "(edgedistill serve --timeout-s).", type="server_error", code="timeout")

    async def ask_teacher(messages: list[dict[str, str]], max_tokens: int | None, stop: tuple[str, ...],
                          stream: bool, deadline: float, gone: asyncio.Task) -> tuple[Generation, tuple] | str:
        """The teacher's generation and its first event, or why it could not answer."""
        loop = asyncio.get_running_loop()
        timeout_s = max(0.1, min(deadline - loop.time(), settings.timeout_s * settings.teacher_share))
        try:
            generation = teacher.submit(messages, max_tokens, stop, timeout_s=timeout_s, stream=stream)
            # a second of slack: an endpoint's own deadline should fire first, with its reason
            first = await next_event(generation, loop.time() + timeout_s + 1.0, gone)
        except ApiError as exc:  # a local teacher's full queue, or its timeout
            return exc.message
        return (generation, first) if first[0] != ERROR else first[1].message

    async def routed(chat: ChatRequest, deadline: float, gone: asyncio.Task) -> tuple[Answerer, Generation, tuple]:
        """The student's whole answer first; the teacher's instead when the router defers on the student's
        confidence in it (the student's, marked degraded, when the teacher cannot answer)."""
        generation = students.submit(chat.messages, chat.max_tokens, chat.stop, stream=False, judge=router.confidence)
        events = [await next_event(generation, deadline, gone)]
        while events[-1][0] not in (DONE, ERROR):
            events.append(await next_event(generation, deadline, gone))
        if events[-1][0] == ERROR:
            raise events[-1][1]
        value = generation.confidence
        answerer = Answerer(STUDENT, confidence=value)
        if teacher is not None and value is not None and router.defers(value):
            found = await ask_teacher(chat.messages, chat.max_tokens, chat.stop, chat.stream, deadline, gone)
            if not isinstance(found, str):
                counts["deferred"] += 1
                return Answerer(TEACHER, confidence=value), *found
            counts["degraded"] += 1
            answerer = Answerer(STUDENT, degraded=True, reason=found, confidence=value)
        # the student's events, handed on as if they were coming now
        replay = Generation(chat.messages, chat.max_tokens, chat.stop, asyncio.get_running_loop(), stream=False)
        for event in events[1:]:
            replay.events.put_nowait(event)
        return answerer, replay, events[0]

    async def plan(messages: list[dict[str, str]], deadline: float, gone: asyncio.Task) -> tuple[str, int | None] | str:
        """The teacher's plan for `messages` and its length in the teacher's tokens (None: not said),
        or why the teacher could not write one."""
        found = await ask_teacher(messages, router.planner.max_tokens, (), False, deadline, gone)
        if isinstance(found, str):
            return found
        generation, event = found
        pieces = []
        while event[0] != DONE:
            if event[0] == ERROR:
                return event[1].message
            if event[0] == TEXT:
                pieces.append(event[1])
            event = await next_event(generation, deadline, gone)
        return "".join(pieces), event[2]

    async def planned(chat: ChatRequest, deadline: float, gone: asyncio.Task) -> tuple[Answerer, Generation, tuple]:
        """The teacher's plan, then the student's answer following it (module docstring)."""
        asked = teacher_messages(chat.messages, router.planner.prompt)
        if asked is None:
            return await by_student(chat, chat.messages, Answerer(STUDENT), deadline, gone)
        found = await plan(asked, deadline, gone)
        if isinstance(found, str):
            counts["degraded"] += 1
            return await by_student(chat, chat.messages, Answerer(STUDENT, degraded=True, reason=found), deadline,
                                    gone)
        text, teacher_tokens = found
        try:
            _, generation, first = await by_student(
                chat, student_messages(chat.messages, text, router.planner.prompt), Answerer(PLANNED), deadline,
                gone, count=text if teacher_tokens is None else None)
        except ApiError as exc:
            if exc.code != "context_length_exceeded":
                raise
            # the request fits the student, the plan beside it does not: the student answers as asked
            counts["degraded"] += 1
            reason = f"the teacher's plan did not fit the student's context: {exc.message}"
            return await by_student(chat, chat.messages, Answerer(STUDENT, degraded=True, reason=reason), deadline,
                                    gone)
        teacher_tokens = generation.counted_tokens if teacher_tokens is None else teacher_tokens
        counts["teacher_plan_tokens"] += teacher_tokens
        return Answerer(PLANNED, teacher_tokens=teacher_tokens, plan=text), generation, first

    async def by_student(chat: ChatRequest, messages: list[dict[str, str]], answerer: Answerer, deadline: float,
                         gone: asyncio.Task, count: str | None = None) -> tuple[Answerer, Generation, tuple]:
        generation = students.submit(messages, chat.max_tokens, chat.stop, stream=chat.stream, count=count)
        first = await next_event(generation, deadline, gone)
        if first[0] == ERROR:
            raise first[1]
        return answerer, generation, first

    async def start(chat: ChatRequest, who: Who, deadline: float,
                    gone: asyncio.Task) -> tuple[Answerer, Generation, tuple]:
        if who == ROUTED:
            return await routed(chat, deadline, gone)
        if who == PLAN and teacher is not None:
            return await planned(chat, deadline, gone)
        answerer = Answerer(STUDENT)
        if who == TEACHER:
            found = await ask_teacher(chat.messages, chat.max_tokens, chat.stop, chat.stream, deadline, gone)
            if not isinstance(found, str):
                return Answerer(TEACHER), *found
            counts["degraded"] += 1
            answerer = Answerer(STUDENT, degraded=True, reason=found)
        return await by_student(chat, chat.messages, answerer, deadline, gone)

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
            elif size > 16 * limit:
                break  # read (and dropped) past the limit so that the client sees the 413, up to a point
        if size > limit:
            raise ApiError(413, f"The request body is {'over ' if size > 16 * limit else ''}{size} bytes; this "
                           f"service takes at most {limit}.", code="request_too_large")
        return bytes(body)

    def answered_by(answerer: Answerer) -> None:
        answered[answerer.answered_by] += 1

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        deadline = asyncio.get_running_loop().time() + settings.timeout_s
        chat = parse_chat_request(await read_body(request))
        who = resolve(chat)
        students.check_max_tokens(chat.max_tokens)
        # watches the connection until the answer begins (a stream's StreamingResponse watches it after)
        gone = asyncio.create_task(client_gone(request))
        try:
            answerer, generation, first = await start(chat, who, deadline, gone)
            completion = Completion(chat.model or name, answerer)
            prompt_tokens = first[1] if first[0] == STARTED else None
            if chat.stream:
                return StreamingResponse(stream(completion, generation, chat, prompt_tokens, deadline),
                                         media_type="text/event-stream",
                                         headers={**answerer.headers(), "Cache-Control": "no-cache"})
            pieces = []
            while (event := await next_event(generation, deadline, gone))[0] == TEXT:
                pieces.append(event[1])
        except ClientGone:
            counts["client_gone"] += 1
            return Response(status_code=499)  # nobody reads it
        finally:
            gone.cancel()
        if event[0] == ERROR:
            raise event[1]
        answered_by(answerer)
        return JSONResponse(completion.whole("".join(pieces), event[1], usage(prompt_tokens, event[2])),
                            headers=answerer.headers())

    async def stream(completion: Completion, generation: Generation, chat: ChatRequest, prompt_tokens: int | None,
                     deadline: float) -> AsyncIterator[bytes]:
        # Starlette cancels this generator when the client disconnects: `finally` then stops the worker.
        ended = False
        try:
            yield completion.chunk({"role": "assistant", "content": ""})
            while True:
                event = await next_event(generation, deadline)
                if event[0] == TEXT:
                    yield completion.chunk({"content": event[1]})
                elif event[0] == DONE:
                    yield completion.chunk({}, event[1])
                    if chat.include_usage:
                        yield completion.chunk({}, usage=usage(prompt_tokens, event[2]), choices=False)
                    yield SSE_DONE
                    ended = True
                    answered_by(completion.answerer)
                    return
                else:
                    raise event[1]
        except ApiError as exc:  # the status line has gone out: the error travels as an event
            ended = True
            counts[f"errors_{exc.status}"] += 1
            yield sse(exc.body())
        finally:
            if not ended:
                counts["client_gone"] += 1
            generation.cancel()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": int(started_at),
                                            "owned_by": "edgedistill"} for model in _served_ids(name, teacher)]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict:
        if model not in _served_ids(name, teacher):
            raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        return {"id": model, "object": "model", "created": int(started_at), "owned_by": "edgedistill"}

    @app.get("/health")
    async def health() -> dict:
        teacher_status = teacher.status() if teacher is not None else None
        degraded_now = teacher_status is not None and teacher_status["reachable"] is False
        return {"status": "degraded" if degraded_now else "ok", "model": name, "artifact": artifact,
                "uptime_s": round(time.time() - started_at, 1), "answered_by": dict(answered),
                "degraded_answers": counts["degraded"], "deferred_to_teacher": counts["deferred"],
                **({"teacher_plan_tokens": counts["teacher_plan_tokens"]} if planning else {}),
                "client_gone": counts["client_gone"],
                "errors": {key.removeprefix("errors_"): n for key, n in sorted(counts.items())
                           if key.startswith("errors_")},
                "student": students.status(), "teacher": teacher_status}

    return app
