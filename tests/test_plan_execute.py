"""`edgedistill serve --plan`: the teacher writes a short plan, the student answers following it.

    .venv/bin/python -m pytest -q tests/test_plan_execute.py

The prompts' rewriting is checked without a model; the service runs in uvicorn (test_serve's
`running`) over the tiny student GGUF in llama.cpp and is asked with the real `openai` client, the
teacher being a tiny GGUF of other weights: a local one (its own queue) and a real llama-cpp-python
server, killed mid-test to check that the student then answers alone, marked degraded.
"""

from __future__ import annotations

import pytest
from test_generate import free_port, start_llama_server
from test_serve import HELLO, LIMIT, MAX_TOKENS, client, ggufs, health, running, streamed, student  # noqa: F401

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.runtimes import open_runtime
from edgedistill.serve.app import ServeSettings, create_app
from edgedistill.serve.plan import PLAN_PROMPTS, Planner, PlanPrompt, plan_prompt, student_messages, teacher_messages
from edgedistill.serve.queue import ModelQueue
from edgedistill.serve.router import PLANNED, PlanRouter
from edgedistill.serve.teacher import EndpointTeacher, LocalTeacher

PLAN_TOKENS = 8  # the tiny teacher rarely ends a plan by itself: every plan takes the whole budget
PROMPT = PlanPrompt("test", "Plan for: {request}", "{request}\nPlan: {plan}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "say {plan} twice"}]


# --- the prompts (no model) ---------------------------------------------------------------------------

@pytest.mark.unit
def test_the_plan_goes_into_the_last_user_message_and_nothing_else_changes():
    assert teacher_messages(CHAT, PROMPT) == [*CHAT[:3], {"role": "user", "content": "Plan for: say {plan} twice"}]
    # the request's own "{plan}" is text, not a field
    assert student_messages(CHAT, " use the word twice \n", PROMPT) == [
        *CHAT[:3], {"role": "user", "content": "say {plan} twice\nPlan: use the word twice"}]
    assert student_messages(CHAT, "  ", PROMPT) == CHAT  # an empty plan leaves the request as it came
    system_only = [{"role": "system", "content": "hi"}]
    assert teacher_messages(system_only, PROMPT) is None and student_messages(system_only, "x", PROMPT) == system_only


@pytest.mark.unit
def test_every_shipped_plan_prompt_has_its_fields():
    for name, prompt in PLAN_PROMPTS.items():
        assert prompt.name == name and "{request}" in prompt.instruction
        assert "{request}" in prompt.student and "{plan}" in prompt.student


@pytest.mark.unit
def test_bad_plan_settings_are_refused_with_the_fix(capsys):
    with pytest.raises(EdgedistillError, match="no plan prompt named 'nope'"):
        plan_prompt("nope")
    with pytest.raises(EdgedistillError, match="--plan-max-tokens 0 must be at least 1"):
        Planner(PROMPT, 0)
    assert main(["serve", "no-such.gguf", "--plan"]) == 2
    assert "--plan asks the teacher, but no --teacher is given" in capsys.readouterr().err
    assert main(["serve", "no-such.gguf", "--plan", "--route", "route.json", "--teacher", "t.gguf"]) == 2
    assert "two routing modes" in capsys.readouterr().err
    assert main(["serve", "no-such.gguf", "--plan", "--teacher", "t.gguf", "--plan-max-tokens", "64",
                 "--max-tokens", "32"]) == 2
    assert "--plan-max-tokens 64 is over --max-tokens 32" in capsys.readouterr().err


# --- the service --------------------------------------------------------------------------------------

def _greedy(runtime, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
    """The runtime's greedy answer and how many tokens it took (its end token left out)."""
    ids = [t for t in runtime.greedy_ids(runtime.prompt_ids(messages), max_tokens) if not runtime.is_end(t)]
    return runtime.decode(ids).strip(), len(ids)


@pytest.mark.integration
def test_a_local_teacher_plans_and_the_student_answers_following_it(student, ggufs):  # noqa: F811
    teacher_runtime = open_runtime(ggufs["teacher"], threads=1)
    planner = Planner(PLAN_PROMPTS["steps"], PLAN_TOKENS)
    plan, plan_tokens = _greedy(teacher_runtime, teacher_messages(HELLO, planner.prompt), PLAN_TOKENS)
    assert plan and plan_tokens == PLAN_TOKENS
    answer = _greedy(student, student_messages(HELLO, plan, planner.prompt), MAX_TOKENS)[0]
    alone = _greedy(student, HELLO, MAX_TOKENS)[0]
    assert answer != alone  # the plan changed the student's answer

    teacher = LocalTeacher(ModelQueue(teacher_runtime, name="teacher", max_waiting=4, max_tokens=LIMIT), "tiny")
    with running(create_app(student, name="tiny", teacher=teacher, router=PlanRouter(planner))) as url:
        api = client(url)
        raw = api.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=MAX_TOKENS)
        assert raw.parse().choices[0].message.content == answer
        assert (raw.headers["x-edgedistill-answered-by"], raw.headers["x-edgedistill-degraded"]) == (PLANNED, "false")
        assert raw.parse().x_edgedistill == {"answered_by": "student+teacher-plan", "degraded": False,
                                             "teacher_tokens": PLAN_TOKENS, "plan": plan}
        text, chunks = streamed(api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=MAX_TOKENS,
                                                            stream=True))
        assert text == answer and all(c.x_edgedistill["answered_by"] == PLANNED for c in chunks)
        # naming a model still chooses it: no plan
        assert api.chat.completions.create(model="student", messages=HELLO,
                                           max_tokens=MAX_TOKENS).choices[0].message.content == alone
        status = health(url)
        assert status["answered_by"] == {"student": 1, "teacher": 0, PLANNED: 2}
        assert status["teacher_plan_tokens"] == 2 * PLAN_TOKENS and status["degraded_answers"] == 0


@pytest.mark.integration
def test_a_plan_that_does_not_fit_the_students_context_is_left_out(student, ggufs):  # noqa: F811
    """A request that fits the student alone, and not with the plan beside it, is answered as it came
    (a short plan prompt, so that the teacher's request fits its own context of the same size)."""
    planner = Planner(PROMPT, PLAN_TOKENS)
    context = student.context_length
    words = 1
    while len(student.prompt_ids([{"role": "user", "content": "ka " * (words + 1)}])) + MAX_TOKENS <= context:
        words += 1
    long = [{"role": "user", "content": "ka " * words}]  # the longest that fits with MAX_TOKENS
    assert len(student.prompt_ids(student_messages(long, "plan " * PLAN_TOKENS, planner.prompt))) + MAX_TOKENS > context
    teacher = LocalTeacher(ModelQueue(open_runtime(ggufs["teacher"], threads=1), name="teacher", max_waiting=4,
                                      max_tokens=LIMIT), "tiny")
    with running(create_app(student, name="tiny", teacher=teacher, router=PlanRouter(planner))) as url:
        raw = client(url).chat.completions.with_raw_response.create(model="tiny", messages=long,
                                                                    max_tokens=MAX_TOKENS)
        assert (raw.headers["x-edgedistill-answered-by"], raw.headers["x-edgedistill-degraded"]) == ("student", "true")
        field = raw.parse().x_edgedistill
        assert field["degraded_reason"].startswith("the teacher's plan did not fit the student's context")
        assert raw.parse().choices[0].message.content == _greedy(student, long, MAX_TOKENS)[0]
        assert health(url)["degraded_answers"] == 1


@pytest.mark.integration
def test_an_endpoint_teacher_plans_and_when_it_dies_the_student_answers_alone(student, ggufs):  # noqa: F811
    planner = Planner(PLAN_PROMPTS["keywords"], PLAN_TOKENS)
    alone = _greedy(student, HELLO, MAX_TOKENS)[0]
    port = free_port()
    server = start_llama_server(port, str(ggufs["teacher"]), "--n_threads", "1")
    try:
        teacher = EndpointTeacher(f"http://127.0.0.1:{port}/v1", max_tokens=LIMIT)
        app = create_app(student, name="tiny", teacher=teacher, router=PlanRouter(planner),
                         settings=ServeSettings(probe_interval_s=0.2))
        with running(app) as url:
            api = client(url)
            first = api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=MAX_TOKENS)
            field = first.x_edgedistill
            assert (field["answered_by"], field["degraded"]) == (PLANNED, False) and field["plan"]
            # the plan's length as the endpoint's usage counts it
            assert field["teacher_tokens"] == PLAN_TOKENS
            assert first.choices[0].message.content == _greedy(
                student, student_messages(HELLO, field["plan"], planner.prompt), MAX_TOKENS)[0]

            server.kill()
            server.wait()
            raw = api.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=MAX_TOKENS)
            assert (raw.headers["x-edgedistill-answered-by"], raw.headers["x-edgedistill-degraded"]) == (
                "student", "true")
            down = raw.parse()
            assert down.choices[0].message.content == alone  # the request as it came, no plan
            assert down.x_edgedistill["degraded_reason"].startswith("the teacher endpoint is unreachable")
            assert "plan" not in down.x_edgedistill
            text, chunks = streamed(api.chat.completions.create(model="tiny", messages=HELLO,
                                                                max_tokens=MAX_TOKENS, stream=True))
            assert text == alone and chunks[-1].x_edgedistill["degraded"] is True
            status = health(url)
            assert status["answered_by"] == {"student": 2, "teacher": 0, PLANNED: 1}
            assert status["degraded_answers"] == 2 and status["teacher_plan_tokens"] == field["teacher_tokens"]
            assert status["status"] == "degraded"
    finally:
        server.kill()
        server.wait()
