"""Plan-and-execute measured on a run's held-out split: the student alone, the teacher alone, and the
teacher's plan followed by the student's answer for each plan prompt of edgedistill.serve.plan, with
the task's scorers. One JSON.

    .venv/bin/python tools/bench_plan_execute.py runs/past-tense --json runs/past-tense/plan_execute.json
    .venv/bin/python tools/bench_plan_execute.py runs/tiny --limit 8 --plan-max-tokens 8 --json /tmp/plan.json

Every configuration answers the same held-out records greedily, in the runtimes `edgedistill serve`
uses (default: the student's Q4_K_M GGUF of RUN/export and the teacher's Q4_K_M GGUF of
RUN/teacher_gguf, both in llama.cpp), with the prompts the service builds (teacher_messages,
student_messages). Per configuration the JSON has every scorer's mean with its 95% bootstrap
interval; the task score (the first scorer) as a share of the teacher's and its paired difference
from the student alone, each with its interval, and whether that difference is within the noise;
the tokens each model generated (a plan's and an answer's, end tokens left out) and the teacher's
share of them, with an interval (examples resampled); and the wall time, which on a shared machine
is noisy: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from edgedistill import layout
from edgedistill.evaluate.intervals import bootstrap_ratio, paired_difference, within_noise
from edgedistill.evaluate.scorers import ScoreInput, score_all
from edgedistill.evaluate.task import final_answer, load_heldout, read_task, task_scorers
from edgedistill.runtimes import Runtime, open_runtime
from edgedistill.serve.plan import DEFAULT_PLAN_MAX_TOKENS, PLAN_PROMPTS, student_messages, teacher_messages

STUDENT_ALONE, TEACHER_ALONE = "student alone", "teacher alone"


def greedy(runtime: Runtime, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[str, int]:
    """The runtime's greedy answer, as the service sends it (stripped), and its tokens, end token left out."""
    ids = []
    for token in runtime.greedy_ids(runtime.prompt_ids(messages), max_new_tokens):
        if runtime.is_end(token):
            break
        ids.append(token)
    return runtime.decode(ids).strip(), len(ids)


def _interval(found) -> dict:
    return {key: None if value is None else round(value, 4) for key, value in found.as_dict().items()} | {"n": found.n}


def run_configuration(name: str, records: list[dict], student: Runtime, teacher: Runtime, *, max_new_tokens: int,
                      plan_max_tokens: int) -> dict:
    """Answers and token counts of one configuration over `records`."""
    answers, plans, teacher_tokens, student_tokens = [], [], [], []
    started = time.perf_counter()
    for record in records:
        messages = record["messages"]
        if name == STUDENT_ALONE:
            answer, n = greedy(student, messages, max_new_tokens)
            plan, planned = None, 0
        elif name == TEACHER_ALONE:
            answer, planned = greedy(teacher, messages, max_new_tokens)
            plan, n = None, 0
        else:
            prompt = PLAN_PROMPTS[name]
            plan, planned = greedy(teacher, teacher_messages(messages, prompt), plan_max_tokens)
            answer, n = greedy(student, student_messages(messages, plan, prompt), max_new_tokens)
        answers.append(answer)
        plans.append(plan)
        teacher_tokens.append(planned)
        student_tokens.append(n)
    return {"answers": answers, "plans": plans, "teacher_tokens": teacher_tokens, "student_tokens": student_tokens,
            "wall_s": round(time.perf_counter() - started, 1)}


def scored(answers: list[str], records: list[dict], scorers, task: dict | None) -> dict:
    """Every scorer's result over `answers`, by name."""
    return score_all(scorers, [ScoreInput(final_answer(answer, task), record.get("reference"), record)
                               for answer, record in zip(answers, records)])


def summarize(found: dict, results: dict, primary: list[float], teacher: list[float], student: list[float]) -> dict:
    """Scores with intervals, the share of the teacher's score and of the generated tokens; `primary`,
    `teacher`, `student`: per-example task scores of this configuration, the teacher and the student alone."""
    generated = [t + s for t, s in zip(found["teacher_tokens"], found["student_tokens"])]
    return {
        "scores": {name: _interval(result.summary) for name, result in results.items()},
        "share_of_teacher": _interval(bootstrap_ratio(primary, teacher)),
        "minus_student_alone": _interval(paired_difference(primary, student)),
        "within_noise_of_student_alone": within_noise(primary, student),
        "within_noise_of_teacher_alone": within_noise(primary, teacher),
        "teacher_tokens": sum(found["teacher_tokens"]), "student_tokens": sum(found["student_tokens"]),
        "teacher_token_share": _interval(bootstrap_ratio(found["teacher_tokens"], generated))
        if sum(generated) else None,
        "wall_s": found["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder (generate/heldout.jsonl, export, teacher_gguf)")
    parser.add_argument("--student", type=Path, help="default: RUN/export/student-q4_k_m.gguf")
    parser.add_argument("--teacher", type=Path, help="default: RUN/teacher_gguf/teacher-q4_k_m.gguf")
    parser.add_argument("--prompts", nargs="+", default=list(PLAN_PROMPTS), choices=list(PLAN_PROMPTS))
    parser.add_argument("--plan-max-tokens", type=int, default=DEFAULT_PLAN_MAX_TOKENS)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="an answer's budget (the recipe's eval's)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--limit", type=int, help="only the first N held-out records")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    data = args.run / layout.GENERATE / layout.HELDOUT_JSONL
    records = load_heldout(data)[:args.limit]
    task, scorers = read_task(data), task_scorers(data, records)
    student_path = args.student or args.run / layout.EXPORT / "student-q4_k_m.gguf"
    teacher_path = args.teacher or args.run / layout.TEACHER_GGUF / "teacher-q4_k_m.gguf"
    student, teacher = open_runtime(student_path, threads=args.threads), open_runtime(teacher_path, threads=args.threads)
    load_before = os.getloadavg()

    names = [STUDENT_ALONE, TEACHER_ALONE, *args.prompts]
    found = {}
    for name in names:
        found[name] = run_configuration(name, records, student, teacher, max_new_tokens=args.max_new_tokens,
                                        plan_max_tokens=args.plan_max_tokens)
        print(f"{name}: {found[name]['wall_s']} s", flush=True)
    results = {name: scored(found[name]["answers"], records, scorers, task) for name in names}
    # an example a scorer could not score counts 0, so that every configuration keeps all examples paired
    primary = {name: [0.0 if v is None else v for v in results[name][scorers[0].name].values] for name in names}
    scores = {name: summarize(found[name], results[name], primary[name], primary[TEACHER_ALONE],
                              primary[STUDENT_ALONE]) for name in names}

    result = {
        "run": str(args.run), "student": str(student_path), "teacher": str(teacher_path), "examples": len(records),
        "scorer": scorers[0].name, "max_new_tokens": args.max_new_tokens, "plan_max_tokens": args.plan_max_tokens,
        "plan_prompts": {name: {"instruction": PLAN_PROMPTS[name].instruction, "student": PLAN_PROMPTS[name].student}
                         for name in args.prompts},
        "threads": args.threads, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "configurations": scores,
        "examples_answered": [{"id": record.get("id"), "reference": record.get("reference"),
                               **{name: {"answer": found[name]["answers"][i],
                                         **({"plan": found[name]["plans"][i]} if found[name]["plans"][i] is not None
                                            else {})} for name in names}}
                              for i, record in enumerate(records)],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(format_table(result))
    print(f"wrote {args.json}")


def format_table(result: dict) -> str:
    """The README's table: score, share of the teacher, teacher's share of the tokens."""
    lines = [f"| configuration | {result['scorer']} [95% CI] | chrF | share of teacher's score | "
             "teacher's share of generated tokens |", "|---|---|---|---|---|"]
    for name, row in result["configurations"].items():
        score, chrf, share = row["scores"][result["scorer"]], row["scores"].get("chrf"), row["share_of_teacher"]
        tokens = row["teacher_token_share"]
        lines.append(
            f"| {name if name in (STUDENT_ALONE, TEACHER_ALONE) else 'plan: ' + name} | {score['mean']:.3f} "
            f"[{score['low']:.3f}, {score['high']:.3f}] | {chrf['mean']:.3f} | "
            f"{share['mean']:.1%} [{share['low']:.1%}, {share['high']:.1%}] | "
            + (f"{tokens['mean']:.1%} ({row['teacher_tokens']} of {row['teacher_tokens'] + row['student_tokens']})"
               if tokens else "n/a") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
