"""How closely a runtime's next-token distributions follow a reference's on the same token ids:
perplexity, KL(reference || runtime), top-1 agreement. The sums are edgedistill.export.verify's
Agreement, the one implementation for `edgedistill eval` (held-out answers, any two artifacts) and
the export checks (fixed texts, a file against its PyTorch model).

    python -c "from edgedistill.evaluate.scoring import SCORED_TEXT; print(SCORED_TEXT)"

What eval scores. The reference answers the held-out prompts greedily (its task score pass); the
first `score_records` records are then rendered with the reference's chat template, the prompt's
messages plus that answer as the assistant turn, and tokenized once by the reference's tokenizer.
Every artifact scores those same ids in its own runtime (teacher forcing). Scored are the
positions that predict the assistant turn's tokens, from the first one after the generation prompt
through the end-of-turn token (so stopping at the right place counts); the prompt's tokens only
condition. The perplexity of an artifact is exp(mean negative log-likelihood) over those tokens;
KL(reference || artifact) is averaged and the argmaxes compared over the same positions, against
the reference's log-probs there. On its own greedy answer the reference's argmax is the answer
token, so top-1 agreement is the share of the reference's answer tokens the artifact would have
picked itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from edgedistill.errors import EdgedistillError
from edgedistill.evaluate.intervals import Interval, bootstrap_ratio
from edgedistill.export.verify import Agreement
from edgedistill.runtimes import Runtime

SCORED_TEXT = ("the reference's greedy answer to each scored held-out prompt, as the assistant turn of the "
               "reference's chat template (through its end-of-turn token), after the prompt; tokenized once by "
               "the reference and scored teacher-forced in every runtime")


@dataclass
class ScoredRecords:
    """Token ids every runtime scores, and the reference's log-probs at the scored positions."""

    reference: str
    vocab_size: int
    ids: list[list[int]]  # per record: the prompt and the assistant turn through its end token
    answer_tokens: list[int]  # per record: how many of the last ids are scored
    logprobs: list[np.ndarray] = field(default_factory=list)  # per record, [answer_tokens, vocab] float32
    # the first scored prompt and the reference's own ids for it: an artifact must tokenize it alike
    probe: list[dict[str, str]] = field(default_factory=list)
    probe_ids: list[int] = field(default_factory=list)

    @property
    def scored_tokens(self) -> int:
        return sum(self.answer_tokens)


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def kl_interval(agreement: Agreement) -> Interval:
    """The mean KL's 95% bootstrap interval: whole records resampled with their positions (the
    mean is over positions). On a label task a few answers near the decision can carry most of it."""
    return bootstrap_ratio(agreement.record_kl, agreement.record_positions)


def _kl(value: float) -> float:
    # a model scored against itself sums rounding errors of either sign
    return _significant(max(value, 0.0))


def _interval(agreement: Agreement) -> list[float] | None:
    interval = kl_interval(agreement)
    return None if interval.low is None else [_kl(interval.low), _kl(interval.high)]


def conversation_ids(runtime: Runtime, messages: list[dict[str, str]], answer: str) -> tuple[list[int], int]:
    """(ids, scored): the conversation with `answer` as the assistant turn, cut after the turn's end
    token, and how many of its last ids are the answer's (they follow the generation prompt)."""
    prompt = runtime.prompt_ids(messages)
    full = runtime.prompt_ids([*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    # a template may render a past assistant turn unlike the generation prompt (a thinking block):
    # the turn then starts where the two part
    start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    end = next((i + 1 for i in range(start, len(full)) if runtime.is_end(full[i])), len(full))
    return full[:end], end - start


def score_reference(runtime: Runtime, name: str, messages: list[list[dict[str, str]]], answers: list[str]) -> ScoredRecords:
    """The reference's own tokenization and log-probs of its answers (see the module docstring)."""
    records = ScoredRecords(name, runtime.vocab_size, [], [])
    for conversation, answer in zip(messages, answers):
        ids, scored = conversation_ids(runtime, conversation, answer)
        if scored == 0 or scored >= len(ids):
            continue  # a template that renders no assistant turn, or no prompt before it
        records.ids.append(ids)
        records.answer_tokens.append(scored)
        if not records.probe:
            records.probe, records.probe_ids = conversation, runtime.prompt_ids(conversation)
    if not records.ids:
        raise EdgedistillError(f"{name}'s chat template renders no assistant turn after the prompt to score",
                               "use a reference whose chat template renders assistant turns, or --score-records 0")
    for ids, scored in tqdm(list(zip(records.ids, records.answer_tokens)), desc=f"score {name}", unit="record"):
        records.logprobs.append(runtime.score(ids[:-1], last=scored))
    return records


def reference_row(records: ScoredRecords) -> dict:
    """eval.json keys of the reference: its perplexity on its own answers, and how many tokens."""
    agreement = Agreement()
    for ids, scored, logprobs in zip(records.ids, records.answer_tokens, records.logprobs):
        agreement.add(logprobs, logprobs, ids[-scored:])
    return {"perplexity": _significant(agreement.perplexity_reference), "scored_tokens": records.scored_tokens}


def check_vocabulary(runtime: Runtime, name: str, records: ScoredRecords) -> None:
    """Refuses an artifact whose token ids mean other things than the reference's: another vocabulary
    size, or the first scored prompt tokenized (with its own chat template and tokenizer) differently."""
    fix = ("pass as --reference the model this artifact was distilled or exported from (the run's teacher), "
           "or --score-records 0 to report the task score alone")
    if runtime.vocab_size != records.vocab_size:
        raise EdgedistillError(
            f"{name} has a vocabulary of {runtime.vocab_size} tokens and the reference {records.reference} "
            f"{records.vocab_size}: a tokenizer mismatch, so they cannot score the same token ids", fix)
    if records.probe:
        ids = runtime.prompt_ids(records.probe)
        if ids != records.probe_ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, records.probe_ids)) if a != b),
                      min(len(ids), len(records.probe_ids)))
            raise EdgedistillError(
                f"{name} turns the first scored prompt into {len(ids)} token ids and the reference "
                f"{records.reference} into {len(records.probe_ids)}, first differing at position {at}: a "
                "tokenizer (or chat template) mismatch, so they cannot score the same token ids", fix)


def score_against(runtime: Runtime, name: str, records: ScoredRecords) -> dict:
    """eval.json keys of an artifact: perplexity, its ratio to the reference's, mean KL(reference ||
    artifact) and top-1 agreement, over the reference's scored tokens."""
    check_vocabulary(runtime, name, records)
    agreement = Agreement()
    for ids, scored, reference in tqdm(list(zip(records.ids, records.answer_tokens, records.logprobs)),
                                       desc=f"score {name}", unit="record"):
        agreement.add(reference, runtime.score(ids[:-1], last=scored), ids[-scored:])
    return {"perplexity": _significant(agreement.perplexity_other),
            "perplexity_ratio": round(agreement.perplexity_other / agreement.perplexity_reference, 4),
            "kl_to_reference": _kl(agreement.mean_kl),
            "kl_to_reference_interval": _interval(agreement),
            "top1_agreement": round(agreement.top1_agreement, 4),
            "scored_tokens": agreement.targets}
