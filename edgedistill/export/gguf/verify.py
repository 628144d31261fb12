"""Check a GGUF file in llama.cpp against the PyTorch model it was exported from.

    edgedistill verify-export runs/tiny/export/student-q4_k_m.gguf --reference runs/tiny/distill
    python -c "from edgedistill.export.gguf.verify import verify_gguf; print(verify_gguf('m.gguf', 'runs/tiny/distill'))"

Both runtimes score the same token ids (the reference folder's HF tokenizer; whether llama.cpp
tokenizes the texts the same way is checked and reported) over every position of a few fixed
texts, with full-vocabulary log-probs: PyTorch in float32, llama.cpp as a user of the file runs it.
Reported: top-1 agreement, mean KL(PyTorch || GGUF) per position, the perplexity of each and their
ratio, and greedy continuations of fixed prompts in both. The file's type (general.file_type)
picks its bound in BOUNDS; a file beyond its bound raises EdgedistillError.

Near ties. Two runtimes that differ by rounding can pick different argmaxes where the two best
logits are nearly equal; that says nothing about the file. So a position where the argmaxes differ
but PyTorch's logit for the GGUF's choice is within the type's `tie_margin` of PyTorch's best is a
near tie: it is reported (`top1_near_ties`), and `top1_agreement_with_ties` (the bounded figure) counts
it as agreeing. Greedy continuations are compared token by token; at the first difference the
prefixes are equal, and the same margin decides between "tie" (passes; the two texts then diverge
and nothing after is comparable) and "differs" (fails).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.scoring import Agreement

# Varied prose, dialogue, numbers and code: about 330 tokens with the SmolLM2 tokenizer, so a
# 10-layer student is checked in seconds on two cores.
EVAL_TEXTS: tuple[str, ...] = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each of the 112 steps "
    "out loud, as his father had done before him.",
    "To make a simple bread, mix 500 grams of flour with 350 ml of warm water, a teaspoon of salt and "
    "a little yeast, then let the dough rest for two hours.",
    "\"Are you sure this is the right train?\" she asked. He checked the ticket again and shrugged: "
    "\"Platform nine, 10:45, it says so right here.\"",
    "def mean(values):\n    if not values:\n        raise ValueError(\"empty input\")\n"
    "    return sum(values) / len(values)\n",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water "
    "and release oxygen as a by-product.",
    "for (int i = 0; i < n; ++i) {\n    total += prices[i] * quantities[i];\n}\n",
    "The committee will meet on Tuesday to review the budget, and a final decision is expected by the "
    "end of the month.",
    "I really enjoyed this film: the acting was superb, although the ending felt a little rushed.",
)
GREEDY_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
)
GREEDY_TOKENS = 16
# Longer texts are cut: tiny test models have short position tables and small vocabularies that
# spend several tokens per word.
MAX_TOKENS_PER_TEXT = 128


@dataclass(frozen=True)
class Bound:
    """What a GGUF of one type must reach against its full-precision model; None: not checked."""

    min_top1_agreement: float | None = None
    greedy_identical: bool = False
    max_ppl_ratio: float | None = None
    max_mean_kl: float | None = None
    # Near ties (see the module's docstring), in log-prob: a few times the largest difference at
    # PyTorch's top token measured on SmolLM2 and its 10-layer student (F16 0.013, BF16 0.08; a
    # top-2 pair can move by twice that, in opposite directions).
    tie_margin: float = 0.05


# Quantized types: llama.cpp's own quantizer on the embedded teacher (SmolLM2-135M), the default
# run's 10-layer student and the tiny recipe's random 4-layer teachers (seeds 0-3, worst shown),
# scored on EVAL_TEXTS, mean KL / perplexity ratio:
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
BOUNDS: dict[str, Bound] = {
    "F32": Bound(min_top1_agreement=0.99, greedy_identical=True),
    "F16": Bound(min_top1_agreement=0.99, greedy_identical=True),
    "BF16": Bound(min_top1_agreement=0.99, greedy_identical=True, tie_margin=0.2),
    "Q8_0": Bound(max_ppl_ratio=1.03, max_mean_kl=0.015),
    "Q6_K": Bound(max_ppl_ratio=1.05, max_mean_kl=0.05),
    "Q5_K_M": Bound(max_ppl_ratio=1.3, max_mean_kl=0.3),
    "Q4_K_M": Bound(max_ppl_ratio=1.3, max_mean_kl=0.25),
    "Q4_0": Bound(max_ppl_ratio=1.3, max_mean_kl=1.0),
}
# From more to less precise: what to suggest when a type misses its bound.
PRECISION_ORDER = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")


@dataclass
class Reference:
    """What PyTorch says about the fixed texts and prompts, computed once for any number of files."""

    folder: Path
    tokenizer: object
    texts: list[str]
    text_ids: list[list[int]]
    logprobs: list[torch.Tensor]  # per text, [positions, vocab]; float32 keeps a 262k vocabulary in bounds
    prompts: list[list[int]]
    greedy: list[list[int]]
    greedy_logits: list[torch.Tensor]  # per prompt, [GREEDY_TOKENS, vocab]: the logits each token was picked from


def reference(folder: Path, texts: list[str]) -> Reference:
    from transformers import AutoTokenizer

    from edgedistill.runtimes.pytorch import load_model

    if not (folder / "config.json").is_file():
        raise EdgedistillError(f"{folder} is not an HF model folder (no config.json)",
                               "pass the folder the GGUF was exported from (a teacher, distill or merge stage folder)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder)
    text_ids = [tokenizer(text).input_ids[:MAX_TOKENS_PER_TEXT] for text in texts]
    text_ids = [ids for ids in text_ids if len(ids) >= 2]
    if not text_ids:
        raise EdgedistillError("no evaluation text has two or more tokens", "pass longer texts")
    prompts = [tokenizer(prompt).input_ids for prompt in GREEDY_PROMPTS]
    with torch.inference_mode():
        logprobs = [torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).float() for ids in text_ids]
        greedy, greedy_logits = [], []
        for prompt in prompts:
            out = model(torch.tensor([prompt]), use_cache=True)
            tokens, steps = [], []
            for step in range(GREEDY_TOKENS):
                logits = out.logits[0, -1]
                tokens.append(int(logits.argmax()))
                steps.append(logits)
                if step < GREEDY_TOKENS - 1:
                    out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            greedy.append(tokens)
            greedy_logits.append(torch.stack(steps))
    return Reference(folder, tokenizer, texts, text_ids, logprobs, prompts, greedy, greedy_logits)


def file_type_name(value: int | str | None) -> str:
    """general.file_type as this project names quantizations: 15 → "Q4_K_M", 1 → "F16"."""
    import gguf

    if value is None:
        return "unknown"
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return f"file_type {value}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _load_llama(path: Path, n_ctx: int, threads: int | None, lora: Path | None = None):
    from llama_cpp import Llama

    if not path.is_file():
        raise EdgedistillError(f"{path} does not exist", "pass the path of a .gguf file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise EdgedistillError(f"{path} is not a GGUF file", "pass a .gguf file written by edgedistill export")
    threads = threads or os.cpu_count()
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads,
                     n_threads_batch=threads, n_gpu_layers=0, verbose=False,
                     lora_path=None if lora is None else str(lora))
    except ValueError as err:
        raise EdgedistillError(f"llama.cpp could not load {path}: {err}",
                               "export the file again; it may be truncated or from another llama.cpp") from None


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _tie(torch_logits: torch.Tensor, choice: int, margin: float) -> tuple[float, bool]:
    gap = float(torch_logits.max() - torch_logits[choice])
    return gap, gap <= margin


def score_texts(ref: Reference, logits_for: Callable[[list[int]], np.ndarray], tie_margin: float, name: str,
                where: Path) -> dict:
    """How a runtime's logits over the reference texts (`logits_for(ids)`, [positions, vocab]) agree
    with PyTorch's: top-1 agreement (and near ties), mean KL(PyTorch || runtime) per position, the
    largest log-prob difference, and both perplexities (`perplexity_<name>` for the runtime's).
    The sums are edgedistill.evaluate.scoring.Agreement's, which `edgedistill eval` uses too."""
    agreement = Agreement()
    for ids, torch_lp in zip(ref.text_ids, ref.logprobs):
        logits = np.asarray(logits_for(ids))
        if logits.shape != tuple(torch_lp.shape):
            raise EdgedistillError(f"{where} gives logits of shape {tuple(logits.shape)} where {ref.folder} gives "
                                   f"{tuple(torch_lp.shape)}", "pass the HF folder it was exported from as the reference")
        agreement.add(torch_lp.numpy(), logits, ids[1:], tie_margin=tie_margin)
    return {
        "texts": len(ref.text_ids),
        "positions": agreement.positions,
        "top1_agreement": agreement.top1_agreement,
        "top1_near_ties": agreement.near_ties,
        "top1_agreement_with_ties": (agreement.agree + agreement.near_ties) / agreement.positions,
        "mean_kl": agreement.mean_kl,
        "max_abs_logprob_diff": agreement.max_abs_logprob_diff,
        "perplexity_torch": agreement.perplexity_reference,
        f"perplexity_{name}": agreement.perplexity_other,
        "perplexity_ratio": agreement.perplexity_other / agreement.perplexity_reference,
    }


def compare_greedy(ref: Reference, greedy_for: Callable[[list[int]], list[int]], tie_margin: float, name: str) -> dict:
    """A runtime's greedy continuations of the reference prompts (`greedy_for(prompt)`, up to
    GREEDY_TOKENS ids) against PyTorch's, each "identical", "tie" or "differs" at its first difference."""
    continuations = []
    for prompt, expected, steps in zip(ref.prompts, ref.greedy, ref.greedy_logits):
        # may stop early at an end token, which PyTorch then chose too (or the first difference is there)
        got = list(greedy_for(prompt))
        first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
        entry = {"prompt": ref.tokenizer.decode(prompt), "torch": ref.tokenizer.decode(expected),
                 name: ref.tokenizer.decode(got), "first_difference": first, "verdict": "identical"}
        if first is not None:
            gap, tie = _tie(steps[first], got[first], tie_margin)
            entry.update(torch_logit_gap=round(gap, 4), verdict="tie" if tie else "differs")
        continuations.append(entry)
    verdicts = {c["verdict"] for c in continuations}
    return {"greedy_tokens": GREEDY_TOKENS, "greedy": continuations,
            "greedy_verdict": "differs" if "differs" in verdicts else "tie" if "tie" in verdicts else "identical"}


def _score(path: Path, ref: Reference, threads: int | None, table: dict[str, Bound | None],
           lora: Path | None = None) -> dict:
    n_ctx = max(len(ids) for ids in [*ref.text_ids, *ref.prompts]) + GREEDY_TOKENS
    llm = _load_llama(path, max(n_ctx, 64), threads, lora)
    try:
        result = _score_loaded(llm, path, ref, table)
        return result if lora is None else {**result, "lora": str(lora)}
    finally:
        llm.close()


def _score_loaded(llm, path: Path, ref: Reference, table: dict[str, Bound | None]) -> dict:
    if llm.n_vocab() != ref.logprobs[0].shape[-1]:
        raise EdgedistillError(
            f"{path} has {llm.n_vocab()} tokens but {ref.folder} has {ref.logprobs[0].shape[-1]}",
            "pass the HF folder this GGUF was exported from as the reference")
    file_type = file_type_name(llm.metadata.get("general.file_type"))
    bound = table.get(file_type)
    tie_margin = (bound or Bound()).tie_margin

    differing = [text for text in ref.texts
                 if llm.tokenize(text.encode(), add_bos=False, special=True)
                 != ref.tokenizer(text, add_special_tokens=False).input_ids]

    def greedy(prompt: list[int]) -> list[int]:
        got = [int(_llama_logits(llm, prompt)[-1].argmax())]
        for _ in range(GREEDY_TOKENS - 1):
            llm.eval([got[-1]])
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return got

    return {
        "file": str(path),
        "file_type": file_type,
        "reference": str(ref.folder),
        "tokenization_identical": not differing,
        "texts_tokenized_differently": differing,
        **score_texts(ref, lambda ids: _llama_logits(llm, ids), tie_margin, "gguf", path),
        **compare_greedy(ref, greedy, tie_margin, "gguf"),
        "tie_margin": tie_margin,
        "bound": asdict(bound) if bound is not None else None,
    }


def bound_failures(result: dict) -> list[str]:
    """One line per missed bound of a result (GGUF or ONNX), naming the measured value and the bound."""
    if result["bound"] is None:
        return []
    bound = Bound(**result["bound"])
    failures = []
    if bound.min_top1_agreement is not None and result["top1_agreement_with_ties"] < bound.min_top1_agreement:
        failures.append(f"top-1 agreement {result['top1_agreement_with_ties']:.4f} < {bound.min_top1_agreement} "
                        f"(near ties counted as agreeing)")
    if bound.greedy_identical and result["greedy_verdict"] == "differs":
        bad = next(c for c in result["greedy"] if c["verdict"] == "differs")
        failures.append(f"greedy continuation of {bad['prompt']!r} differs at token {bad['first_difference']} "
                        f"(PyTorch's logit gap {bad['torch_logit_gap']} > tie margin {result['tie_margin']})")
    if bound.max_ppl_ratio is not None and result["perplexity_ratio"] > bound.max_ppl_ratio:
        failures.append(f"perplexity ratio {result['perplexity_ratio']:.4f} > {bound.max_ppl_ratio}")
    if bound.max_mean_kl is not None and result["mean_kl"] > bound.max_mean_kl:
        failures.append(f"mean KL {result['mean_kl']:.4f} > {bound.max_mean_kl}")
    return failures


def _fix(file_type: str) -> str:
    if file_type in ("F32", "F16"):
        return ("a full-precision file should match PyTorch: the conversion is wrong (tensor map, rotary "
                "layout, tokenizer) or the reference is not the folder the file was exported from")
    if file_type in PRECISION_ORDER:
        higher = PRECISION_ORDER[PRECISION_ORDER.index(file_type) - 1]
        return (f"export a higher-precision type, e.g. {higher} instead of {file_type} (export.quants or "
                "export.teacher_quants in a recipe, --quant for edgedistill export)")
    return "export a higher-precision type"


def verify_ggufs(gguf_paths: list[Path], reference_hf_dir: Path, *, texts: list[str] | None = None,
                 bounds: dict[str, Bound | None] | None = None, threads: int | None = None,
                 raise_on_failure: bool = True, lora: Path | None = None) -> list[dict]:
    """verify_gguf for several files against one reference, which PyTorch then scores only once."""
    reference_hf_dir = Path(reference_hf_dir)
    table = {**BOUNDS, **(bounds or {})}
    ref = reference(reference_hf_dir, list(texts) if texts else list(EVAL_TEXTS))
    results = []
    for path in gguf_paths:
        result = _score(Path(path), ref, threads, table, lora)
        failures = bound_failures(result)
        result.update(failures=failures, passed=not failures)
        results.append(result)
    if raise_on_failure:
        raise_if_failed(results)
    return results


def verify_gguf(gguf_path: Path, reference_hf_dir: Path, *, texts: list[str] | None = None,
                bounds: dict[str, Bound | None] | None = None, threads: int | None = None,
                raise_on_failure: bool = True, lora: Path | None = None) -> dict:
    """Compare the GGUF at `gguf_path` in llama.cpp with the HF folder `reference_hf_dir` in PyTorch.

    `texts` replace EVAL_TEXTS (e.g. a task's held-out prompts); `bounds` override entries of
    BOUNDS by file type (None: report without a bound). A missed bound raises EdgedistillError
    unless `raise_on_failure` is False; the result's `passed` and `failures` say it either way.
    `lora`: a GGUF LoRA adapter llama.cpp applies to the file at load; the reference is then the
    merged model.
    """
    return verify_ggufs([gguf_path], reference_hf_dir, texts=texts, bounds=bounds, threads=threads,
                        raise_on_failure=raise_on_failure, lora=lora)[0]


def raise_if_failed(results: list[dict]) -> None:
    failed = [r for r in results if not r["passed"]]
    if failed:
        raise EdgedistillError(
            "; ".join(f"{r['file']} ({r['file_type']}) misses its bound against {r['reference']}: "
                      + ", ".join(r["failures"]) for r in failed),
            _fix(failed[0]["file_type"]))


def format_verification(results: list[dict]) -> str:
    """A table, one row per file, with the bound each figure is held to."""
    lines = [f"{'file':<28} {'type':<7} {'top-1':>7} {'ties':>5} {'mean KL':>9} {'PPL torch':>10} "
             f"{'PPL gguf':>9} {'ratio':>7} {'greedy':>9}  verdict"]
    for r in results:
        verdict = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
        if r["bound"] is None:
            verdict = f"no bound for {r['file_type']} (reported only)"
        lines.append(f"{Path(r['file']).name:<28} {r['file_type']:<7} {r['top1_agreement']:>7.4f} "
                     f"{r['top1_near_ties']:>5} {r['mean_kl']:>9.5f} {r['perplexity_torch']:>10.5g} "
                     f"{r['perplexity_gguf']:>9.5g} {r['perplexity_ratio']:>7.4f} {r['greedy_verdict']:>9}  {verdict}")
        if not r["tokenization_identical"]:
            lines.append(f"  note: llama.cpp tokenizes {len(r['texts_tokenized_differently'])} text(s) differently "
                         "from the HF tokenizer; both were scored on the HF token ids")
    return "\n".join(lines)
