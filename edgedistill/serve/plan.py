"""Plan-and-execute: the teacher writes a short plan for a request, the student writes the answer
following it, so that the teacher's tokens go where they may matter most and its answer's length
does not.

    edgedistill serve runs/past-tense/export/student-q4_k_m.gguf \\
        --teacher runs/past-tense/teacher_gguf/teacher-q4_k_m.gguf --plan --plan-max-tokens 48
    .venv/bin/python tools/bench_plan_execute.py runs/past-tense      # against student and teacher alone

The prompts, the only place they are written (the service and tools/bench_plan_execute.py use them
alike): a `PlanPrompt` has the teacher's `instruction` and the student's `student` template.

- The teacher is asked with the conversation whose last user message is replaced by `instruction`,
  its {request} being that message's text; it answers greedily, with at most `max_tokens` tokens
  (a plan cut there is used as it is).
- The student answers the conversation whose last user message is replaced by `student`, {request}
  being that message's text and {plan} the teacher's plan: the plan goes into the user's turn, in
  plain words, since a distilled student has only seen user turns and its chat template's own
  system message. An empty plan leaves the conversation as it was.
- A conversation without a user message has nothing to plan for: the student answers it alone.

Measured on recipes/past-tense.yaml (README, "Serving and routing the default student"), with all
three prompts below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgedistill.errors import EdgedistillError

DEFAULT_PLAN_MAX_TOKENS = 48
_FIELD = re.compile(r"\{(request|plan)\}")


@dataclass(frozen=True)
class PlanPrompt:
    name: str
    instruction: str  # the teacher's user message; {request}: the request's last user message
    student: str  # the student's user message; {request}, {plan}


PLAN_PROMPTS = {prompt.name: prompt for prompt in (
    # a plan in the usual sense: what the answer must do, not the answer
    PlanPrompt("steps", "Do not answer the request below. In one or two short sentences, write a plan for the "
               "answer: what it must do and what to watch for.\n\nRequest: {request}",
               "{request}\n\nPlan: {plan}"),
    # the few words or facts the answer needs, which a small student may lack
    PlanPrompt("keywords", "Do not answer the request below in full. List only the few key words or facts a "
               "correct answer needs, separated by commas.\n\nRequest: {request}",
               "{request}\n\nKey words: {plan}"),
    # the teacher's own answer, cut at the plan's budget, for the student to check and finish
    PlanPrompt("draft", "{request}", "{request}\n\nA draft answer to check and correct: {plan}"),
)}
DEFAULT_PLAN_PROMPT = "steps"


@dataclass(frozen=True)
class Planner:
    """How the service plans: the prompt and the most tokens a plan may take."""

    prompt: PlanPrompt
    max_tokens: int = DEFAULT_PLAN_MAX_TOKENS

    def __post_init__(self):
        if self.max_tokens < 1:
            raise EdgedistillError(f"--plan-max-tokens {self.max_tokens} must be at least 1",
                                   f"pass a small budget such as {DEFAULT_PLAN_MAX_TOKENS}")


def plan_prompt(name: str) -> PlanPrompt:
    if name not in PLAN_PROMPTS:
        raise EdgedistillError(f"no plan prompt named {name!r}", f"use one of {', '.join(PLAN_PROMPTS)}")
    return PLAN_PROMPTS[name]


def _fill(template: str, **values: str) -> str:
    # one pass, so that a request holding the text "{plan}" is left as it is
    return _FIELD.sub(lambda match: values[match.group(1)], template)


def _last_user(messages: list[dict[str, str]]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)


def _with_last_user(messages: list[dict[str, str]], index: int, content: str) -> list[dict[str, str]]:
    return [*messages[:index], {"role": "user", "content": content}, *messages[index + 1:]]


def teacher_messages(messages: list[dict[str, str]], prompt: PlanPrompt) -> list[dict[str, str]] | None:
    """What the teacher is asked for a plan; None when there is no user message to plan for."""
    index = _last_user(messages)
    if index is None:
        return None
    return _with_last_user(messages, index, _fill(prompt.instruction, request=messages[index]["content"]))


def student_messages(messages: list[dict[str, str]], plan: str, prompt: PlanPrompt) -> list[dict[str, str]]:
    """What the student answers: the conversation with the plan in its last user message."""
    index = _last_user(messages)
    plan = plan.strip()
    if index is None or not plan:
        return messages
    return _with_last_user(messages, index, _fill(prompt.student, request=messages[index]["content"], plan=plan))
