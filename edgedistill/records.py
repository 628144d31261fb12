"""The rows of bench.json and eval.json as typed records: one place where their keys are spelled.

    python -c "from edgedistill.records import read_bench; print(read_bench('runs/tiny/bench/bench.json')[0].decode_tokens_per_s)"

bench.json is a list of `BenchRow`s; eval.json is one `EvalReport`: the reference's `EvalReference`
and an `EvalRow` per artifact. Both files are public: a record writes exactly the keys it was given
or read (a key never set is left out, as the optional ones always were; one set to None is written
as null) plus `schema_version`, first, on each bench row and on the eval report. A file without
`schema_version` was written before it existed and reads as version 1; a newer version than this
module knows is refused. Every measurement may be missing (None), as in a hand-made or older file:
readers show such a value as not measured. Keys this version does not know are kept as they are.

This module imports only pydantic, edgedistill.errors and edgedistill.layout: everything may import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from edgedistill import layout
from edgedistill.errors import EdgedistillError

SCHEMA_VERSION = 1
# an int stays an int and a float a float, so that a row reads and writes back as the same JSON
Number = Union[int, float]


class Record(BaseModel):
    """A JSON object with typed keys; `to_dict` holds exactly the keys set, in the declared order."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    versioned: ClassVar[bool] = False  # a file's top-level record: carries schema_version

    def to_dict(self) -> dict[str, Any]:
        fields = self.model_dump(mode="json", exclude_unset=True)
        return {"schema_version": SCHEMA_VERSION, **fields} if self.versioned else fields

    def update(self, values: dict[str, Any]) -> None:
        """Sets several keys at once, each validated, as dict.update would."""
        for key, value in values.items():
            setattr(self, key, value)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, value: Any, source: str | Path = "a record"):
        """The record of a parsed JSON object; `source` names the file in errors."""
        if not isinstance(value, dict):
            raise EdgedistillError(f"{source}: a {cls.__name__} is a JSON object, got {type(value).__name__}",
                                   "re-run the stage that writes it")
        value = dict(value)
        if cls.versioned:
            check_schema_version(value.pop("schema_version", 1), source)
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise EdgedistillError(f"{source}: not a {cls.__name__} ({problems})",
                                   "re-run the stage that writes it") from None

    @classmethod
    def from_json(cls, text: str, source: str | Path = "a record"):
        return cls.from_dict(_parse(text, source), source)


def check_schema_version(version: Any, source: str | Path) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise EdgedistillError(f"{source} has schema_version {version!r}; this edgedistill reads versions 1 to "
                               f"{SCHEMA_VERSION}", "upgrade edgedistill, or re-run the stage that wrote it")


def _parse(text: str | bytes, source: str | Path) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise EdgedistillError(f"{source} is not valid JSON ({exc})", "re-run the stage that writes it") from None


class TargetResult(Record):
    """A bench row's checks against a device target (edgedistill.targets.check_target's dicts)."""

    name: str
    checks: list[dict[str, Any]]


class BenchRow(Record):
    """One artifact's speed and memory (edgedistill.bench.latency), a row of bench.json."""

    versioned: ClassVar[bool] = True

    artifact: str  # the file name, or the folder name ending in "/", as in eval.json
    path: str | None = None
    file_mb: Number | None = None
    # what the worker measured (edgedistill.bench.worker.summarize)
    runtime: str | None = None
    device: str | None = None  # "cpu" or "cuda:<GPU name>"
    prompt_tokens: int | None = None
    gen_tokens: int | None = None
    repetitions: int | None = None
    threads: int | None = None
    ttft_ms: Number | None = None
    prefill_tokens_per_s: Number | None = None
    prefill_tokens_per_s_spread: Number | None = None
    decode_tokens_per_s: Number | None = None
    decode_tokens_per_s_spread: Number | None = None
    peak_rss_mb: Number | None = None
    # HF folders in PyTorch only (edgedistill.bench.torch_worker)
    dtype: str | None = None
    decode_mode: str | None = None
    cuda_graph_error: str | None = None
    generate_decode_tokens_per_s: Number | None = None
    speedup_vs_generate: Number | None = None
    tokens_matching_generate: int | None = None
    tokens_compared: int | None = None
    peak_gpu_mb: Number | None = None
    # the decode speed's memory-bandwidth bound (edgedistill.bench.bandwidth, edgedistill.bench.model_bytes)
    bandwidth_gb_s: Number | None = None
    bandwidth_method: str | None = None
    bytes_per_token: int | None = None
    bandwidth_bound_tokens_per_s: Number | None = None
    bandwidth_efficiency: Number | None = None  # a 0..1 share of the bound
    target: TargetResult | None = None  # with a device target only


class TaskScore(Record):
    """An artifact's greedy answers to the held-out prompts and their score (edgedistill.evaluate.task)."""

    artifact: str
    path: str | None = None
    examples: int | None = None
    correct: int | None = None
    unparsed: int | None = None
    task_score: Number | None = None
    task_score_interval: list[Number] | None = None  # [low, high], 95% bootstrap over the examples
    # per scorer: mean, low, high, n, errors, first_error, skipped_no_reference; with teacher-built
    # references also n_gold and n_teacher_built (edgedistill.evaluate.references)
    scores: dict[str, dict[str, Any]] | None = None
    answers: list[dict[str, Any]] = []  # {"id", "answer", "predicted", "label"} per held-out record


class EvalReference(TaskScore):
    """The reference's task score, and its perplexity on its own scored answers."""

    perplexity: Number | None = None
    scored_tokens: int | None = None
    # with teacher-built references: per comparing scorer, its mean, low, high and n over the gold ones
    agreement_with_gold: dict[str, dict[str, Any]] | None = None


def score_basis(row: dict[str, Any]) -> str:
    """How a row's task score was counted, for a sentence: "5/10" (labelled records answered right),
    else the scorer it is the mean of and over how many examples, as in "chrf over 6"."""
    if row.get("correct") is not None:
        return f"{row['correct']}/{row.get('examples')}"
    scores = row.get("scores") or {}
    name = next(iter(scores), "score")
    return f"{name} over {scores.get(name, {}).get('n', row.get('examples'))}"


# the eval stage's row of the trained student in PyTorch fp32 (the distill or merge stage's HF folder)
STUDENT_ROW = "student (PyTorch)/"


def format_score(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_interval(interval: Any, *, scale: float = 1, digits: int = 2, significant: bool = False) -> str:
    """" [0.74, 0.87]" for a [low, high] pair (times `scale`), "" when there is none; `digits`
    decimals, or with `significant` that many significant digits (a KL: " [0.00232, 0.00554]")."""
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 or any(v is None for v in interval):
        return ""
    low, high = (scale * value for value in interval)
    spec = f".{digits}{'g' if significant else 'f'}"
    return f" [{low:{spec}}, {high:{spec}}]"


class EvalRow(TaskScore):
    """One artifact's task score, its share of the reference's, and how it scores the reference's answers."""

    share_of_reference: Number | None = None  # None (written as null) when the reference scores 0
    share_of_reference_interval: list[Number] | None = None  # [low, high], examples resampled in pairs
    within_noise_of_reference: bool | None = None  # the paired difference's interval holds 0
    perplexity: Number | None = None
    perplexity_ratio: Number | None = None
    kl_to_reference: Number | None = None
    kl_to_reference_interval: list[Number] | None = None  # [low, high], records resampled
    top1_agreement: Number | None = None
    scored_tokens: int | None = None


class EvalReport(Record):
    """eval.json."""

    versioned: ClassVar[bool] = True

    data: str | None = None  # the held-out records' file
    device: str | None = None
    dtype: str | None = None
    reference: EvalReference | None = None
    artifacts: list[EvalRow]
    scored_records: int | None = None  # with a reference's answers scored only
    scored_text: str | None = None
    skipped_too_long: int | None = None
    # held-out records scored against the teacher's answers, having no gold one
    teacher_built_references: int | None = None
    unusable_teacher_answers: int | None = None  # records left without a reference: the answer could not be one


def read_bench(path: Path | str) -> list[BenchRow]:
    """bench.json's rows."""
    path = Path(path)
    rows = _parse(path.read_bytes(), path)
    if not isinstance(rows, list):
        raise EdgedistillError(f"{path} is not what the bench stage writes (a list of rows)",
                               f"re-run it: edgedistill run RECIPE --from {layout.BENCH}")
    return [BenchRow.from_dict(row, path) for row in rows]


def bench_json(rows: list[BenchRow]) -> str:
    """bench.json's text."""
    return json.dumps([row.to_dict() for row in rows], indent=2) + "\n"


def read_eval(path: Path | str) -> EvalReport:
    """eval.json's report."""
    path = Path(path)
    return EvalReport.from_json(path.read_text(), path)
