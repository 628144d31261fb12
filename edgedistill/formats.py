"""The export formats' types, as data: every GGUF quantization type and ONNX precision, in one table.

    python -c "from edgedistill.formats import GGUF_TYPES; print(GGUF_TYPES['Q4_K_M'])"

Recipe validation, llama.cpp's quantizer, `--max-size`, the verification bounds and the preflight's
size estimates all read GGUF_TYPES; a new type is one row. This module imports only the standard
library and edgedistill.errors, so the recipe loader can use it without loading torch or llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgedistill.errors import EdgedistillError

# k-quants pack 256 weights a block; a matrix whose rows are not a multiple of this is stored in
# the row's `fallback` type instead (llama.cpp's llama_tensor_get_type)
K_QUANT_BLOCK = 256


@dataclass(frozen=True)
class Bound:
    """What an export of one type must reach against its full-precision model; None: not checked."""

    min_top1_agreement: float | None = None
    greedy_identical: bool = False
    max_ppl_ratio: float | None = None
    max_mean_kl: float | None = None
    # Near ties (edgedistill.export.verify), in log-prob: a few times the largest difference at
    # PyTorch's top token measured on SmolLM2 and its 10-layer student (F16 0.013, BF16 0.08; a
    # top-2 pair can move by twice that, in opposite directions).
    tie_margin: float = 0.05


@dataclass(frozen=True)
class GgufType:
    """One GGUF file type: how llama.cpp makes it, how large it is, and what it must reach.

    `bits_per_weight`: llama.cpp's nominal figure, the block formats' exact sizes (Q8_0: 34 bytes
    per 32 weights, Q6_K: 210 per 256, Q4_0: 18 per 32) and, for the _M mixes, which keep some
    tensors in a larger type, the average llama.cpp's authors report for 7B models. `fallback`: the
    type a k-quant's rows that are not a multiple of K_QUANT_BLOCK are stored in. `output_type`:
    the type llama.cpp picks for the output projection (the embedding table when tied); None: the
    same rule as the other weights. `exported`: edgedistill writes it (recipes, --quant); F32
    files are only verified.
    """

    name: str
    llama_ftype: str  # llama_cpp's LLAMA_FTYPE_* constant
    bits_per_weight: float
    bound: Bound
    fallback: str | None = None
    fallback_bits: float | None = None
    output_type: str | None = None
    exported: bool = True


# Bounds of the quantized types: llama.cpp's own quantizer on the embedded teacher (SmolLM2-135M),
# the default run's 10-layer student and the tiny recipe's random 4-layer teachers (seeds 0-3,
# worst shown), scored on edgedistill.export.verify.EVAL_TEXTS, mean KL / perplexity ratio:
#   type     teacher          student          random, 4 layers
#   Q8_0     0.0046 / 0.994   0.0040 / 0.995   0.0056 / 1.001
#   Q6_K     0.016  / 0.997   0.0086 / 0.997   0.0056 / 1.001
#   Q5_K_M   0.072  / 1.128   0.099  / 0.931   0.129  / 1.037
#   Q4_K_M   0.053  / 1.065   0.064  / 1.139   0.164  / 1.029
#   Q4_0     0.357  / 1.134   0.278  / 1.087   0.468  / 1.015
# Each bound is about 3x the real models' worse KL and 2x their worse perplexity cost, since other
# models and texts vary (a ratio is noisy on texts a task-specialized student finds foreign; ratios
# below 1 are that noise too), and at least 1.5x the random models' KL: random weights (initializer
# 0.2) amplify noise layer by layer, more than trained ones. Q5_K_M is no stricter than Q4_K_M: on
# widths that are not a multiple of 256 (SmolLM2's 576, the tiny models' 64) llama.cpp falls back
# to q5_1 where Q4_K_M gets q5_0, and it measured worse. A broken file is off by an order of
# magnitude or more: two attention heads swapped in one layer of the tiny test model give KL 2.25
# (and a perplexity ratio of 1.001: on random models only the KL sees it).
#
# Output projection: llama.cpp keeps it in Q6_K for every type below Q8_0 (and in Q6_K's fallback,
# Q8_0, when its rows are not a multiple of 256). In a small model that matrix is a large share of
# all weights (SmolLM2-135M: 21%), so the preflight counts it apart. The fallbacks matter as much:
# SmolLM2's 576-wide rows take them for all but the down projections; without them Q4_K_M was
# estimated 10% under its real file.
_FULL = Bound(min_top1_agreement=0.99, greedy_identical=True)
# From the most to the least precise (and, but for BF16, the largest to the smallest).
GGUF_TYPES: dict[str, GgufType] = {t.name: t for t in (
    GgufType("F32", "LLAMA_FTYPE_ALL_F32", 32.0, _FULL, exported=False),
    GgufType("F16", "LLAMA_FTYPE_MOSTLY_F16", 16.0, _FULL),
    GgufType("BF16", "LLAMA_FTYPE_MOSTLY_BF16", 16.0, Bound(min_top1_agreement=0.99, greedy_identical=True,
                                                             tie_margin=0.2)),
    GgufType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", 8.5, Bound(max_ppl_ratio=1.03, max_mean_kl=0.015)),
    GgufType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", 6.5625, Bound(max_ppl_ratio=1.05, max_mean_kl=0.05),
             fallback="Q8_0", fallback_bits=8.5, output_type="Q6_K"),
    GgufType("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.69, Bound(max_ppl_ratio=1.3, max_mean_kl=0.3),
             fallback="Q5_1", fallback_bits=6.0, output_type="Q6_K"),
    GgufType("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.85, Bound(max_ppl_ratio=1.3, max_mean_kl=0.25),
             fallback="Q5_0", fallback_bits=5.5, output_type="Q6_K"),
    GgufType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", 4.5, Bound(max_ppl_ratio=1.3, max_mean_kl=1.0), output_type="Q6_K"),
)}
# what a recipe's export.quants and `edgedistill export --quant` accept
GGUF_QUANTS: tuple[str, ...] = tuple(name for name, t in GGUF_TYPES.items() if t.exported)
# what --max-size chooses among, most precise first: each type strictly smaller than the one before
# (BF16 is F16's size and less precise, so it is never the better fit)
BUDGET_LADDER: tuple[str, ...] = tuple(
    name for i, name in enumerate(GGUF_QUANTS)
    if all(GGUF_TYPES[name].bits_per_weight < GGUF_TYPES[before].bits_per_weight for before in GGUF_QUANTS[:i]))

ONNX_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")


def gguf_type(name: str) -> GgufType:
    """The exported type called `name` (any case); EdgedistillError naming the choices otherwise."""
    found = GGUF_TYPES.get(str(name).upper())
    if found is None or not found.exported:
        raise EdgedistillError(f"unknown GGUF quantization {name!r}", f"use one of {', '.join(GGUF_QUANTS)}")
    return found


def gguf_bits_per_weight(qtype: str, row_length: int, *, output: bool = False) -> float:
    """About the bits a weight of a matrix with rows `row_length` long takes in a GGUF of `qtype`;
    `output`: the matrix is the output projection, which llama.cpp may keep in its own type."""
    kind = GGUF_TYPES[qtype]
    if output and kind.output_type is not None:
        kind = GGUF_TYPES[kind.output_type]
    if kind.fallback is not None and row_length % K_QUANT_BLOCK:
        return kind.fallback_bits
    return kind.bits_per_weight


def gguf_output_bits(qtype: str) -> float | None:
    """The output projection's nominal bits in a GGUF of `qtype` when llama.cpp keeps it in another type."""
    output_type = GGUF_TYPES[qtype].output_type
    return None if output_type is None else GGUF_TYPES[output_type].bits_per_weight
