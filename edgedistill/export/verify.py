"""What every export check shares, whatever the format: the fixed texts, PyTorch's reference view of
them, the scoring loop, the bounds, the verdict table and the error.

    python -c "from edgedistill.export.verify import EVAL_TEXTS; print(len(EVAL_TEXTS))"

A format's verifier (edgedistill.export.gguf.verify, edgedistill.export.onnx.verify) only loads the
artifact in its runtime and hands over two functions: logits for token ids, and a greedy
continuation. Both runtimes then score the same token ids (the reference folder's HF tokenizer)
over every position of the texts, with full-vocabulary log-probs: top-1 agreement, mean
KL(PyTorch || export) per position, both perplexities and their ratio, and greedy continuations
of fixed prompts. The sums are Agreement's, which `edgedistill eval` uses too.

Near ties. Two runtimes that differ by rounding can pick different argmaxes where the two best
logits are nearly equal; that says nothing about the file. So a position where the argmaxes differ
but PyTorch's logit for the export's choice is within the bound's `tie_margin` of PyTorch's best is
a near tie: it is reported (`top1_near_ties`), and `top1_agreement_with_ties` (the bounded figure)
counts it as agreeing. Greedy continuations are compared token by token; at the first difference
the prefixes are equal, and the same margin decides between "tie" (passes; the two texts then
diverge and nothing after is comparable) and "differs" (fails).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgedistill import layout
from edgedistill.errors import EdgedistillError
from edgedistill.formats import Bound
from edgedistill.runtimes.common import log_softmax

if TYPE_CHECKING:
    import torch

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


@dataclass
class Agreement:
    """Running sums over positions where a runtime and a reference predict the next token."""

    positions: int = 0
    agree: int = 0
    near_ties: int = 0
    max_abs_logprob_diff: float = 0.0
    targets: int = 0
    nll_reference: float = 0.0
    nll_other: float = 0.0
    # per add() (a record or a text): its KL sum and positions; the mean KL, and its bootstrap
    # interval (edgedistill.evaluate.scoring.kl_interval), come from these
    record_kl: list[float] = field(default_factory=list)
    record_positions: list[int] = field(default_factory=list)

    def add(self, reference: np.ndarray, other: np.ndarray, targets: list[int] | np.ndarray = (), *,
            tie_margin: float = 0.0) -> None:
        """`reference`: [positions, vocab] log-probs; `other`: the runtime's logits or log-probs at the
        same positions (normalized here, in float64); `targets`: the ids that follow the first
        len(targets) positions, for the perplexities. A position where the argmaxes differ but the
        reference's log-prob of the runtime's choice is within `tie_margin` of its best is a near tie."""
        reference = np.asarray(reference, dtype=np.float64)
        other = log_softmax(other, np.float64)
        rows = np.arange(len(reference))
        top_reference, top_other = reference.argmax(-1), other.argmax(-1)
        same = top_reference == top_other
        gap = reference[rows, top_reference] - reference[rows, top_other]
        self.positions += len(reference)
        self.agree += int(same.sum())
        self.near_ties += int((~same & (gap <= tie_margin)).sum())
        self.record_kl.append(float((np.exp(reference) * (reference - other)).sum()))
        self.record_positions.append(len(reference))
        self.max_abs_logprob_diff = max(self.max_abs_logprob_diff, float(np.abs(reference - other).max()))
        targets = np.asarray(targets, dtype=np.int64)
        scored = np.arange(len(targets))
        self.targets += len(targets)
        self.nll_reference -= float(reference[scored, targets].sum())
        self.nll_other -= float(other[scored, targets].sum())

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.positions

    @property
    def mean_kl(self) -> float:
        return sum(self.record_kl) / self.positions

    @property
    def perplexity_reference(self) -> float:
        return math.exp(self.nll_reference / self.targets)

    @property
    def perplexity_other(self) -> float:
        return math.exp(self.nll_other / self.targets)


@dataclass
class Reference:
    """What PyTorch says about the fixed texts and prompts, computed once for any number of exports."""

    folder: Path
    tokenizer: object
    texts: list[str]
    text_ids: list[list[int]]
    logprobs: list[torch.Tensor]  # per text, [positions, vocab]; float32 keeps a 262k vocabulary in bounds
    prompts: list[list[int]]
    greedy: list[list[int]]
    greedy_logits: list[torch.Tensor]  # per prompt, [GREEDY_TOKENS, vocab]: the logits each token was picked from


def read_texts(path: Path) -> list[str]:
    """A text file's non-empty lines: the texts `verify-export --texts` scores instead of EVAL_TEXTS."""
    if not path.is_file():
        raise EdgedistillError(f"{path} does not exist", "pass a text file with one text per line")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reference(folder: Path, texts: list[str] | None = None) -> Reference:
    """PyTorch's view of `texts` (default EVAL_TEXTS) and GREEDY_PROMPTS, for the HF folder `folder`."""
    import torch
    from transformers import AutoTokenizer

    from edgedistill.runtimes.pytorch import load_model

    folder = Path(folder)
    texts = list(texts) if texts else list(EVAL_TEXTS)
    if not (folder / layout.HF_CONFIG).is_file():
        raise EdgedistillError(f"{folder} is not an HF model folder (no config.json)",
                               "pass the folder the export was made from (a teacher, distill or merge stage folder)")
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


def score_texts(ref: Reference, logits_for: Callable[[list[int]], np.ndarray], tie_margin: float, name: str,
                where: Path) -> dict:
    """How a runtime's logits over the reference texts (`logits_for(ids)`, [positions, vocab]) agree
    with PyTorch's: top-1 agreement (and near ties), mean KL(PyTorch || runtime) per position, the
    largest log-prob difference, and both perplexities (`perplexity_<name>` for the runtime's)."""
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
            gap = float(steps[first].max() - steps[first][got[first]])
            entry.update(torch_logit_gap=round(gap, 4), verdict="tie" if gap <= tie_margin else "differs")
        continuations.append(entry)
    verdicts = {c["verdict"] for c in continuations}
    return {"greedy_tokens": GREEDY_TOKENS, "greedy": continuations,
            "greedy_verdict": "differs" if "differs" in verdicts else "tie" if "tie" in verdicts else "identical"}


def bound_failures(result: dict) -> list[str]:
    """One line per missed bound of a result (any format), naming the measured value and the bound."""
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


def raise_if_failed(results: list[dict], fix: Callable[[dict], str], separator: str = "; ") -> None:
    """EdgedistillError naming every result that missed its bound and why; `fix(first failed result)`
    is the hint."""
    failed = [r for r in results if not r["passed"]]
    if failed:
        raise EdgedistillError(
            "; ".join(f"{r['file']} ({r['file_type']}) misses its bound against {r['reference']}: "
                      + separator.join(r["failures"]) for r in failed),
            fix(failed[0]))


@dataclass(frozen=True)
class Column:
    """One column of a verification table: its title, a format spec ("<28", ">7.4f"), and its cell."""

    title: str
    spec: str
    value: Callable[[dict], Any]

    @property
    def title_spec(self) -> str:
        return re.match(r"[<>^]?\d*", self.spec)[0]


def format_verification(results: list[dict], columns: list[Column],
                        notes: Callable[[dict], list[str]] = lambda result: []) -> str:
    """A table, one row per export, with its verdict against its bound and `notes` lines under it."""
    lines = [" ".join(format(c.title, c.title_spec) for c in columns) + "  verdict"]
    for r in results:
        verdict = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
        if r["passed"] and r["bound"] is None:
            verdict = f"no bound for {r['file_type']} (reported only)"
        lines.append(" ".join(format(c.value(r), c.spec) for c in columns) + f"  {verdict}")
        lines += notes(r)
    return "\n".join(lines)
