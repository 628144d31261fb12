"""Preflight: will the recipe's student fit its device target? Answered before the long stages.

    edgedistill run recipes/default.yaml --to preflight   # with bench.target set: RUN/preflight/preflight.json

The student is not built: its HF config is derived from the recipe and the teacher's config (what
depth and width pruning change, a config student's overrides, a given student's own config), its
parameters are counted on PyTorch's meta device (shapes only, no memory), and each GGUF type the run
exports is sized from llama.cpp's nominal bits per weight. `targets.preflight` adds the KV cache at
the target's context length and the runtime's overhead. A model over the budget is a warning, never
an error: the estimate is approximate, and bench measures the real files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from edgedistill.distill.student import check_width, evenly_spaced_layers
from edgedistill.errors import EdgedistillError
from edgedistill.formats import GGUF_QUANTS, GGUF_TYPES, gguf_bits_per_weight, gguf_output_bits
from edgedistill.layout import PREFLIGHT_JSON
from edgedistill.recipe import Recipe, WidthConfig, recipe_target
from edgedistill.sources import resolve_source
from edgedistill.targets import Target, preflight

# Norms and biases (one-dimensional) stay float32 in every GGUF type.
VECTOR_BITS = 32


def _pruned_config(config: PretrainedConfig, keep_layers: int | list[int], width: WidthConfig | None) -> None:
    """What depth and width pruning (edgedistill.distill.student) change in the config, in place."""
    n_layers = config.num_hidden_layers
    if isinstance(keep_layers, int):
        # which blocks importance keeps is only known after scoring; only their count matters here
        keep = evenly_spaced_layers(n_layers, keep_layers)
    else:
        keep = sorted(set(keep_layers))
        if any(not 0 <= i < n_layers for i in keep):
            raise EdgedistillError(f"student.keep_layers {keep_layers} must be distinct indices in 0..{n_layers - 1}")
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    if width is not None:
        check_width(config, width)
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if width.intermediate_size is not None:
            config.intermediate_size = width.intermediate_size
        if width.num_attention_heads is not None:
            group = config.num_attention_heads // config.num_key_value_heads
            config.num_attention_heads = width.num_attention_heads
            config.num_key_value_heads = width.num_attention_heads // group
        if width.hidden_size is not None:
            config.hidden_size = width.hidden_size


def student_config(recipe: Recipe, teacher: Path) -> PretrainedConfig:
    """The HF config the student stage will produce from `teacher` (an HF folder), without building it."""
    cfg = recipe.student
    trust = recipe.teacher.trust_remote_code
    if cfg.method == "given":
        source = resolve_source(recipe.source(cfg.source))
        if source.kind == "hf":
            return AutoConfig.from_pretrained(source.path)
        return AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
    config = AutoConfig.from_pretrained(teacher, trust_remote_code=trust)
    if cfg.method == "config":
        for key, value in cfg.config.items():
            if not hasattr(config, key):
                raise EdgedistillError(f"student.config.{key}: the teacher's config has no such key",
                                       f"use keys of {type(config).__name__}, e.g. num_hidden_layers, hidden_size")
            setattr(config, key, value)
        return config
    # a progressive chain prunes each step from the one before; the student is pruned from the last
    steps = [(s.keep_layers, s.width) for s in (recipe.progressive.steps if recipe.progressive else [])]
    for keep_layers, width in [*steps, (cfg.keep_layers, cfg.width)]:
        _pruned_config(config, keep_layers, width)
    return config


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False):
    """The architecture with every tensor on the meta device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def parameter_count(model) -> int:
    # parameters() yields a tied embedding once, as count_parameters in distill/student.py counts it
    return sum(p.numel() for p in model.parameters())


def gguf_weight_bytes(model, qtype: str) -> int:
    """About the bytes of the weights of `model` in a GGUF file of `qtype`, at llama.cpp's nominal bits
    per weight, counting the output projection and k-quant fallbacks apart (edgedistill.formats)."""
    output = model.get_output_embeddings().weight
    bits = 0.0
    for param in model.parameters():
        if param.dim() == 1:
            per_weight = VECTOR_BITS
        else:
            per_weight = gguf_bits_per_weight(qtype, param.shape[-1], output=param is output)
        bits += param.numel() * per_weight
    return round(bits / 8)


def _rows(role: str, model, qtypes: list[str], target: Target) -> list[dict]:
    hf_config = model.config.to_dict()
    return [{"model": role, "type": qtype, "artifact": f"{role}-{qtype.lower()}.gguf",
             "parameters": parameter_count(model), "num_hidden_layers": model.config.num_hidden_layers,
             **preflight(hf_config, gguf_weight_bytes(model, qtype), target)} for qtype in qtypes]


def estimate(recipe: Recipe, teacher: Path, target: Target) -> dict:
    """The teacher's and the student's estimated memory per GGUF type the run exports (F16 always)."""
    trust = recipe.teacher.trust_remote_code
    teacher_model = meta_model(AutoConfig.from_pretrained(teacher, trust_remote_code=trust), trust)
    teacher_rows = _rows("teacher", teacher_model, list(dict.fromkeys(["F16", *recipe.export.teacher_quants])), target)
    result = {"target": target.name, "context_length": target.context_length,
              "budget_mb": target.budgets.max_memory_mb,
              "bits_per_weight": {q: GGUF_TYPES[q].bits_per_weight for q in GGUF_QUANTS},
              "output_bits_per_weight": {q: gguf_output_bits(q) for q in GGUF_QUANTS if gguf_output_bits(q)},
              "rows": teacher_rows}
    try:
        config = student_config(recipe, teacher)
    except EdgedistillError as exc:
        # the student stage reports the same problem as an error; the preflight only says it could not estimate
        result["student_error"] = exc.problem
        return result
    student = meta_model(config, trust)
    result["rows"] += _rows("student", student, list(dict.fromkeys(["F16", *recipe.export.quants])), target)
    # every type, exported or not, so a warning can name the most precise one that would fit
    result["student_types_that_fit"] = [r["type"] for r in _rows("student", student, list(GGUF_QUANTS), target)
                                        if r["fits"]]
    return result


def _advice(row: dict, result: dict, recipe: Recipe) -> str:
    fitting = result.get("student_types_that_fit")
    smaller = (f"a smaller type (export.quants: {fitting[0]} would fit)" if fitting
               else "a smaller type (none of F16..Q4_0 fits alone)")
    layers = (f"fewer layers (student.keep_layers: {recipe.student.keep_layers})"
              if recipe.student.method == "prune" else f"fewer layers (now {row['num_hidden_layers']})")
    return (f"WARNING: {row['artifact']} does not fit {result['target']}: about {row['estimate_mb']:.0f} MB against "
            f"a {result['budget_mb']:.0f} MB budget; choose {layers}, {smaller}, or a target with a shorter context "
            f"(the KV cache of {result['context_length']} tokens takes {row['kv_cache_mb']:.0f} MB)")


def _warned(row: dict, recipe: Recipe) -> bool:
    # F16 is always written, as the quantizer's input; a warning is for the types the recipe chose
    return row["model"] == "student" and row["fits"] is False and row["type"] in recipe.export.quants


def format_preflight(result: dict, recipe: Recipe) -> str:
    budget = "no memory budget" if result["budget_mb"] is None else f"memory budget {result['budget_mb']:g} MB"
    lines = [f"preflight for target {result['target']} (context {result['context_length']} tokens, {budget}): "
             "weights at llama.cpp's nominal bits per weight + fp16 KV cache + runtime overhead, in MB (MiB)",
             f"| {'model':<7} | {'type':<6} | {'params M':>8} | {'layers':>6} | {'weights':>7} | {'KV cache':>8} | "
             f"{'estimate':>8} | {'budget':>6} | result",
             f"|{'-' * 9}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 24}"]
    for r in result["rows"]:
        verdict = ("no budget" if r["fits"] is None else "fits" if r["fits"]
                   else "WARNING: does not fit" if _warned(r, recipe) else "does not fit")
        budget_cell = "-" if r["budget_mb"] is None else f"{r['budget_mb']:g}"
        lines.append(f"| {r['model']:<7} | {r['type']:<6} | {r['parameters'] / 1e6:>8.1f} | "
                     f"{r['num_hidden_layers']:>6} | "
                     f"{r['weights_mb']:>7.1f} | {r['kv_cache_mb']:>8.1f} | {r['estimate_mb']:>8.1f} | "
                     f"{budget_cell:>6} | {verdict}")
    if "student_error" in result:
        lines.append(f"WARNING: the student could not be estimated: {result['student_error']}")
    lines += [_advice(r, result, recipe) for r in result["rows"] if _warned(r, recipe)]
    return "\n".join(lines)


def preflight_stage(recipe: Recipe, out: Path, *, teacher: Path) -> dict:
    """The preflight stage: estimates, prints and writes preflight.json for the recipe's bench.target.
    It runs right after the teacher stage (whose folder it reads), before the long ones; about a second."""
    result = estimate(recipe, teacher, recipe_target(recipe))
    print(format_preflight(result, recipe))
    (out / PREFLIGHT_JSON).write_text(json.dumps(result, indent=2) + "\n")
    warned = [r["artifact"] for r in result["rows"] if _warned(r, recipe)]
    return {"target": result["target"], "does_not_fit": warned}
