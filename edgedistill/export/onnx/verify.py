"""Check an ONNX export in ONNX Runtime against the PyTorch model it was exported from.

    python -c "from edgedistill.export.onnx.verify import verify_onnx; \
print(verify_onnx('runs/sentiment/export_onnx/student-int4', 'runs/sentiment/distill'))"

The same fixed texts, prompts and scoring as the GGUF check (edgedistill.export.verify, whose
PyTorch reference is reused, so one reference serves every export of a folder):
- the tokenizer: the export's tokenizer (onnxruntime-genai's for builder exports) must give the HF
  tokenizer's ids on TOKENIZER_TEXTS (code, emoji, accents, CJK, whitespace runs, special tokens)
  and decode them back to the HF tokenizer's text; any difference fails the export, whatever its
  precision, because a model fed other ids is another model;
- full-vocabulary log-probs at every position of the texts, in a plain onnxruntime session:
  top-1 agreement, mean KL(PyTorch || ONNX), both perplexities and their ratio, and for float
  exports the largest log-prob difference;
- greedy continuations of fixed prompts in the runtime a user runs (onnxruntime-genai for builder
  exports, with its KV cache), token by token, near ties told apart as in the GGUF check.
The precision picks its bound in BOUNDS; a missed bound raises EdgedistillError.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgedistill.errors import EdgedistillError
from edgedistill.export import verify
from edgedistill.export.onnx.options import MANIFEST, MODEL_FILE
from edgedistill.export.verify import GREEDY_TOKENS, Column, Reference, bound_failures, compare_greedy, score_texts
from edgedistill.formats import ONNX_PRECISIONS, Bound
from edgedistill.runtimes.onnx import OnnxChatModel, OnnxDecoder

# Texts a tokenizer gets wrong first: byte-level pieces of multi-byte characters, runs of spaces and
# newlines, digits, code indentation, and special tokens written in the text.
TOKENIZER_TEXTS: tuple[str, ...] = (
    "Hello world",
    "spaces   runs  \n\n\tand\ttabs    end ",
    "   leading spaces and trailing ones   ",
    "\n\n\n",
    "digits 12345 and 3.14159, 2024-11-05",
    "café naïve Zürich Ærø façade déjà vu",
    "emoji 🚀🎉 done 👍🏽 and a family 👨‍👩‍👧",
    "中文测试，日本語のテキスト、한국어 문장",
    "Привет, мир! Γειά σου κόσμε. שלום עולם. مرحبا بالعالم",
    "def mean(values):\n    if not values:\n        raise ValueError(\"empty\")\n    return sum(values) / len(values)\n",
    "for (int i = 0; i < n; ++i) { total += a[i] * b[i]; }  // dot",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
)

# float: measured on SmolLM2-135M and its 10-layer student (builder fp32: 7e-5 largest log-prob
# difference, every argmax equal) and on the tiny random test models; a wrong graph is off by
# whole units. Quantized: weight-only RTN (MatMulNBits, block 32, symmetric, int8 lm_head),
# mean KL / perplexity ratio on EVAL_TEXTS:
#   precision  teacher          student          random, 2 layers (tests)
#   int8       0.0048 / 0.992   0.0039 / 1.003   see tests/test_export_onnx.py
#   int4       0.45   / 1.26    0.28   / 1.10
# int4 on SmolLM2 is worse than llama.cpp's Q4_K_M (0.053 / 1.065, which falls back to 5 and 8 bits
# on this width) and close to Q4_0 (0.357 / 1.134): the teacher's weights come from a Q4_1 GGUF and
# sit on an asymmetric grid with float minimums that int4 with integer zero points cannot
# reproduce. The bounds are about 2x the real models' cost, like the GGUF bounds.
BOUNDS: dict[str, Bound] = {
    "fp32": Bound(min_top1_agreement=0.99, greedy_identical=True),
    "fp16": Bound(min_top1_agreement=0.98, greedy_identical=True, tie_margin=0.2),
    "int8": Bound(max_ppl_ratio=1.03, max_mean_kl=0.015),
    "int4": Bound(max_ppl_ratio=1.5, max_mean_kl=1.0),
}
# int8/int4 at MatMulNBits accuracy level 4 (int8 activations) against the same weights at level 0,
# top-1 with near ties (log-prob gap <= 0.2) counted as agreeing: teacher int4 0.996, int8 1.000.
ACCURACY_LEVEL_MIN_AGREEMENT = 0.98
ACCURACY_LEVEL_TIE_MARGIN = 0.2
# fp32 exports compute what PyTorch computes, in another order: the largest absolute difference
# of any log-prob at any position stays below this (measured 7e-5 on the student).
FP32_MAX_ABS_LOGPROB_DIFF = 2e-3


def _export_precision(export_dir: Path) -> str:
    manifest = export_dir / MANIFEST
    if not manifest.is_file():
        raise EdgedistillError(f"{export_dir} has no {MANIFEST}", "pass the precision, or export it with edgedistill")
    return json.loads(manifest.read_text())["precision"]


def check_tokenizer(chat: OnnxChatModel, ref: Reference, texts=TOKENIZER_TEXTS) -> list[dict]:
    """The texts the export's tokenizer encodes or decodes differently from the HF tokenizer."""
    problems = []
    for text in texts:
        expected = ref.tokenizer(text).input_ids
        got = chat.encode(text)
        decoded = chat.decode(expected)
        expected_text = ref.tokenizer.decode(expected, skip_special_tokens=True)
        if got != expected or decoded != expected_text:
            problems.append({"text": text, "hf_ids": expected, "onnx_ids": got,
                             "hf_decoded": expected_text, "onnx_decoded": decoded})
    return problems


def accuracy_level_agreement(export_dir: Path, decoder: OnnxDecoder, ref: Reference, threads: int | None) -> dict | None:
    """Top-1 agreement (near ties counted) of the export's MatMulNBits at its accuracy level with the
    same weights at level 0 (float activations), over the reference texts; None without such nodes.

    Weights and scales are the same in both, so a disagreement beyond near ties is the accuracy
    level's own arithmetic flipping the model's choices: the trap some levels fall into."""
    import onnx

    model = onnx.load(str(export_dir / MODEL_FILE), load_external_data=False)
    levels = set()
    for node in model.graph.node:
        for attribute in node.attribute if node.op_type == "MatMulNBits" else ():
            if attribute.name == "accuracy_level":
                levels.add(attribute.i)
                attribute.i = 0
    if not levels - {0}:
        return None
    # beside model.onnx: ONNX Runtime resolves the external data only inside the model's folder
    level0 = export_dir / ".verify-accuracy-level-0.onnx"
    onnx.save(model, str(level0))
    try:
        plain = OnnxDecoder(export_dir, threads=threads, model_file=level0.name)
    finally:
        level0.unlink()
    agree = positions = 0
    for ids in ref.text_ids:
        got, want = decoder.logits(ids), plain.logits(ids)
        picked, best = got.argmax(-1), want.argmax(-1)
        rows = np.arange(len(ids))
        agree += int(((picked == best) | (want[rows, best] - want[rows, picked] <= ACCURACY_LEVEL_TIE_MARGIN)).sum())
        positions += len(ids)
    return {"accuracy_levels": sorted(levels), "top1_agreement_vs_level_0": agree / positions}


def _score(export_dir: Path, precision: str, ref: Reference, bound: Bound | None, threads: int | None) -> dict:
    chat = OnnxChatModel(export_dir, threads=threads)
    # builder exports generate in onnxruntime-genai, which gives no full-sequence logits: a plain
    # session of the same graph scores the texts
    decoder = OnnxDecoder(export_dir, threads=threads) if chat.genai else chat.decoder
    tokenizer_problems = check_tokenizer(chat, ref)
    tie_margin = (bound or Bound()).tie_margin

    return {
        "file": str(export_dir),
        "file_type": precision,
        "reference": str(ref.folder),
        "runtime": "onnxruntime-genai" if chat.genai else "onnxruntime",
        "tokenization_identical": not tokenizer_problems,
        "tokenizer_problems": tokenizer_problems,
        **score_texts(ref, decoder.logits, tie_margin, "onnx", export_dir),
        **compare_greedy(ref, lambda prompt: chat.greedy_ids(prompt, GREEDY_TOKENS), tie_margin, "onnx"),
        "accuracy_level_check": accuracy_level_agreement(export_dir, decoder, ref, threads),
        "tie_margin": tie_margin,
        "bound": asdict(bound) if bound is not None else None,
    }


def _check(result: dict) -> list[str]:
    """One line per missed bound, naming the measured value and the bound."""
    failures = []
    for problem in result["tokenizer_problems"][:3]:
        failures.append(f"the export's tokenizer gives {problem['onnx_ids'][:12]} / {problem['onnx_decoded']!r} for "
                        f"{problem['text']!r} where the HF tokenizer gives {problem['hf_ids'][:12]} / "
                        f"{problem['hf_decoded']!r}")
    if result["file_type"] == "fp32" and result["max_abs_logprob_diff"] > FP32_MAX_ABS_LOGPROB_DIFF:
        failures.append(f"largest log-prob difference {result['max_abs_logprob_diff']:.3g} > {FP32_MAX_ABS_LOGPROB_DIFF}")
    level = result.get("accuracy_level_check")
    if level and level["top1_agreement_vs_level_0"] < ACCURACY_LEVEL_MIN_AGREEMENT:
        failures.append(f"MatMulNBits accuracy level {level['accuracy_levels']} picks another next token than level 0 "
                        f"at {1 - level['top1_agreement_vs_level_0']:.1%} of positions (near ties aside; at most "
                        f"{1 - ACCURACY_LEVEL_MIN_AGREEMENT:.0%} allowed): export with --accuracy-level 0")
    return failures + bound_failures(result)


def _fix(result: dict) -> str:
    if not result["tokenization_identical"]:
        return ("the reference folder's tokenizer files are read differently by ONNX Runtime GenAI; for a model "
                "that came from a GGUF file, make the HF folder with edgedistill (the teacher stage rebuilds the "
                "tokenizer from the GGUF's own metadata) and export that")
    if result["file_type"] in ("fp32", "fp16"):
        return ("a float export should match PyTorch: the export is wrong (graph, weights, tokenizer) or the reference "
                "is not the folder it was exported from")
    return ("export a higher precision (int8 instead of int4), keep the lm_head at 8 bits, use a smaller "
            "block_size (16) or accuracy_level=1 (fp32 activations)")


def reference_for(hf_dir: Path, texts: list[str] | None = None) -> Reference:
    """PyTorch's view of the texts, to pass to several verify_onnx calls on exports of one folder."""
    return verify.reference(hf_dir, texts)


def verify_onnx(export_dir: Path, reference_hf_dir: Path, *, precision: str | None = None,
                texts: list[str] | None = None, bounds: dict[str, Bound | None] | None = None,
                threads: int | None = None, reference: Reference | None = None,
                raise_on_failure: bool = True) -> dict:
    """Compare the ONNX export in `export_dir` with the HF folder `reference_hf_dir` in PyTorch.

    `precision` defaults to the one the export's manifest records; `texts` replace EVAL_TEXTS;
    `bounds` override entries of BOUNDS (None: report without a bound); `reference` reuses a
    reference_for() result. A missed bound raises EdgedistillError unless `raise_on_failure` is
    False; the result's `passed` and `failures` say it either way.
    """
    export_dir = Path(export_dir)
    precision = precision or _export_precision(export_dir)
    if precision not in ONNX_PRECISIONS:
        raise EdgedistillError(f"unknown ONNX precision {precision!r}", f"use one of {', '.join(ONNX_PRECISIONS)}")
    ref = reference or reference_for(reference_hf_dir, texts)
    bound = {**BOUNDS, **(bounds or {})}.get(precision)
    result = _score(export_dir, precision, ref, bound, threads)
    failures = _check(result)
    result.update(failures=failures, passed=not failures)
    if raise_on_failure:
        raise_if_failed([result])
    return result


def raise_if_failed(results: list[dict]) -> None:
    verify.raise_if_failed(results, _fix)


COLUMNS = [
    Column("export", "<28", lambda r: Path(r["file"]).name),
    Column("type", "<5", lambda r: r["file_type"]),
    Column("top-1", ">7.4f", lambda r: r["top1_agreement"]),
    Column("mean KL", ">9.5f", lambda r: r["mean_kl"]),
    Column("max dlogp", ">9.2g", lambda r: r["max_abs_logprob_diff"]),
    Column("PPL torch", ">10.5g", lambda r: r["perplexity_torch"]),
    Column("PPL onnx", ">9.5g", lambda r: r["perplexity_onnx"]),
    Column("ratio", ">7.4f", lambda r: r["perplexity_ratio"]),
    Column("greedy", ">9", lambda r: r["greedy_verdict"]),
    Column("tokens", ">6", lambda r: "same" if r["tokenization_identical"] else "DIFF"),
]


def format_verification(results: list[dict]) -> str:
    """A table, one row per export, with the verdict against its bound."""
    return verify.format_verification(results, COLUMNS)
