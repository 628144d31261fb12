"""The report's text and tables, once, for both report.md and report.html.

    python -c "from edgedistill.report.data import load_run; from edgedistill.report.tables import *; \
print(artifact_table(load_run('runs/tiny')).rows)"

Cells and sentences are inline Markdown (`code` and **bold** only), which the HTML renderer
converts; every table carries the line naming the JSON file and keys it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgedistill.records import score_basis
from edgedistill.report.data import BENCH_SOURCE, EVAL_SOURCE, PREFLIGHT_SOURCE, RunData, column_sources, fmt, pareto_front
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
        lines.append(f"Held-out task score of the teacher (PyTorch fp32, reference): **{reference['task_score']:.3f}** "
                     f"({score_basis(reference)}).")
    return lines


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
    return (f"Speed: {' and '.join(runtimes) or 'not measured'}, {first.get('threads')} threads, prompt "
            f"{first.get('prompt_tokens')} tokens, {first.get('gen_tokens')} generated, median of "
            f"{first.get('repetitions')} (from `{BENCH_SOURCE}`). Quality: greedy answers on {examples} held-out "
            f"prompts (from `{EVAL_SOURCE}`).")


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
