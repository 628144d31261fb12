"""The report's text and tables, once, for both report.md and report.html.

    python -c "from edgedistill.report.data import load_run; from edgedistill.report.tables import *; \
print(artifact_table(load_run('runs/tiny')).rows)"

Cells and sentences are inline Markdown (`code` and **bold** only), which the HTML renderer
converts; every table carries the line naming the JSON file and keys it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgedistill.evaluate.json_scorers import FIELD_PREFIX
from edgedistill.records import STUDENT_ROW, format_interval, format_score, score_basis
from edgedistill.report.data import (BENCH_SOURCE, EVAL_SOURCE, PREFLIGHT_SOURCE, ROUTE_SOURCE, RunData,
                                     column_sources, fmt, pareto_front)
from edgedistill.route_curve import RoutePoint, rule_point
from edgedistill.targets import any_failed, completed_checks

RUNTIME_NAMES = {"llama.cpp": "llama.cpp (GGUF)", "onnxruntime-genai": "ONNX Runtime GenAI (ONNX folders)",
                 "onnxruntime": "ONNX Runtime (ONNX folders)"}


@dataclass
class Table:
    id: str
    title: str
    header: list[str]
    rows: list[list[str]]
    source: str  # "from FILE: key, ..."


def summary(data: RunData) -> list[str]:
    lines = []
    student = data.result("student")
    if student:
        lines.append(f"Teacher `{data.teacher_source}`: {student.get('teacher_parameters', 0) / 1e6:.1f} M parameters; "
                     f"student ({student.get('method')}): {student.get('student_parameters', 0) / 1e6:.1f} M "
                     f"parameters ({100 * student.get('parameter_ratio', 0):.0f}% of the teacher).")
    elif data.teacher_source:
        lines.append(f"Teacher `{data.teacher_source}`.")
    reference = data.reference
    if reference and reference.get("task_score") is not None:
        lines.append(f"Held-out task score of the teacher (PyTorch fp32, reference): **{reference['task_score']:.3f}**"
                     f"{format_interval(reference.get('task_score_interval'))} ({score_basis(reference)}).")
    built = teacher_built_note(data)
    return lines + ([built] if built else [])


def _means(scores: dict[str, dict]) -> str:
    return ", ".join(f"{name} {format_score(entry.get('mean'))}{format_interval([entry.get('low'), entry.get('high')])}"
                     for name, entry in scores.items())


def teacher_built_note(data: RunData) -> str:
    """How many held-out references are the teacher's own answers, and how well the teacher agrees
    with the gold ones: how far the teacher-built part of the scores can be trusted."""
    built = data.evaluation.get("teacher_built_references")
    if not built:
        return ""
    examples = (data.reference or {}).get("examples") or next((r.get("examples") for r in data.rows
                                                               if r.get("examples")), None)
    agreement = (data.reference or {}).get("agreement_with_gold")
    trust = (f" On the held-out examples with a gold answer the teacher agrees with it: {_means(agreement)} "
             "(`reference.agreement_with_gold`); the teacher-built part is as trustworthy as that, and the shares of "
             "the teacher are taken over the gold examples." if agreement else
             " The teacher's agreement with gold was not measured: this eval had no reference model, or no "
             "example with a gold answer.")
    return (f"**Teacher-built references:** {built} of {examples} held-out examples have no gold answer and are "
            f"scored against the teacher's own answer (from `{EVAL_SOURCE}`: teacher_built_references; per scorer "
            f"n_gold, n_teacher_built).{trust}")


def artifact_table(data: RunData) -> Table:
    columns = data.columns
    rows = [[f"`{row['artifact']}`", *(column.format(row) for column in columns)] for row in data.rows]
    return Table("artifacts", "Artifacts", ["artifact", *(c.header for c in columns)], rows, column_sources(columns))


def measurement_note(data: RunData) -> str:
    """How speed and quality were measured, from the first bench row and the eval reference."""
    first = data.bench_rows[0] if data.bench_rows else {}
    runtimes = list(dict.fromkeys(RUNTIME_NAMES.get(r.get("runtime"), str(r.get("runtime"))) for r in data.bench_rows))
    examples = (data.reference or {}).get("examples") or next((r.get("examples") for r in data.rows
                                                               if r.get("examples")), None)
    intervals = (" In brackets: the 95% bootstrap interval over the held-out examples (2000 resamples; a share of "
                 "the teacher resamples the artifact's and the teacher's scores on the same examples together)."
                 if any(c.interval for c in data.columns) else "")
    student = (f" `{STUDENT_ROW}` is the trained student in PyTorch fp32, the model the exports were made from; it "
               "is evaluated, not benchmarked." if any(r["artifact"] == STUDENT_ROW for r in data.rows) else "")
    return (f"Speed: {' and '.join(runtimes) or 'not measured'}, {first.get('threads')} threads, prompt "
            f"{first.get('prompt_tokens')} tokens, {first.get('gen_tokens')} generated, median of "
            f"{first.get('repetitions')} (from `{BENCH_SOURCE}`). Quality: greedy answers on {examples} held-out "
            f"prompts (from `{EVAL_SOURCE}`).{intervals}{student}")


def noise_note(data: RunData) -> str:
    """Which artifacts score like the teacher within the noise, and which differ from it by more."""
    judged = [r for r in data.rows if r.get("within_noise_of_reference") is not None]
    if not judged:
        return ""
    within = [f"`{r['artifact']}`" for r in judged if r["within_noise_of_reference"]]
    beyond = [f"`{r['artifact']}`" for r in judged if not r["within_noise_of_reference"]]
    parts = ([f"within the noise of it, {', '.join(within)} (the 95% interval of the paired difference holds 0: "
              "these held-out examples cannot tell them from the teacher)"] if within else [])
    parts += [f"further from it than the noise, {', '.join(beyond)}"] if beyond else []
    return f"Compared with the teacher (from `{EVAL_SOURCE}`: within_noise_of_reference): {'; '.join(parts)}."


def _scorer_names(data: RunData) -> list[str]:
    """The scorers of the eval rows, first (the task score's) first; per-field parts left out."""
    rows = ([data.reference] if data.reference else []) + data.rows
    names = dict.fromkeys(name for row in rows for name in (row.get("scores") or {}))
    return [name for name in names if not name.startswith(FIELD_PREFIX)]


def scorer_table(data: RunData) -> Table | None:
    """Each scorer's mean with its interval, per row (the teacher's first), when the task has
    several scorers (generation, extraction); None for a single one (its mean is the task score)."""
    names = _scorer_names(data)
    if len(names) < 2:
        return None
    # with teacher-built references the teacher is scored on the gold examples alone
    scope = ", on the gold examples" if data.evaluation.get("teacher_built_references") else ""
    rows = ([(f"`{data.reference['artifact']}` (teacher, reference{scope})", data.reference)] if data.reference else [])
    rows += [(f"`{row['artifact']}`", row) for row in data.rows if row.get("scores")]

    def cell(row: dict, name: str) -> str:
        entry = (row.get("scores") or {}).get(name)
        if not entry:
            return "–"
        return f"{format_score(entry.get('mean'))}{format_interval([entry.get('low'), entry.get('high')])}"

    return Table("scorers", "Scores by scorer", ["artifact", *names],
                 [[label, *(cell(row, name) for name in names)] for label, row in rows],
                 f"from {EVAL_SOURCE}: reference and artifacts[]: scores.<scorer>.mean, low, high (the first scorer's "
                 "mean is the task score; per-field json_field:<name> scores are in the file)")


BUDGET_HEADERS = {"max_memory_mb": "peak RSS MB", "max_file_mb": "file MB", "max_ttft_ms": "TTFT ms",
                  "min_decode_tokens_per_s": "decode tok/s", "min_quality_share": "% of teacher"}
PERCENT_BUDGETS = {"min_quality_share"}  # a 0..1 share, shown as a percentage like the artifact table's


def _scaled(budget: str, value: float) -> float:
    return 100 * value if budget in PERCENT_BUDGETS else value


def _check_cell(check: dict) -> str:
    if check["passed"] is None:
        return "– (not measured)"
    return f"{fmt(_scaled(check['budget'], check['value']))} ({'pass' if check['passed'] else '**FAIL**'})"


def target_table(data: RunData) -> Table | None:
    """Each artifact's device-target checks (bench rows with a `target`, quality from eval), and the
    preflight's memory estimate for it when the run made one."""
    rows = [r for r in data.rows if r.get("target")]
    if not rows:
        return None
    name = rows[0]["target"]["name"]
    budgets = [(c["budget"], c["limit"]) for c in rows[0]["target"]["checks"]]
    estimates = {}
    if data.preflight and data.preflight.get("target") == name:
        estimates = {p["artifact"]: p["estimate_mb"] for p in data.preflight.get("rows", [])}
    header = ["artifact", *(f"{BUDGET_HEADERS.get(b, b)} {'≥' if b.startswith('min_') else '≤'} "
                            f"{_scaled(b, limit):g}" for b, limit in budgets)]
    header += ["preflight estimate MB", "result"] if estimates else ["result"]
    table_rows = []
    for row in rows:
        checks = completed_checks(row["target"]["checks"], row)
        estimate = [fmt(estimates.get(row["artifact"]))] if estimates else []
        table_rows.append([f"`{row['artifact']}`", *(_check_cell(c) for c in checks), *estimate,
                           "**FAIL**" if any_failed(checks) else "pass"])
    source = (f"from {BENCH_SOURCE}: target.checks (limit, value, passed); {EVAL_SOURCE}: share_of_reference (×100)"
              + (f"; {PREFLIGHT_SOURCE}: rows[].estimate_mb" if estimates else ""))
    return Table("device-target", f"Device target: {name}", header, table_rows, source)


def target_note(data: RunData) -> str:
    estimate = (" The preflight estimate (weights at llama.cpp's nominal bits per weight, fp16 KV cache at "
                f"the target's {data.preflight['context_length']}-token context, runtime overhead) was made "
                "from the recipe before the student was trained." if data.preflight else "")
    return ("Speeds and memory were measured on this machine, not on the target device: treat them as an estimate "
            "of how it would do there." + estimate)


def pareto_names(data: RunData) -> list[str]:
    """The artifacts on the Pareto front of task score and decode tokens/s."""
    rows = [r for r in data.rows if isinstance(r.get("task_score"), (int, float))
            and isinstance(r.get("decode_tokens_per_s"), (int, float))]
    keep = pareto_front([(r["task_score"], r["decode_tokens_per_s"]) for r in rows])
    return [r["artifact"] for r, on_front in zip(rows, keep) if on_front]


def pareto_note(data: RunData) -> str:
    names = pareto_names(data)
    if not names:
        return ""
    return ("Pareto front of task score and decode tokens/s (no other artifact is both at least as fast and at "
            f"least as good, and better in one): {', '.join(f'`{n}`' for n in names)} "
            f"(from `{BENCH_SOURCE}`: decode_tokens_per_s; `{EVAL_SOURCE}`: task_score).")


def _percent(share: float | None, interval: list | None = None) -> str:
    if share is None:
        return "–"
    return f"{100 * share:.1f}{format_interval(interval, scale=100, digits=1)}"


def _calls(share: float, examples: int) -> str:
    return f"{100 * share:.1f} ({round(share * examples)} of {examples})"


def route_table(data: RunData) -> Table | None:
    """route/route.json: per confidence rule the fewest teacher calls that reach the target share of
    the teacher's score (the chosen rule's row from route.json's own keys), and random routing at the
    chosen share of calls; None when the run has no route.json."""
    route = data.route
    if not route:
        return None
    target, examples = route["target"], route["examples"]
    rows = []
    for rule, curve in route["curves"].items():
        if rule == route["rule"]:
            point = {"threshold": route["threshold"], "teacher_call_share": route["teacher_call_share"],
                     "share_of_teacher": route["share_of_teacher"], "low": route["share_interval"][0],
                     "high": route["share_interval"][1]}
            reached, label = route["reached"], f"**{rule} (chosen)**"
        else:
            chosen = rule_point([RoutePoint(**p) for p in curve], target, route.get("budget"))
            point = chosen.__dict__ if chosen else curve[-1]
            reached, label = chosen is not None and chosen.share_of_teacher >= target, f"{rule}"
        threshold = point["threshold"]
        rows.append([label, "– (none)" if threshold is None else f"{threshold:.4g}",
                     _calls(point["teacher_call_share"], examples),
                     _percent(point["share_of_teacher"], [point["low"], point["high"]]), "yes" if reached else "no"])
    random_share = route.get("random_routing_share_of_teacher")
    rows.append(["random (same calls as chosen)", "–", _calls(route["teacher_call_share"], examples),
                 _percent(random_share), "–" if random_share is None else "yes" if random_share >= target else "no"])
    check = route.get("held_out_check")
    if check and check["share_of_teacher"] is not None:
        rows.append([f"chosen on other examples ({check.get('folds_count', 2)}-fold cross-validation)", "per fold",
                     _calls(check["teacher_call_share"], examples),
                     _percent(check["share_of_teacher"], check["share_interval"]), "yes" if check["reached"] else "no"])
    header = ["confidence rule", "threshold", "teacher calls %", "% of teacher's score", f"reaches {100 * target:g}%"]
    return Table("routing", "Routing: when the student hands a request to the teacher", header, rows,
                 f"from {ROUTE_SOURCE}: rule, threshold, teacher_call_share, share_of_teacher, share_interval, "
                 "reached, random_routing_share_of_teacher, held_out_check (×100); the other rules: "
                 "curves.<rule>[], their first point at or above target (with a budget: their best within it)")


def route_note(data: RunData) -> str:
    route = data.route
    if not route:
        return ""
    budget = route.get("budget")
    folds = (route.get("held_out_check") or {}).get("folds_count")
    check = (f" Cross-validation ({folds} folds) routes each fold by the rule and threshold chosen on the "
             "others: what a new request may expect." if folds else "")
    goal = (f"keep {100 * route['target']:g}% of the teacher's score with the fewest teacher calls" if budget is None
            else f"keep the most of the teacher's score with at most {100 * budget:g}% of requests sent to it")
    return (f"Calibrated on {route['examples']} held-out examples with `{route['artifact']}` (task score "
            f"{route['student_score']:.3f} by {route['scorer']}) and the teacher ({route['teacher_score']:.3f}), from "
            "eval's answers: the student answers first and a request goes to the teacher when the student's "
            "confidence in its answer is below the threshold (the least confident first). The chosen rule and "
            f"threshold {goal}.{check} In "
            "brackets: the 95% bootstrap interval (examples resampled in pairs). Random routing sends the same share "
            "of requests at random (expected share). The curve of every rule: `report.html`; serve with "
            f"`edgedistill serve {route['artifact'].rstrip('/')} --route {ROUTE_SOURCE} --teacher URL`.")


def training_tables(data: RunData) -> list[Table]:
    tables = []
    for stage, title in (("distill", "Distillation"), ("lora", "LoRA adapter")):
        history = data.result(stage).get("epochs", [])
        if history:
            tables.append(Table(f"{stage}-epochs", title, ["epoch", "loss", "cross-entropy", "divergence"],
                                [[str(h.get("epoch")), fmt(h.get("loss"), 4), fmt(h.get("ce"), 4), fmt(h.get("kl"), 4)]
                                 for h in history],
                                f"from {stage}/manifest.json: result.epochs[].epoch, loss, ce, kl"))
    return tables


def merge_note(data: RunData) -> str:
    if "merge" not in data.manifests:
        return ""
    merge = data.result("merge")
    return (f"The adapter was merged into the float32 student; merged vs base + adapter logits differ by at "
            f"most {merge.get('max_abs_logit_difference', 0):.1e} (tolerance {merge.get('tolerance')}) "
            "(from `merge/manifest.json`).")


def stage_table(data: RunData) -> Table:
    return Table("stage-times", "Stage times", ["stage", "seconds"],
                 [[name, fmt(seconds)] for name, seconds in data.stage_seconds],
                 "from each STAGE/manifest.json: seconds (of the run that produced the stage folder)")


def sources_table(data: RunData) -> Table:
    return Table("sources", "Sources", ["file", "bytes", "sha256"],
                 [[f"`{s.path}`", str(s.bytes), f"`{s.sha256}`"] for s in data.sources],
                 "every JSON file this report was drawn from, relative to the run folder, as it was read "
                 "(check with `sha256sum`)")
