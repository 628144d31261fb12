"""The teacher as judge (issue 14, item 2): a rubric to a model, a score on a scale, failures
counted, verdicts cached so a killed eval resumes; a real OpenAI-compatible server on loopback.

    python -m pytest -q tests/test_judge.py
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgedistill.data import remote
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.judge import JudgeScorer, verdict
from edgedistill.evaluate.scorers import ScoreInput, ScorerSpec, build_scorers, score_all
from edgedistill.recipe import EndpointConfig

RUBRIC = "Question: {prompt}\nReference: {reference}\nAnswer: {answer}\nRate it 1-5 as: Score: N"


def item(i: int, answer: str = "Paris", reference: str | None = "Paris") -> ScoreInput:
    return ScoreInput(answer, reference, {"id": i, "messages": [{"role": "user", "content": f"Capital {i}?"}]})


class ScriptedChat:
    """Replies from a list, recording what it was asked; raises once `fail_after` replies are given."""

    def __init__(self, replies, fail_after=None):
        self.replies, self.fail_after, self.asked = list(replies), fail_after, []

    def __call__(self, conversations, on_reply):
        out = []
        for position, conversation in enumerate(conversations):
            if self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise EdgedistillError("the judge endpoint is down", "start it again")
            self.asked.append(conversation[0]["content"])
            reply = self.replies[len(self.asked) - 1]
            on_reply(position, reply)
            out.append(reply)
        return out


@pytest.mark.unit
@pytest.mark.parametrize("reply, expected", [
    ("Score: 5", 1.0), ("score 1", 0.0), ("I'd say 3.", 0.5), ("**Score:** 4/5", 0.75),
    ("The answer is 2 of 3 parts right. Score: 2", 0.25),
])
def test_a_verdict_is_the_score_on_the_scale(reply, expected):
    assert verdict(reply, (1, 5)) == expected


@pytest.mark.unit
@pytest.mark.parametrize("reply, problem", [("Great answer!", "holds no score"), ("Score: 9", "outside the scale 1-5")])
def test_a_reply_without_a_score_on_the_scale_is_an_error(reply, problem):
    with pytest.raises(ValueError, match=problem):
        verdict(reply, (1, 5))


@pytest.mark.unit
def test_the_rubric_is_checked_when_the_scorer_is_built():
    chat = ScriptedChat([])
    with pytest.raises(EdgedistillError, match=r"uses \{question\}, which is not one of"):
        JudgeScorer("{question} {answer}", (1, 5), chat)
    with pytest.raises(EdgedistillError, match=r"does not show the answer"):
        JudgeScorer("{prompt}", (1, 5), chat)
    with pytest.raises(EdgedistillError, match=r"has no model to ask"):
        build_scorers([ScorerSpec("judge", rubric=RUBRIC)], base_dir=".", allow_code=False, schema=None, labels=None)
    assert JudgeScorer("{prompt} {answer}", (0, 10), chat).needs_reference is False


@pytest.mark.unit
def test_bad_replies_are_counted_and_verdicts_resume_from_the_cache(tmp_path):
    cache = tmp_path / "judge.jsonl"
    items = [item(i) for i in range(4)] + [item(4, reference=None)]
    down = ScriptedChat(["Score: 5", "no idea"], fail_after=2)
    [judge] = build_scorers([ScorerSpec("judge", rubric=RUBRIC)], base_dir=".", allow_code=False, schema=None,
                            labels=None, judge_chat=down, judge_cache=cache)
    with pytest.raises(EdgedistillError, match="the judge endpoint is down"):
        score_all([judge], items)
    assert len(cache.read_text().splitlines()) == 2  # the two replies given are kept
    up = ScriptedChat(["Score: 3", "Score: 1"])
    judge.chat = up
    result = score_all([judge], items)["judge"]
    assert len(up.asked) == 2, "only what was not answered is asked again"
    assert "Reference: Paris\nAnswer: Paris" in up.asked[0]
    assert result.values == [1.0, None, 0.5, 0.0, None] and result.errors == 1 and result.skipped_no_reference == 1
    assert "holds no score" in result.first_error


@pytest.fixture
def judge_server():
    """A loopback OpenAI-compatible server that answers "Score: 4" and records the prompts it got;
    `fail` makes it answer 503 instead."""
    state = {"prompts": [], "fail": False}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["prompts"].append(body["messages"][-1]["content"])
            if state["fail"]:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            payload = json.dumps({"choices": [{"message": {"content": "Score: 4"}, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", state
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_an_endpoint_judges_and_a_dead_one_stops_with_its_verdicts_kept(judge_server, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.01)
    url, state = judge_server
    spec = ScorerSpec("judge", rubric=RUBRIC, endpoint={"url": url, "retries": 1, "timeout_s": 5})
    cache = tmp_path / "judge.jsonl"
    [judge] = build_scorers([spec], base_dir=".", allow_code=False, schema=None, labels=None, judge_cache=cache)
    result = score_all([judge], [item(i) for i in range(3)])["judge"]
    assert result.values == [0.75, 0.75, 0.75] and len(state["prompts"]) == 3
    assert sorted(p.split("\n")[0] for p in state["prompts"]) == [f"Question: Capital {i}?" for i in range(3)]
    state["fail"] = True
    with pytest.raises(EdgedistillError) as info:
        score_all([judge], [item(i) for i in range(5)])  # 3 cached, 2 asked of a dead server
    assert url in str(info.value)
    assert len(cache.read_text().splitlines()) == 3


class Teacher:
    """A scripted runtime: answers the task's prompts from a table and, asked as a judge, gives
    Score: 5 when the answer shown equals the reference shown, else Score: 1."""

    context_length = None

    def __init__(self, answers):
        self.answers, self.judged = answers, 0

    def prompt_ids(self, messages, *, add_generation_prompt=True):
        return [0]

    def generate(self, conversations, max_new_tokens):
        out = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            if text.startswith("Question:"):
                self.judged += 1
                reference = text.split("Reference: ")[1].split("\n")[0]
                answer = text.split("Answer: ")[1].split("\n")[0]
                out.append((f"Score: {5 if answer == reference else 1}", True))
            else:
                out.append((self.answers.get(text, ""), True))
        return out


@pytest.mark.unit
def test_the_teacher_judges_in_eval_and_only_the_answer_after_the_separator_is_scored(tmp_path, monkeypatch):
    from edgedistill import layout
    from edgedistill.evaluate import task

    data = tmp_path / layout.HELDOUT_JSONL
    records = [{"id": i, "messages": [{"role": "user", "content": f"Capital {i}?"}], "reference": f"City{i}"}
               for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / layout.TASK_JSON).write_text(json.dumps({
        "kind": "generation", "labels": None, "schema": None, "answer_separator": "### Answer",
        "scorers": [{"name": "judge", "rubric": RUBRIC}, {"name": "exact_match"}]}))
    teacher = Teacher({f"Capital {i}?": f"Thinking.\n### Answer\nCity{i}" for i in range(6)})
    student = Teacher({f"Capital {i}?": f"Hmm.\n### Answer\nCity{i if i < 3 else 0}" for i in range(6)})
    monkeypatch.setattr(task, "_open", lambda artifact, device, dtype: teacher if artifact.name == "teacher" else student)
    cache = tmp_path / layout.JUDGE_JSONL
    report = task.evaluate([tmp_path / "student"], data, tmp_path / "teacher", max_new_tokens=8, score_records=0,
                           judge_cache=cache).to_dict()
    ref, row = report["reference"], report["artifacts"][0]
    assert ref["scores"]["judge"]["mean"] == 1.0 and ref["scores"]["exact_match"]["mean"] == 1.0
    assert row["scores"]["judge"]["mean"] == 0.5 and row["scores"]["exact_match"]["mean"] == 0.5
    # 6 verdicts on its own answers, 3 on the student's wrong ones; its right ones read like the teacher's (cached)
    assert row["task_score"] == 0.5 and teacher.judged == 9 and student.judged == 0
    assert len(cache.read_text().splitlines()) == 9
    teacher.judged = 0
    task.evaluate([tmp_path / "student"], data, tmp_path / "teacher", max_new_tokens=8, score_records=0,
                  judge_cache=cache)
    assert teacher.judged == 0, "every verdict came from the cache"
