"""The teacher as judge: a rubric prompt per answer to a model (the local teacher, or any
OpenAI-compatible endpoint), whose reply holds a score on the rubric's scale.

    task:
      scorers:
        - name: judge
          rubric: "Question: {prompt}\nReference: {reference}\nAnswer: {answer}\nRate the answer from 1 to 5. Reply: Score: N"
          scale: [1, 5]
          endpoint: {url: "http://127.0.0.1:8000/v1", model: teacher}   # optional; default: the teacher

The rubric is a template (edgedistill.data.templates) over {prompt} (the example's last user
turn), {answer} (the final answer scored) and {reference} (the gold or teacher-built answer; a
rubric that uses it skips examples without one). The verdict is the number after "score" in the
reply (else the last number in it), mapped from the scale onto [0, 1]; a reply without one, or
with one outside the scale, is a counted error for that example, as is an endpoint that keeps
failing after its retries. Verdicts are cached by the exact prompt sent (`cache`, a JSONL file the
eval stage keeps in its partial folder), so a killed eval asks again only what was not answered.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from edgedistill.data.templates import render, template_fields
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.scorer_base import Outcome, ScoreInput, Scorer

# a model's replies to a batch of conversations (the text, or the exception that stopped one);
# each reply is also handed to the callback as it arrives, so the cache keeps it if the rest fails
Chat = Callable[[list[list[dict[str, str]]], Callable[[int, str], None]], list["str | Exception"]]
RUBRIC_FIELDS = ("prompt", "answer", "reference")
SCORE = re.compile(r"score\D{0,20}?(-?\d+(?:\.\d+)?)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
JUDGE_MAX_NEW_TOKENS = 32


def verdict(reply: str, scale: tuple[float, float]) -> float:
    """The reply's score mapped onto [0, 1]; ValueError when it has none on the scale."""
    found = SCORE.search(reply)
    numbers = [found.group(1)] if found else NUMBER.findall(reply)
    if not numbers:
        raise ValueError(f"the judge's reply holds no score: {reply[:120]!r}")
    value = float(numbers[-1] if not found else numbers[0])
    low, high = scale
    if not low <= value <= high:
        raise ValueError(f"the judge's score {value:g} is outside the scale {low:g}-{high:g}: {reply[:120]!r}")
    return (value - low) / (high - low)


class JudgeScorer(Scorer):
    name = "judge"

    def __init__(self, rubric: str, scale: Sequence[float], chat: Chat, cache: Path | None = None):
        fields = template_fields(rubric, name="the judge's rubric")
        unknown = [field for field in fields if field not in RUBRIC_FIELDS]
        if unknown:
            raise EdgedistillError(f"the judge's rubric uses {{{unknown[0]}}}, which is not one of "
                                   f"{', '.join('{' + f + '}' for f in RUBRIC_FIELDS)}",
                                   "write the rubric over the example's prompt, the answer and the reference")
        if "answer" not in fields:
            raise EdgedistillError("the judge's rubric does not show the answer ({answer})",
                                   "put {answer} where the judge should read the answer it scores")
        if len(scale) != 2 or not scale[0] < scale[1]:
            raise EdgedistillError(f"the judge's scale {list(scale)} is not [lowest, highest]", "e.g. scale: [1, 5]")
        self.rubric, self.scale, self.chat, self.cache = rubric, (float(scale[0]), float(scale[1])), chat, cache
        self.needs_reference = "reference" in fields

    def messages(self, item: ScoreInput) -> list[dict[str, str]]:
        user_turns = [m["content"] for m in item.record.get("messages", []) if m.get("role") == "user"]
        reference = item.reference if isinstance(item.reference, str) or item.reference is None else json.dumps(
            item.reference, ensure_ascii=False)
        fields = {"prompt": user_turns[-1] if user_turns else "", "answer": item.prediction or "(empty answer)",
                  "reference": reference}
        return [{"role": "user", "content": render(self.rubric, fields, f"example {item.record.get('id')}",
                                                   name="the judge's rubric")}]

    def __call__(self, item: ScoreInput) -> float:
        outcome = self.score_batch([item])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def score_batch(self, items: list[ScoreInput]) -> list[Outcome]:
        prompts = [self.messages(item) for item in items]
        keys = [hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest() for p in prompts]
        replies = self._cached()
        todo = sorted({key: i for i, key in enumerate(keys) if key not in replies}.values())
        if todo:
            lock = threading.Lock()
            sink = open(self.cache, "a", encoding="utf-8") if self.cache is not None else None

            def keep(position: int, reply: str) -> None:  # from the endpoint's worker threads
                with lock:
                    replies[keys[todo[position]]] = reply
                    if sink is not None:
                        sink.write(json.dumps({"key": keys[todo[position]], "reply": reply}, ensure_ascii=False) + "\n")
                        sink.flush()

            try:
                answered = self.chat([prompts[i] for i in todo], keep)
            finally:
                if sink is not None:
                    sink.close()
            for i, reply in zip(todo, answered):
                replies.setdefault(keys[i], reply)  # failures are not cached: asked again next run
        outcomes: list[Outcome] = []
        for key in keys:
            reply = replies[key]
            if isinstance(reply, Exception):
                outcomes.append(reply)
                continue
            try:
                outcomes.append(verdict(reply, self.scale))
            except ValueError as exc:
                outcomes.append(exc)
        return outcomes

    def _cached(self) -> dict[str, str | Exception]:
        replies: dict[str, str | Exception] = {}
        if self.cache is not None and self.cache.is_file():
            for line in self.cache.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    replies[row["key"]] = row["reply"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill: that verdict is asked again
        return replies


def endpoint_chat(endpoint) -> Chat:
    """A Chat on an OpenAI-compatible endpoint (edgedistill.data.remote: concurrency, retries, a
    whole-request deadline); a reply that stays unusable after the retries is that example's error."""
    from edgedistill.data.remote import Request, answer_remote

    def chat(conversations: list[list[dict[str, str]]], on_reply: Callable[[int, str], None]) -> list[str | Exception]:
        replies: list[str | Exception] = [RuntimeError("no reply")] * len(conversations)
        requests = [Request((i, 0), messages, seed=0) for i, messages in enumerate(conversations)]

        def on_answer(request, completion):
            replies[request.key[0]] = completion.text
            on_reply(request.key[0], completion.text)

        def on_skip(request, error):
            replies[request.key[0]] = RuntimeError(f"judge endpoint: {error}")

        answer_remote(endpoint, requests, max_new_tokens=JUDGE_MAX_NEW_TOKENS, temperature=0.0,
                      on_answer=on_answer, on_skip=on_skip)
        return replies

    return chat


def runtime_chat(runtime, batch_size: int = 16) -> Chat:
    """A Chat on an open edgedistill Runtime (the teacher eval already holds), greedy."""

    def chat(conversations: list[list[dict[str, str]]], on_reply: Callable[[int, str], None]) -> list[str | Exception]:
        replies: list[str | Exception] = []
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start:start + batch_size]
            for answer, _ in runtime.generate(batch, JUDGE_MAX_NEW_TOKENS):
                on_reply(len(replies), answer)
                replies.append(answer)
        return replies

    return chat
