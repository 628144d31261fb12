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

Each configuration's answers are kept in RUN/plan_execute/<name>.jsonl with what they depend on (the
models, the budgets, the prompt's texts) and reused while that stays the same: a stopped benchmark
resumes, and `--only NAME ...` computes some configurations (processes side by side, say) without
writing the summary, which a last run without --only writes from the kept answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from tqdm import tqdm

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


class Kept:
    """One configuration's answers so far, per held-out id, in RUN/plan_execute/<name>.jsonl after a
    first line holding what they depend on; a file of other settings is started again."""

    def __init__(self, folder: Path, name: str, settings: dict):
        self.path = folder / f"{name.replace(' ', '_')}.jsonl"
        self.rows: dict = {}
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        if lines and json.loads(lines[0]) == settings:
            self.rows = {row["id"]: row for row in map(json.loads, lines[1:])}
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(settings) + "\n")

    def add(self, row: dict) -> None:
        self.rows[row["id"]] = row
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _interval(found) -> dict:
    return {key: None if value is None else round(value, 4) for key, value in found.as_dict().items()} | {"n": found.n}


def run_configuration(name: str, records: list[dict], student: Runtime, teacher: Runtime, kept: Kept, *,
                      max_new_tokens: int, plan_max_tokens: int, teacher_answers: dict | None = None) -> dict:
    """Answers and token counts of one configuration over `records`, the kept ones reused;
    `teacher_answers`: the teacher alone's kept rows, which are the plans of a prompt that asks the
    teacher the request itself with the same budget (draft)."""
    started = time.perf_counter()
    for record in tqdm([r for r in records if r["id"] not in kept.rows], desc=name, unit="request"):
        messages = record["messages"]
        if name == STUDENT_ALONE:
            answer, n = greedy(student, messages, max_new_tokens)
            plan, planned = None, 0
        elif name == TEACHER_ALONE:
            answer, planned = greedy(teacher, messages, max_new_tokens)
            plan, n = None, 0
        else:
            prompt = PLAN_PROMPTS[name]
            asked = teacher_messages(messages, prompt)
            same = teacher_answers.get(record["id"]) if (
                teacher_answers and asked == messages and plan_max_tokens == max_new_tokens) else None
            plan, planned = (same["answer"], same["teacher_tokens"]) if same else greedy(teacher, asked,
                                                                                          plan_max_tokens)
            answer, n = greedy(student, student_messages(messages, plan, prompt), max_new_tokens)
        kept.add({"id": record["id"], "answer": answer, "plan": plan, "teacher_tokens": planned, "student_tokens": n,
                  "wall_s": round(time.perf_counter() - started, 2)})
        started = time.perf_counter()
    rows = [kept.rows[record["id"]] for record in records]
    return {"answers": [r["answer"] for r in rows], "plans": [r["plan"] for r in rows],
            "teacher_tokens": [r["teacher_tokens"] for r in rows], "student_tokens": [r["student_tokens"] for r in rows],
            "wall_s": round(sum(r["wall_s"] for r in rows), 1)}


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
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores; on a busy machine 1 is "
                        "faster, since llama.cpp's threads wait for each other spinning)")
    parser.add_argument("--limit", type=int, help="only the first N held-out records")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"compute (and keep) only these configurations: {STUDENT_ALONE!r}, {TEACHER_ALONE!r} "
                             "or plan prompt names; no summary")
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
    found, kept = {}, {}
    for name in [TEACHER_ALONE, *(n for n in names if n != TEACHER_ALONE)]:
        settings = {"student": str(student_path), "teacher": str(teacher_path), "max_new_tokens": args.max_new_tokens,
                    "plan_max_tokens": args.plan_max_tokens,
                    "prompt": PLAN_PROMPTS[name].__dict__ if name in PLAN_PROMPTS else None}
        kept[name] = Kept(args.run / "plan_execute", name, settings)
        if args.only and name not in args.only:
            continue
        found[name] = run_configuration(name, records, student, teacher, kept[name],
                                        max_new_tokens=args.max_new_tokens, plan_max_tokens=args.plan_max_tokens,
                                        teacher_answers=kept[TEACHER_ALONE].rows)
        print(f"{name}: {found[name]['wall_s']} s", flush=True)
    if args.only:
        return
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
