"""A finished run folder read once: one row per artifact, stage times, and the JSON files they came from.

    python -c "from edgedistill.report.data import load_run; print(load_run('runs/tiny').rows)"

The Markdown and HTML reports are both drawn from a `RunData`, so they show the same numbers,
and each number's source (file and key) is named by a `Column`. `sources` holds the sha256 of
every JSON file read, as it was read, so a report can be checked against the run it came from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgedistillError
from edgedistill.records import BenchRow, EvalReport
from edgedistill.pipeline import MANIFEST, PARTIAL

BENCH_JSON = "bench/bench.json"
EVAL_JSON = "eval/eval.json"
PREFLIGHT_JSON = "preflight.json"  # written by `edgedistill run` with bench.target (edgedistill.preflight)


@dataclass(frozen=True)
class Column:
    """One column of the artifact table: the JSON key it shows and the file it is read from.
    `optional` columns are shown only when some row has the key (newer bench/eval versions)."""

    key: str
    header: str
    source: str  # BENCH_JSON or EVAL_JSON
    digits: int = 1
    percent: bool = False  # a 0..1 share shown as a percentage
    optional: bool = False

    def format(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and self.percent:
            value = 100 * value
        return fmt(value, self.digits)


COLUMNS = (
    Column("file_mb", "file MB", BENCH_JSON),
    Column("device", "device", BENCH_JSON, optional=True),
    Column("decode_tokens_per_s", "decode tok/s", BENCH_JSON),
    Column("decode_tokens_per_s_spread", "decode spread tok/s", BENCH_JSON, optional=True),
    Column("prefill_tokens_per_s", "prefill tok/s", BENCH_JSON),
    Column("ttft_ms", "TTFT ms", BENCH_JSON),
    Column("peak_rss_mb", "peak RSS MB", BENCH_JSON),
    Column("peak_gpu_mb", "peak GPU MB", BENCH_JSON, optional=True),
    Column("bandwidth_efficiency", "bandwidth efficiency %", BENCH_JSON, percent=True, optional=True),
    Column("task_score", "task score", EVAL_JSON, digits=3),
    Column("share_of_reference", "% of teacher", EVAL_JSON, percent=True),
    Column("perplexity", "perplexity", EVAL_JSON, digits=2, optional=True),
    Column("perplexity_ratio", "perplexity ratio", EVAL_JSON, digits=3, optional=True),
    Column("kl_to_reference", "KL to teacher", EVAL_JSON, digits=4, optional=True),
    Column("top1_agreement", "top-1 agreement", EVAL_JSON, digits=3, optional=True),
)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def column_sources(columns: list[Column]) -> str:
    """'from bench/bench.json: file_mb, ...; eval/eval.json: task_score, ...' for a table's columns."""
    by_file: dict[str, list[str]] = {}
    for column in columns:
        by_file.setdefault(column.source, []).append(column.key + (" (×100)" if column.percent else ""))
    return "from " + "; ".join(f"{file}: {', '.join(keys)}" for file, keys in by_file.items())


@dataclass
class Source:
    path: str  # relative to the run folder
    sha256: str
    bytes: int


@dataclass
class RunData:
    run_dir: Path
    name: str
    teacher_source: str | None
    rows: list[dict[str, Any]]  # per artifact: its bench row and its eval row merged, eval keys first
    reference: dict[str, Any] | None  # eval.json's reference, without its answers
    bench_rows: list[dict[str, Any]]
    manifests: dict[str, dict[str, Any]]  # stage name -> manifest, in stage order
    sources: list[Source] = field(default_factory=list)
    preflight: dict[str, Any] | None = None

    @property
    def columns(self) -> list[Column]:
        return [c for c in COLUMNS if not c.optional or any(row.get(c.key) is not None for row in self.rows)]

    @property
    def stage_seconds(self) -> list[tuple[str, float]]:
        return [(name, m["seconds"]) for name, m in self.manifests.items() if m.get("seconds") is not None]

    def result(self, stage: str) -> dict[str, Any]:
        return self.manifests.get(stage, {}).get("result", {})


class _Reader:
    """Reads a run's JSON files, hashing each one's bytes as they are parsed."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.sources: list[Source] = []

    def read(self, rel: str, fix: str) -> Any:
        path = self.run_dir / rel
        if not path.is_file():
            raise EdgedistillError(f"{self.run_dir} is not a finished run: {path} is missing", fix)
        data = path.read_bytes()
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise EdgedistillError(f"{path} is not valid JSON ({exc})", fix) from None
        self.sources.append(Source(rel, hashlib.sha256(data).hexdigest(), len(data)))
        return value


def _stage_order(run_dir: Path, stages: list[str] | None) -> list[str]:
    """The stages to report, in run order: as given, else the report stage's inputs, else by finish time."""
    if stages is not None:
        return stages
    report = run_dir / "report" / MANIFEST
    if report.is_file():
        try:
            return list(json.loads(report.read_text())["inputs"])
        except (ValueError, KeyError):
            pass
    found = []
    for path in run_dir.glob(f"*/{MANIFEST}"):
        if path.parent.name not in (PARTIAL, "report"):
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


def load_run(run_dir: Path | str, stages: list[str] | None = None, *, name: str | None = None,
             teacher_source: str | None = None) -> RunData:
    """Read a run folder's bench/eval JSON and stage manifests. `stages` (default: those found,
    in run order) names the stage folders whose manifests are read; `name` and `teacher_source`
    default to what the manifests recorded of the recipe."""
    run_dir = Path(run_dir)
    fix = (f"finish the run first (`edgedistill run RECIPE --out {run_dir}` resumes it), "
           "or pass the folder that `edgedistill run` wrote")
    if not run_dir.is_dir():
        raise EdgedistillError(f"run folder {run_dir} does not exist", fix)
    reader = _Reader(run_dir)
    bench = reader.read(BENCH_JSON, fix)
    evaluation = reader.read(EVAL_JSON, fix)
    if not isinstance(bench, list) or not isinstance(evaluation, dict) or "artifacts" not in evaluation:
        raise EdgedistillError(f"{run_dir / BENCH_JSON} or {run_dir / EVAL_JSON} is not what the bench and eval "
                               "stages write (a list of rows; an object with 'artifacts')",
                               f"re-run them: edgedistill run RECIPE --out {run_dir} --from bench")
    bench_rows = [BenchRow.from_dict(row, run_dir / BENCH_JSON) for row in bench]
    report = EvalReport.from_dict(evaluation, run_dir / EVAL_JSON)
    manifests = {}
    for stage in _stage_order(run_dir, stages):
        if (run_dir / stage / MANIFEST).is_file():
            manifests[stage] = reader.read(f"{stage}/{MANIFEST}", fix)
    config = next((m["config"] for m in [_report_manifest(run_dir), *manifests.values()]
                   if "name" in m.get("config", {})), {})
    teacher = config.get("teacher") or manifests.get("teacher", {}).get("config", {}).get("teacher") or {}
    # only beside bench rows checked against a target, which the device target table shows it with
    preflight = (reader.read(PREFLIGHT_JSON, fix) if any(isinstance(r, dict) and "target" in r for r in bench)
                 and (run_dir / PREFLIGHT_JSON).is_file() else None)
    return RunData(
        run_dir=run_dir,
        name=name or config.get("name") or run_dir.resolve().name,
        teacher_source=teacher_source or teacher.get("source"),
        rows=_merge_rows(report, bench_rows),
        reference={k: v for k, v in report.reference.to_dict().items() if k != "answers"} if report.reference else None,
        bench_rows=bench,
        manifests=manifests,
        sources=reader.sources,
        preflight=preflight,
    )


def _report_manifest(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "report" / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (quality, speed) point, whether no other point is at least as good in both and
    better in one (higher is better for both)."""
    return [not any(q2 >= q and s2 >= s and (q2 > q or s2 > s) for q2, s2 in points) for q, s in points]
