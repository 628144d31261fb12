"""The OpenAI chat-completions wire format as the service speaks it: the request's checks, the
error body, the response and its stream chunks.

    python -c "from edgedistill.serve.protocol import parse_chat_request as p; print(p(b'{\"messages\": []}'))"

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its statuses: 400
for a request that cannot be answered as written (OpenAI answers a missing parameter with 400 too),
404 for an unknown model, 413 for a body over the limit. Sampling parameters (temperature, top_p,
seed, penalties) are accepted and ignored: every runtime answers greedily, so an answer is the same
every time. Parameters that would change what comes back and that the service cannot honour
(tools, logprobs, n > 1, a JSON response format) are refused by name instead of silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

# Roles a chat template knows; OpenAI's newer "developer" role is the old "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4  # as OpenAI
# Parameters whose effect the service cannot give, and why (the error's message).
UNSUPPORTED = {
    "tools": "tool calls are not supported: the artifact answers with text",
    "functions": "function calls are not supported: the artifact answers with text",
    "logprobs": "log-probs are not returned by this service",
    "top_logprobs": "log-probs are not returned by this service",
    "audio": "audio output is not supported",
}


class ApiError(Exception):
    """A request the service answers with an OpenAI-style error body and `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def overloaded(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="server_overloaded")


@dataclass(frozen=True)
class ChatRequest:
    model: str | None  # None: the service chooses (the router)
    messages: list[dict[str, str]]
    stream: bool
    max_tokens: int | None  # None: up to the service's limit and the context
    stop: tuple[str, ...]
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _content(value, param: str) -> str:
    """A message's content: a string, None (an assistant turn without text), or text parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{i}] is not a text part ({{\"type\": \"text\", \"text\": ...}}); only text "
                           "content is supported", f"{param}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{param} must be a string or a list of text parts, not {type(value).__name__}", param, "invalid_type")


def _messages(value) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _bad(f"'messages' must be an array of messages, not {type(value).__name__}", "messages", "invalid_type")
    if not value:
        raise _bad("'messages' must hold at least one message", "messages", "empty_array")
    messages = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{param} must be an object with 'role' and 'content'", param, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{param}.role is {role!r}; supported roles: {', '.join(ROLES)}", f"{param}.role")
        messages.append({"role": ROLES[role], "content": _content(message.get("content"), f"{param}.content")})
    return messages


def _positive_int(value, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"'{param}' must be a whole number of at least 1, not {value!r}", param)
    return value


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    return tuple(stops)


def parse_chat_request(body: bytes) -> ChatRequest:
    """The request in a /v1/chat/completions body, or ApiError naming the first parameter that is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}). The body must be a JSON "
                       "object, sent with Content-Type: application/json.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"The body must be a JSON object, not {type(data).__name__}.", code="invalid_json")
    if "messages" not in data:
        raise _bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    for name, why in UNSUPPORTED.items():
        if data.get(name) not in (None, False, []):
            raise _bad(f"'{name}': {why}.", name, "unsupported_parameter")
    if data.get("n", 1) != 1:
        raise _bad(f"'n' is {data['n']!r}: answers are greedy, so every choice would be the same; ask for n = 1",
                   "n", "unsupported_parameter")
    response_format = data.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise _bad("'response_format': only {\"type\": \"text\"} is supported", "response_format",
                   "unsupported_parameter")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, not {type(model).__name__}", "model", "invalid_type")
    stream = data.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, not {stream!r}", "stream", "invalid_type")
    # max_completion_tokens is the newer name; a client may send either
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _positive_int(data[name], name) if data.get(name) is not None else None
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    return ChatRequest(model=model, messages=_messages(data["messages"]), stream=stream, max_tokens=max_tokens,
                       stop=_stop(data.get("stop")), include_usage=bool(options.get("include_usage")))


@dataclass(frozen=True)
class Answerer:
    """Who answered a request, as every response says it (the `x_edgedistill` field and headers)."""

    answered_by: str  # "student", "teacher" or (--plan) "student+teacher-plan"
    degraded: bool = False  # the teacher was asked for but could not answer: the student did
    reason: str | None = None  # why it is degraded
    confidence: float | None = None  # with --route: the student's confidence in its own answer
    teacher_tokens: int | None = None  # with --plan: the tokens of the teacher's plan
    plan: str | None = None  # with --plan: the plan the student followed

    def field(self) -> dict:
        found = {"answered_by": self.answered_by, "degraded": self.degraded}
        return (found | ({"degraded_reason": self.reason} if self.reason else {})
                | ({"student_confidence": round(self.confidence, 4)} if self.confidence is not None else {})
                | ({"teacher_tokens": self.teacher_tokens, "plan": self.plan} if self.plan is not None else {}))

    def headers(self) -> dict[str, str]:
        return {"X-Edgedistill-Answered-By": self.answered_by, "X-Edgedistill-Degraded": str(self.degraded).lower()}


class Completion:
    """The id, time and model of one answer, and the bodies that carry it."""

    def __init__(self, model: str, answerer: Answerer):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model, self.answerer = model, answerer

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, content: str, finish_reason: str, usage: dict | None) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage, "x_edgedistill": self.answerer.field()}

    def chunk(self, delta: dict, finish_reason: str | None = None, *, usage: dict | None = None,
              choices: bool = True) -> bytes:
        """One server-sent event; choices=False: the usage chunk, which has none (as OpenAI sends it)."""
        body = {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
                if choices else [], "x_edgedistill": self.answerer.field()}
        if usage is not None:
            body["usage"] = usage
        return sse(body)


def sse(body: dict) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int | None, completion_tokens: int | None) -> dict | None:
    """OpenAI's usage object; None when the answerer did not say (an endpoint teacher)."""
    if prompt_tokens is None or completion_tokens is None:
        return None
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
