"""Device targets: the budgets a device class sets, checked against bench and eval results.

    from edgedistill.targets import check_target, format_target_checks, load_target
    target = load_target("raspberry-pi-5")            # or a path: load_target("my-board.yaml")
    print(format_target_checks(target, [(row.artifact, check_target(target, row, eval_row))]))

A target is a YAML file (built-in ones live in recipes/targets/): a `context_length` and optional
`budgets` for memory, file size, time to first token, decode speed and the share of the teacher's
task score. `preflight` estimates memory (weights + KV cache at the target's context) before a long
run, so a model that cannot fit is caught without training it (edgedistill.preflight does that for a
recipe's `bench.target`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgedistill.errors import EdgedistillError
from edgedistill.records import BenchRow, EvalRow
from edgedistill.yaml_config import read_yaml_mapping, validation_problems

BUILTIN_TARGETS = Path(__file__).resolve().parent.parent / "recipes" / "targets"

# Memory is in MiB, like bench's peak_rss_mb which the memory budget is checked against.
MIB = 1024 * 1024
# llama.cpp keeps K and V in fp16 unless told otherwise (--cache-type-k/-v).
KV_BYTES_PER_ELEMENT = 2
# An assumption, not a measurement: the runtime's own memory (compute buffers, tokenizer, the
# process itself) beyond weights and KV cache; llama.cpp on CPU is typically around this for small models.
RUNTIME_OVERHEAD_MB = 100.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budgets(_Section):
    """Every budget is optional; the ones set are each checked. Memory and file size in MB."""

    max_memory_mb: Annotated[float, Field(gt=0)] | None = None
    max_file_mb: Annotated[float, Field(gt=0)] | None = None
    max_ttft_ms: Annotated[float, Field(gt=0)] | None = None
    min_decode_tokens_per_s: Annotated[float, Field(gt=0)] | None = None
    # A fraction of the teacher's task score (eval's share_of_reference), e.g. 0.85.
    min_quality_share: Annotated[float, Field(gt=0, le=1)] | None = None


class Target(_Section):
    name: str
    description: str = ""
    context_length: Annotated[int, Field(gt=0)]
    budgets: Budgets = Budgets()


# budget -> (the row it is read from, the key in that row (a BenchRow or EvalRow field), whether the
# limit is a maximum)
BUDGET_SOURCES: dict[str, tuple[str, str, bool]] = {
    "max_memory_mb": ("bench", "peak_rss_mb", True),
    "max_file_mb": ("bench", "file_mb", True),
    "max_ttft_ms": ("bench", "ttft_ms", True),
    "min_decode_tokens_per_s": ("bench", "decode_tokens_per_s", False),
    "min_quality_share": ("eval", "share_of_reference", False),
}


def builtin_targets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_TARGETS.glob("*.yaml"))


def target_path(spec: str | Path) -> Path:
    """The YAML file of a target: `spec` itself, or recipes/targets/SPEC.yaml for a built-in name."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise EdgedistillError(f"target file {path} does not exist",
                                   f"pass a YAML file or a built-in name: {', '.join(builtin_targets())}")
        return path
    for candidate in (Path("recipes/targets") / f"{spec}.yaml", BUILTIN_TARGETS / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    raise EdgedistillError(f"unknown target {str(spec)!r}",
                           f"use a built-in name ({', '.join(builtin_targets()) or 'none found'}) or a path to a YAML file")


def load_target(spec: str | Path) -> Target:
    """A built-in target by name (recipes/targets/NAME.yaml) or a target YAML file, validated."""
    path = target_path(spec)
    raw = read_yaml_mapping(path, "name, context_length and budgets")
    try:
        return Target.model_validate(raw)
    except ValidationError as exc:
        raise EdgedistillError("invalid target\n  " + "\n  ".join(validation_problems(path, exc)),
                               f"budgets are: {', '.join(BUDGET_SOURCES)}") from None


def _check(budget: str, limit: float, value: float | None) -> dict:
    if value is None:
        passed = margin = None
    else:
        headroom = limit - value if BUDGET_SOURCES[budget][2] else value - limit
        passed = headroom >= 0
        margin = round(headroom / limit, 4)
    return {"budget": budget, "limit": limit, "value": value, "passed": passed, "margin": margin}


def check_target(target: Target, bench_row: BenchRow | dict, eval_row: EvalRow | dict | None = None) -> list[dict]:
    """One check per budget set: {"budget", "limit", "value", "passed", "margin"}. The rows are
    records or their JSON objects; without `eval_row` the quality budget is not measured.

    margin is the relative headroom, positive inside the budget ((limit - value) / limit for a
    maximum, (value - limit) / limit for a minimum); an unmeasured value gives passed and margin None.
    """
    rows = {"bench": bench_row if isinstance(bench_row, BenchRow) else BenchRow.from_dict(bench_row),
            "eval": eval_row if isinstance(eval_row, EvalRow) or eval_row is None else EvalRow.from_dict(eval_row)}
    return [_check(budget, getattr(target.budgets, budget), getattr(rows[source], key, None))
            for budget, (source, key, _) in BUDGET_SOURCES.items() if getattr(target.budgets, budget) is not None]


def completed_checks(checks: list[dict], row: dict) -> list[dict]:
    """`checks` with the values they lacked taken from `row` (a bench row merged with its eval row):
    the bench stage runs before eval, so its quality check is only measured in the report."""
    return [_check(c["budget"], c["limit"], row.get(BUDGET_SOURCES[c["budget"]][1]))
            if c["value"] is None and c["budget"] in BUDGET_SOURCES else c for c in checks]


def any_failed(checks: list[dict]) -> bool:
    return any(c["passed"] is False for c in checks)


def _number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"


def format_target_checks(target: Target, rows: list[tuple[str, list[dict]]]) -> str:
    """A table per artifact (budget, limit, measured, margin, result) for `check_target`'s checks."""
    lines = [f"target {target.name} (context {target.context_length} tokens)"]
    for artifact, checks in rows:
        lines += ["", f"{artifact}:", f"| {'budget':<24} | {'limit':>8} | {'measured':>9} | {'margin':>7} | result",
                  f"|{'-' * 26}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 14}"]
        for c in checks:
            measured = "-" if c["value"] is None else _number(c["value"])
            margin = "-" if c["margin"] is None else f"{100 * c['margin']:+.0f}%"
            result = "not measured" if c["passed"] is None else ("pass" if c["passed"] else "FAIL")
            lines.append(f"| {c['budget']:<24} | {_number(c['limit']):>8} | {measured:>9} | {margin:>7} | {result}")
    lines += ["", "Speeds and memory were measured on this machine, not on the target device: "
                  "treat them as an estimate of how it would do there."]
    return "\n".join(lines)


def kv_cache_bytes(hf_config: dict[str, Any], context_length: int) -> int:
    """K and V for every layer at `context_length` tokens, fp16 as llama.cpp keeps them by default."""
    try:
        layers = hf_config["num_hidden_layers"]
        attention_heads = hf_config["num_attention_heads"]
    except KeyError as exc:
        raise EdgedistillError(f"the model's config has no {exc.args[0]!r}",
                               "preflight reads an HF config.json (num_hidden_layers, num_attention_heads, ...)") from None
    kv_heads = hf_config.get("num_key_value_heads") or attention_heads
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // attention_heads
    return 2 * layers * kv_heads * head_dim * context_length * KV_BYTES_PER_ELEMENT


def preflight(hf_config: dict[str, Any], weight_bytes: int, target: Target) -> dict:
    """Estimated memory of the model on the target, in MiB, against its memory budget.

    fits is None when the target sets no memory budget.
    """
    weights_mb = weight_bytes / MIB
    kv_cache_mb = kv_cache_bytes(hf_config, target.context_length) / MIB
    estimate_mb = weights_mb + kv_cache_mb + RUNTIME_OVERHEAD_MB
    budget_mb = target.budgets.max_memory_mb
    return {"weights_mb": round(weights_mb, 1), "kv_cache_mb": round(kv_cache_mb, 1),
            "overhead_mb": RUNTIME_OVERHEAD_MB, "estimate_mb": round(estimate_mb, 1), "budget_mb": budget_mb,
            "fits": None if budget_mb is None else estimate_mb <= budget_mb}
