"""A finished run folder read once: one row per artifact, stage times, and the JSON files they came from.

    python -c "from edgedistill.report.data import load_run; print(load_run('runs/tiny').rows)"

The Markdown and HTML reports are both drawn from a `RunData`, so they show the same numbers,
and each number's source (file and key) is named by a `Column`. `sources` holds the sha256 of
every JSON file read, as it was read, so a report can be checked against the run it came from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgedistillError
from edgedistill.records import BenchRow, EvalReport, format_interval
from edgedistill.layout import (BENCH, BENCH_JSON, EVAL, EVAL_JSON, MANIFEST, PARTIAL, PREFLIGHT, PREFLIGHT_JSON,
                                REPORT, ROUTE, ROUTE_JSON, TEACHER)

# where each number of a table comes from, as the report names it
BENCH_SOURCE = f"{BENCH}/{BENCH_JSON}"
EVAL_SOURCE = f"{EVAL}/{EVAL_JSON}"
PREFLIGHT_SOURCE = f"{PREFLIGHT}/{PREFLIGHT_JSON}"
ROUTE_SOURCE = f"{ROUTE}/{ROUTE_JSON}"


@dataclass(frozen=True)
class Column:
    """One column of the artifact table: the JSON key it shows and the file it is read from.
    `optional` columns are shown only when some row has the key (newer bench/eval versions).
    `interval`: the key of the value's 95% interval, [low, high], shown after it in brackets with
    one digit less ("0.812 [0.74, 0.87]") when some row has it."""

    key: str
    header: str
    source: str  # BENCH_SOURCE or EVAL_SOURCE
    digits: int = 1
    percent: bool = False  # a 0..1 share shown as a percentage
    optional: bool = False
    interval: str | None = None

    def format(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        scale = 100 if self.percent else 1
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = scale * value
            if self.interval:
                return fmt(value, self.digits) + format_interval(row.get(self.interval), scale=scale,
                                                                 digits=max(self.digits - 1, 1))
        return fmt(value, self.digits)


COLUMNS = (
    Column("file_mb", "file MB", BENCH_SOURCE),
    Column("device", "device", BENCH_SOURCE, optional=True),
    Column("decode_tokens_per_s", "decode tok/s", BENCH_SOURCE),
    Column("decode_tokens_per_s_spread", "decode spread tok/s", BENCH_SOURCE, optional=True),
    Column("prefill_tokens_per_s", "prefill tok/s", BENCH_SOURCE),
    Column("ttft_ms", "TTFT ms", BENCH_SOURCE),
    Column("peak_rss_mb", "peak RSS MB", BENCH_SOURCE),
    Column("peak_gpu_mb", "peak GPU MB", BENCH_SOURCE, optional=True),
    Column("bandwidth_efficiency", "bandwidth efficiency %", BENCH_SOURCE, percent=True, optional=True),
    Column("task_score", "task score", EVAL_SOURCE, digits=3, interval="task_score_interval"),
    Column("share_of_reference", "% of teacher", EVAL_SOURCE, percent=True, interval="share_of_reference_interval"),
    Column("perplexity", "perplexity", EVAL_SOURCE, digits=2, optional=True),
    Column("perplexity_ratio", "perplexity ratio", EVAL_SOURCE, digits=3, optional=True),
    Column("kl_to_reference", "KL to teacher", EVAL_SOURCE, digits=4, optional=True, interval="kl_to_reference_interval"),
    Column("top1_agreement", "top-1 agreement", EVAL_SOURCE, digits=3, optional=True),
)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def column_sources(columns: list[Column]) -> str:
    """'from bench/bench.json: file_mb, ...; eval/eval.json: task_score, ...' for a table's columns."""
    by_file: dict[str, list[str]] = {}
    for column in columns:
        for key in (column.key, column.interval) if column.interval else (column.key,):
            by_file.setdefault(column.source, []).append(key + (" (×100)" if column.percent else ""))
    return "from " + "; ".join(f"{file}: {', '.join(keys)}" for file, keys in by_file.items())


@dataclass
class Source:
    path: str  # relative to the run folder
    sha256: str
    bytes: int


@dataclass
class RunData:
    name: str
    teacher_source: str | None
    rows: list[dict[str, Any]]  # per artifact: its bench row and its eval row merged, eval keys first
    reference: dict[str, Any] | None  # eval.json's reference, without its answers
    bench_rows: list[dict[str, Any]]
    manifests: dict[str, dict[str, Any]]  # stage name -> manifest, in stage order
    sources: list[Source] = field(default_factory=list)
    preflight: dict[str, Any] | None = None
    # eval.json's own keys (teacher_built_references, ...), without the reference and the artifacts
    evaluation: dict[str, Any] = field(default_factory=dict)
    # route/route.json (edgedistill.route) when the run has one: when the student defers to the teacher
    route: dict[str, Any] | None = None

    @property
    def columns(self) -> list[Column]:
        shown = [c for c in COLUMNS if not c.optional or any(row.get(c.key) is not None for row in self.rows)]
        # an eval.json written before intervals existed has none to show
        return [c if not c.interval or any(row.get(c.interval) for row in self.rows) else replace(c, interval=None)
                for c in shown]

    @property
    def stage_seconds(self) -> list[tuple[str, float]]:
        return [(name, m["seconds"]) for name, m in self.manifests.items() if m.get("seconds") is not None]

    def result(self, stage: str) -> dict[str, Any]:
        return self.manifests.get(stage, {}).get("result", {})


class _Reader:
    """Reads stage folders' JSON files, hashing each one's bytes as they are parsed."""

    def __init__(self, folders: dict[str, Path], fix: str):
        self.folders, self.fix = folders, fix
        self.sources: list[Source] = []

    def read(self, stage: str, name: str) -> Any:
        path = self.folders[stage] / name
        if not path.is_file():
            raise EdgedistillError(f"{path.parent.parent} is not a finished run: {path} is missing", self.fix)
        data = path.read_bytes()
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise EdgedistillError(f"{path} is not valid JSON ({exc})", self.fix) from None
        # named as in a run folder, whatever folder the stage was read from
        self.sources.append(Source(f"{stage}/{name}", hashlib.sha256(data).hexdigest(), len(data)))
        return value


def _stage_order(run_dir: Path) -> list[str]:
    """A run folder's stages in run order: the report stage's inputs, else by finish time."""
    report = run_dir / REPORT / MANIFEST
    if report.is_file():
        try:
            return list(json.loads(report.read_text())["inputs"])
        except (ValueError, KeyError):
            pass
    found = []
    for path in run_dir.glob(f"*/{MANIFEST}"):
        if path.parent.name not in (PARTIAL, REPORT):
            try:
                found.append((json.loads(path.read_text()).get("finished", ""), path.parent.name))
            except ValueError:
                found.append(("", path.parent.name))
    return [name for _, name in sorted(found)]


def _merge_rows(evaluation: EvalReport, bench: list[BenchRow]) -> list[dict[str, Any]]:
    """Per artifact its bench row and its eval row as one JSON object (answers and schema version left out)."""
    speed = {row.artifact: row.to_dict() for row in bench}
    rows = [{**speed.get(r.artifact, {}), **r.to_dict()} for r in evaluation.artifacts]
    seen = {r["artifact"] for r in rows}
    rows += [row.to_dict() for row in bench if row.artifact not in seen]
    for row in rows:
        row.pop("answers", None)
        row.pop("schema_version", None)
    return rows


def load_run(run_dir: Path | str) -> RunData:
    """Read a finished run folder: its stages' bench/eval JSON and manifests (`edgedistill report RUN`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EdgedistillError(f"run folder {run_dir} does not exist", _fix(run_dir))
    folders = {stage: run_dir / stage for stage in _stage_order(run_dir)}
    # `edgedistill route RUN` writes route.json after the run, with no stage manifest
    if (run_dir / ROUTE / ROUTE_JSON).is_file():
        folders.setdefault(ROUTE, run_dir / ROUTE)
    return load_stages(folders, fix=_fix(run_dir))


def _fix(run_dir: Path) -> str:
    return (f"finish the run first (`edgedistill run RECIPE --out {run_dir}` resumes it), "
            "or pass the folder that `edgedistill run` wrote")


def load_stages(folders: dict[str, Path], *, name: str | None = None, teacher_source: str | None = None,
                fix: str = "finish the run first: `edgedistill run RECIPE --out RUN` resumes it") -> RunData:
    """Read the bench/eval JSON and the manifests of these stage folders (stage name -> folder, in
    run order). `name` and `teacher_source` default to what the manifests recorded of the recipe."""
    reader = _Reader(folders, fix)
    if BENCH not in folders or EVAL not in folders:
        raise EdgedistillError(f"no {BENCH}/ or {EVAL}/ stage folder among {', '.join(folders) or 'none'}", fix)
    bench = reader.read(BENCH, BENCH_JSON)
    evaluation = reader.read(EVAL, EVAL_JSON)
    if not isinstance(bench, list) or not isinstance(evaluation, dict) or "artifacts" not in evaluation:
        raise EdgedistillError(f"{folders[BENCH] / BENCH_JSON} or {folders[EVAL] / EVAL_JSON} is not what the bench "
                               "and eval stages write (a list of rows; an object with 'artifacts')",
                               "re-run them: edgedistill run RECIPE --out RUN --from bench")
    bench_rows = [BenchRow.from_dict(row, folders[BENCH] / BENCH_JSON) for row in bench]
    report = EvalReport.from_dict(evaluation, folders[EVAL] / EVAL_JSON)
    manifests = {stage: reader.read(stage, MANIFEST) for stage, folder in folders.items()
                 if (folder / MANIFEST).is_file()}
    config = next((m["config"] for m in manifests.values() if "name" in m.get("config", {})), {})
    teacher = config.get("teacher") or manifests.get(TEACHER, {}).get("config", {}).get("teacher") or {}
    # only beside bench rows checked against a target, which the device target table shows it with
    preflight = (reader.read(PREFLIGHT, PREFLIGHT_JSON) if any(isinstance(r, dict) and "target" in r for r in bench)
                 and PREFLIGHT in folders and (folders[PREFLIGHT] / PREFLIGHT_JSON).is_file() else None)
    route = reader.read(ROUTE, ROUTE_JSON) if ROUTE in folders and (folders[ROUTE] / ROUTE_JSON).is_file() else None
    return RunData(
        name=name or config.get("name") or folders[BENCH].resolve().parent.name,
        teacher_source=teacher_source or teacher.get("source"),
        rows=_merge_rows(report, bench_rows),
        reference={k: v for k, v in report.reference.to_dict().items() if k != "answers"} if report.reference else None,
        evaluation={k: v for k, v in report.to_dict().items() if k not in ("reference", "artifacts")},
        bench_rows=bench,
        manifests=manifests,
        sources=reader.sources,
        preflight=preflight,
        route=route,
    )


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (quality, speed) point, whether no other point is at least as good in both and
    better in one (higher is better for both)."""
    return [not any(q2 >= q and s2 >= s and (q2 > q or s2 > s) for q2, s2 in points) for q, s in points]
