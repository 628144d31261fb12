"""Routing calibration: when should a served student hand a request to the teacher?

    edgedistill route runs/sentiment                       # writes runs/sentiment/route/route.json
    edgedistill route runs/sentiment --artifact student-int4/ --target 0.99
    edgedistill route runs/sentiment --budget 0.25             # the best route within 25% of calls

The student answers every held-out prompt first (its answers and the teacher's are those of the
run's eval stage, eval/eval.json, scored again per example with the task's scorers); a confidence
computed from the student's own token log-probs decides which answers are kept and which requests
go to the teacher:

- a quantile of the per-token log-probs of the student's own answer (`min`, `p10`, `p25`, `mean`),
  since one unsure token is what a wrong answer usually shows, and a whole-sequence probability
  punishes long answers that are right;
- for classification (held-out records with label choices) also the margin between the
  log-likelihoods of the best and the second-best label as the whole answer (`margin`).

Sending the least confident examples to the teacher first, each number of teacher calls k gives a
point of the curve: the routed score (teacher's answers on the k, the student's on the rest) as a
share of the teacher's own score, with a 95% bootstrap interval (examples resampled in pairs).
route.json holds the curve of each rule, the rule and threshold that reach `target` (default
0.99 of the teacher's score) with the fewest teacher calls, and what random routing would give at
that share of calls. With a `budget` (the most of the requests the teacher may take) the rule and
threshold are instead those that keep the most of the teacher's score within it, and `target` is
what that is checked against: the cheapest threshold that just reaches the target on the
calibration examples tends to fall short of it on new ones, a budget's does not lean that way.
Since a threshold fitted and measured on the same examples flatters itself, route.json also holds
`held_out_check` (8-fold cross-validation): the examples dealt at random into 8 parts, each part
routed by the rule and threshold chosen on the other 7, and the share and teacher calls that gives.
`edgedistill serve --route route.json` applies the threshold: an answer whose confidence is below
it goes to the teacher.

With a `route:` section in the recipe, the `route` stage of `edgedistill run` (route_stage) does the
same after eval and writes RUN/route/route.json, reading the artifact from the run's export folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgedistill import layout
from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.intervals import bootstrap_ratio
from edgedistill.evaluate.scorers import ScoreInput, score_all
from edgedistill.evaluate.task import final_answer, load_heldout, read_task, task_scorers
from edgedistill.recipe import Recipe
from edgedistill.records import STUDENT_ROW, read_eval
from edgedistill.route_curve import routing_curve, rule_point
from edgedistill.runtimes import Runtime, open_runtime

ROUTE_FORMAT = 1
DEFAULT_TARGET = 0.99
OPEN_ENDED_RULES = ("min", "p10", "p25", "mean")
# a label task tries the margin and its answer's own token log-probs: on the default recipe the
# latter reached 99% of the teacher with 42% of calls, the margin with 52%
CLASSIFICATION_RULES = ("margin", "min", "mean")
QUANTILES = {"min": 0.0, "p10": 0.10, "p25": 0.25}
# finite, so route.json stays plain JSON: below any log-prob a model gives
LEAST_CONFIDENT = -1e9
# held_out_check's folds: each threshold is fitted on 7/8 of the held-out split (112 of the default
# 128), near what the served threshold is fitted on; halves fitted on 64 and swung with their noise
HELD_OUT_FOLDS = 8


def token_confidence(logprobs: list[float], rule: str) -> float:
    """An open-ended answer's confidence from its tokens' log-probs, by `rule`."""
    if not logprobs:
        return LEAST_CONFIDENT  # an empty answer is the least trusted
    if rule == "mean":
        return float(np.mean(logprobs))
    if rule not in QUANTILES:
        raise EdgedistillError(f"unknown confidence rule {rule!r}", f"use one of {', '.join(OPEN_ENDED_RULES)}")
    return float(np.quantile(logprobs, QUANTILES[rule]))


def answer_logprobs(runtime: Runtime, messages: list[dict[str, str]], answer: str) -> list[float]:
    """The log-prob the runtime gives each token of `answer` after the chat prompt `messages`."""
    prompt = runtime.prompt_ids(messages)
    tokens = runtime.encode(answer, add_special=False)
    if not tokens:
        return []
    scored = runtime.score(prompt + tokens[:-1] if len(tokens) > 1 else prompt, last=len(tokens))
    return [float(scored[i, token]) for i, token in enumerate(tokens)]


def label_margin(runtime: Runtime, messages: list[dict[str, str]], choices: list[str]) -> float:
    """Best minus second-best label log-likelihood, each label taken as the whole answer."""
    totals = sorted((sum(answer_logprobs(runtime, messages, choice)) for choice in choices), reverse=True)
    return totals[0] - totals[1] if len(totals) > 1 else float("inf")


def confidence(runtime: Runtime, messages: list[dict[str, str]], answer: str, rule: str,
               choices: list[str] | None = None) -> float:
    """The student's confidence in `answer` to `messages` (the serve-time rule as calibrated)."""
    if rule == "margin":
        if not choices:
            raise EdgedistillError("the margin rule needs the task's label choices",
                                   "use an open-ended rule (min, p10, p25, mean) for this task")
        return label_margin(runtime, messages, choices)
    return token_confidence(answer_logprobs(runtime, messages, answer), rule)


def _per_example(answers: list[dict], heldout: dict, scorers, task) -> dict:
    items = [ScoreInput(final_answer(a["answer"], task), heldout[a["id"]].get("reference"), heldout[a["id"]])
             for a in answers]
    primary = score_all(scorers, items)[scorers[0].name]
    return {a["id"]: v for a, v in zip(answers, primary.values)}


def calibrate(run: Path, *, artifact: str | None = None, target: float = DEFAULT_TARGET,
              budget: float | None = None, rules: tuple[str, ...] | None = None) -> dict:
    """route.json's content for the run folder `run` (module docstring)."""
    run = Path(run)
    return calibrate_files(run / layout.EVAL / layout.EVAL_JSON, run / layout.GENERATE / layout.HELDOUT_JSONL,
                           artifact=artifact, target=target, budget=budget, rules=rules)


def _artifact_in(folders: tuple[Path, ...], name: str) -> Path:
    """The file or folder of eval row `name` in one of `folders` (a stage's export inputs)."""
    found = next((folder / name.rstrip("/") for folder in folders if (folder / name.rstrip("/")).exists()), None)
    if found is None:
        raise EdgedistillError(f"route.artifact {name!r} is not in {' or '.join(str(f) for f in folders)}",
                               "name a student GGUF of export/ (e.g. student-q4_k_m.gguf) or an ONNX folder of "
                               "export_onnx/ (e.g. student-int4/), as eval/eval.json names its rows")
    return found


def calibrate_files(eval_json: Path, heldout_jsonl: Path, *, artifact: str | None = None,
                    target: float = DEFAULT_TARGET, budget: float | None = None,
                    rules: tuple[str, ...] | None = None, folders: tuple[Path, ...] = ()) -> dict:
    """route.json's content from an eval stage's eval.json and the generate stage's heldout.jsonl.
    The artifact is run from where eval.json says it ran, or, with `folders`, from the one of them
    that holds it (the route stage's export inputs, which its cache key covers)."""
    data = Path(heldout_jsonl)
    report = read_eval(eval_json)
    if report.reference is None:
        raise EdgedistillError(f"{eval_json} has no reference (teacher) row",
                               "run the eval stage with the teacher: edgedistill run RECIPE --from eval")
    rows = {row.artifact: row for row in report.artifacts}
    name = artifact or next((n for n in rows if n.endswith("q4_k_m.gguf") and "student" in n),
                            next((n for n in rows if n != STUDENT_ROW and "teacher" not in n), None))
    if name not in rows:
        raise EdgedistillError(f"no eval row named {name!r} in {eval_json}",
                               f"choose --artifact (route.artifact in a recipe) among: {', '.join(rows)}")
    row = rows[name]
    path = str(_artifact_in(folders, name)) if folders else row.path
    records = load_heldout(data)
    heldout = {record["id"]: record for record in records}
    task, scorers = read_task(data), task_scorers(data, records)
    student = _per_example(row.answers, heldout, scorers, task)
    teacher = _per_example(report.reference.answers, heldout, scorers, task)
    ids = [i for i in student if i in teacher and student[i] is not None and teacher[i] is not None]
    if len(ids) < 2:
        raise EdgedistillError(f"only {len(ids)} held-out examples have both a student and a teacher score",
                               "routing needs the held-out split scored for both: check eval/eval.json")
    labelled = all("choices" in heldout[i] for i in ids)
    rules = rules or (CLASSIFICATION_RULES if labelled else OPEN_ENDED_RULES)
    answers = {a["id"]: a["answer"] for a in row.answers}
    runtime = open_runtime(path)
    confidences = {rule: [confidence(runtime, heldout[i]["messages"], answers[i], rule, heldout[i].get("choices"))
                          for i in ids] for rule in rules}
    del runtime
    return {"format": ROUTE_FORMAT, "artifact": name, "path": path, "examples": len(ids), "scorer": scorers[0].name,
            **({"choices": heldout[ids[0]]["choices"]} if labelled else {}),
            **choose_route([student[i] for i in ids], [teacher[i] for i in ids], confidences, target, budget=budget)}


def _choose(student: list[float], teacher: list[float], confidences: dict[str, list[float]], target: float,
            budget: float | None = None):
    """The curves, the rule and point chosen, and whether it reaches `target`. Without `budget`: the
    point that reaches `target` with the fewest teacher calls (the first rule's last point when none
    reaches); with it: the point keeping the most of the teacher's score within `budget` of calls
    (the fewest calls among equals)."""
    curves = {rule: routing_curve(student, teacher, values) for rule, values in confidences.items()}
    best = {rule: rule_point(points, target, budget) for rule, points in curves.items()}
    if budget is not None:
        rules = [rule for rule in curves if best[rule] is not None]
        if not rules:  # the teacher scores 0: no share to keep, so no call is worth making
            rule = next(iter(curves))
            return curves, rule, curves[rule][0], False
        rule = max(rules, key=lambda r: (best[r].share_of_teacher, -best[r].teacher_calls))
        return curves, rule, best[rule], best[rule].share_of_teacher >= target
    reached = [rule for rule in curves if best[rule] is not None]
    rule = min(reached, key=lambda r: best[r].teacher_calls) if reached else next(iter(curves))
    return curves, rule, best[rule] or curves[rule][-1], best[rule] is not None


def _routed(threshold: float | None, student, teacher, confidences) -> list[float]:
    """Per-example scores when answers less confident than `threshold` go to the teacher (as serve does)."""
    return [t if threshold is not None and c < threshold else s for s, t, c in zip(student, teacher, confidences)]


def held_out_check(student: list[float], teacher: list[float], confidences: dict[str, list[float]],
                   target: float, *, budget: float | None = None, folds: int = HELD_OUT_FOLDS,
                   seed: int = 0) -> dict:
    """The chosen route measured on examples it was not chosen on (k-fold cross-validation): the
    examples are dealt at random (`seed`) into `folds` parts; each part is routed by the rule and
    threshold chosen on all the others. The parts' routed answers together give the share of the
    teacher's score and of teacher calls a new request may expect (a threshold fitted and measured
    on the same examples flatters itself). More folds fit each threshold on more examples, as the
    final one is fitted on all of them; two folds (halves) fit on half and err pessimistic."""
    n = len(student)
    folds = max(2, min(folds, n // 2))
    parts = [sorted(part.tolist()) for part in np.array_split(np.random.default_rng(seed).permutation(n), folds)]
    routed, calls, fold_rows = [0.0] * n, 0, []
    pick = lambda values, ids: [values[i] for i in ids]  # noqa: E731
    for test in parts:
        held = set(test)
        fit = [i for i in range(n) if i not in held]
        _, rule, point, _ = _choose(pick(student, fit), pick(teacher, fit),
                                    {r: pick(v, fit) for r, v in confidences.items()}, target, budget)
        scores = _routed(point.threshold, pick(student, test), pick(teacher, test), pick(confidences[rule], test))
        sent = sum(point.threshold is not None and c < point.threshold for c in pick(confidences[rule], test))
        for i, value in zip(test, scores):
            routed[i] = value
        calls += sent
        fold_rows.append({"rule": rule, "threshold": point.threshold, "fit_examples": len(fit),
                          "examples": len(test), "teacher_call_share": round(sent / len(test), 4)})
    share = bootstrap_ratio(routed, teacher)
    return {"seed": seed, "folds_count": folds, "teacher_call_share": round(calls / n, 4),
            "share_of_teacher": None if share.mean is None else round(share.mean, 4),
            "share_interval": [None if share.low is None else round(share.low, 4),
                               None if share.high is None else round(share.high, 4)],
            "reached": share.mean is not None and share.mean >= target, "folds": fold_rows}


def choose_route(student: list[float], teacher: list[float], confidences: dict[str, list[float]],
                 target: float, *, budget: float | None = None) -> dict:
    """route.json's target, scores, curves and choice from per-example scores of the student and the
    teacher and each rule's confidences in the student's answers (the first rule when none reaches),
    with the same choice measured on examples it was not made on (held_out_check)."""
    curves, rule, chosen, reached = _choose(student, teacher, confidences, target, budget)
    student_mean, teacher_mean = float(np.mean(student)), float(np.mean(teacher))
    random_share = ((student_mean + chosen.teacher_call_share * (teacher_mean - student_mean)) / teacher_mean
                    if teacher_mean else None)
    return {"target": target, **({"budget": budget} if budget is not None else {}),
            "student_score": round(student_mean, 4),
            "teacher_score": round(teacher_mean, 4), "rule": rule,
            "threshold": chosen.threshold, "reached": reached,
            "teacher_call_share": chosen.teacher_call_share, "share_of_teacher": chosen.share_of_teacher,
            "share_interval": [chosen.low, chosen.high],
            "random_routing_share_of_teacher": None if random_share is None else round(random_share, 4),
            **({"held_out_check": held_out_check(student, teacher, confidences, target, budget=budget)}
               if len(student) >= 4 else {}),
            "curves": {r: [p.__dict__ for p in points] for r, points in curves.items()}}


def route_command(run: Path, *, artifact: str | None, target: float, out: Path | None,
                  budget: float | None = None) -> Path:
    for name, value in (("--target", target), ("--budget", budget)):
        if value is not None and not 0 < value <= 1:
            raise EdgedistillError(f"{name} {value:g} is not a share", f"give {name} as a fraction in (0, 1], e.g. 0.25")
    result = calibrate(run, artifact=artifact, target=target, budget=budget)
    out = out or Path(run) / layout.ROUTE / layout.ROUTE_JSON
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def route_stage(recipe: Recipe, out: Path, *, generate: Path, eval: Path, export: Path,
                export_onnx: Path | None = None) -> dict:
    """The route stage (a recipe with a `route:` section): route/route.json for route.artifact (None:
    the student's Q4_K_M GGUF row), route.target and route.budget, the artifact read from the export
    folders."""
    cfg = recipe.route
    result = calibrate_files(eval / layout.EVAL_JSON, generate / layout.HELDOUT_JSONL, artifact=cfg.artifact,
                             target=cfg.target, budget=cfg.budget,
                             folders=(export, *((export_onnx,) if export_onnx else ())))
    (out / layout.ROUTE_JSON).write_text(json.dumps(result, indent=2) + "\n")
    return {key: result[key] for key in ("artifact", "rule", "threshold", "teacher_call_share", "share_of_teacher",
                                         "reached")}


def format_route(result: dict) -> str:
    head = (f"{result['artifact']} on {result['examples']} held-out examples ({result['scorer']}): student "
            f"{result['student_score']:.3f}, teacher {result['teacher_score']:.3f}. ")
    if result["share_of_teacher"] is None:
        return head + "The teacher scores 0 here: there is no share of its score to reach, so no threshold is chosen"
    verdict = "reaches" if result["reached"] else "does not reach"
    low, high = result["share_interval"]
    interval = f" [{low:.1%}, {high:.1%}]" if low is not None else ""
    # no threshold: the student alone reaches the target
    threshold = "none" if result["threshold"] is None else f"{result['threshold']:.4g}"
    budget = f" (budget {result['budget']:.0%})" if result.get("budget") is not None else ""
    line = head + (f"Rule {result['rule']}, threshold {threshold}: {result['teacher_call_share']:.0%} "
                   f"of requests to the teacher{budget} give {result['share_of_teacher']:.1%}{interval} of its score, "
                   f"{verdict} the target {result['target']:.0%} (random routing at that share of calls: "
                   f"{result['random_routing_share_of_teacher']:.1%})")
    check = result.get("held_out_check")
    if check and check["share_of_teacher"] is not None:
        low, high = check["share_interval"]
        line += (f". Chosen on {check['folds_count'] - 1}/{check['folds_count']} of the examples and applied to "
                 f"the rest ({check['folds_count']}-fold cross-validation): "
                 f"{check['teacher_call_share']:.0%} of requests to the teacher give "
                 f"{check['share_of_teacher']:.1%} [{low:.1%}, {high:.1%}] of its score")
    return line


def read_route(path: Path) -> dict:
    """A route.json for serving: its rule, threshold and (for the margin rule) label choices, checked."""
    try:
        route = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgedistillError(f"{path} cannot be read as route.json ({exc})",
                               "make it with: edgedistill route RUN (or a recipe's route: section)") from None
    if not isinstance(route, dict) or route.get("format") != ROUTE_FORMAT or route.get("rule") not in (
            *OPEN_ENDED_RULES, "margin"):
        raise EdgedistillError(f"{path} is not a route.json of this version (format {ROUTE_FORMAT})",
                               "make it again with: edgedistill route RUN")
    if route["rule"] == "margin" and not route.get("choices"):
        raise EdgedistillError(f"{path}: the margin rule needs the task's label choices, and it names none",
                               "make it again with this version: edgedistill route RUN")
    return route
