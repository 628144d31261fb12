"""The report's text and tables, once, for both report.md and report.html.

    python -c "from edgedistill.report.data import load_run; from edgedistill.report.tables import *; \
print(artifact_table(load_run('runs/tiny')).rows)"

Cells and sentences are inline Markdown (`code` and **bold** only), which the HTML renderer
converts; every table carries the line naming the JSON file and keys it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgedistill.report.data import BENCH_JSON, EVAL_JSON, RunData, column_sources, fmt, pareto_front

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
                     f"({reference.get('correct')}/{reference.get('examples')}).")
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
            f"{first.get('repetitions')} (from `{BENCH_JSON}`). Quality: greedy answers on {examples} held-out "
            f"prompts (from `{EVAL_JSON}`).")


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
            f"(from `{BENCH_JSON}`: decode_tokens_per_s; `{EVAL_JSON}`: task_score).")


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
