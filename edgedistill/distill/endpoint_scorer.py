"""The teacher's top-k at the student's own tokens, from a teacher served by an inference engine.

    # recipe: teacher: {source: endpoint, tokenizer: served-model-folder}
    #         generate: {endpoint: {url: http://127.0.0.1:8000/v1}}
    #         distill: {on_policy: {fraction: 1.0}}
    edgedistill run recipe.yaml --out runs/remote-on-policy

On-policy distillation (edgedistill.distill.on_policy) needs the teacher's distribution at every
position of an answer the student sampled, text the teacher never wrote. A chat endpoint gives
log-probs only for what it generates itself, so each position is asked as a text completion:
the chat-templated prompt plus the answer so far, as raw text (`/v1/completions`, one greedy
token, `logprobs: k`), and the server's top-k for that one token is the row. This is the one
scoring request that vLLM, llama.cpp's server and llama-cpp-python's server all answer alike
(prompt log-probs through `echo` are not: llama.cpp's server has none, and llama-cpp-python's
shifts them by one position). The positions of one answer go to the server in order, in one
worker, so a server that keeps the last prompt's KV cache (llama.cpp's do) reads only the new
token; answers are spread over generate.endpoint.concurrency workers.

The rows are what the logits stage makes of an endpoint's soft labels (edgedistill.data.
endpoint_labels): the server's alternatives mapped to local ids through TokenTable (one that maps
to none is dropped and counted), at most ENDPOINT_TOPK of them, padded with fillers of no mass.
The text is the local tokenizer's decoding of the student's ids; the server re-tokenizes it, which
gives the same ids for the prompt and for answers a tokenizer would write itself (the stage checks
the server's tokenizer first, as the generate stage does).
"""

from __future__ import annotations

import threading
from collections import Counter
from functools import partial

import torch

from edgedistill.data.endpoint_labels import ENDPOINT_TOPK, TokenTable, _row
from edgedistill.data.remote import BadResponse, completions_url, in_pool, next_token_top, with_retries
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import EndpointConfig

KEPT = "the on_policy stage's finished epochs are kept (checkpoint/): start the server again and rerun to go on"


class EndpointScorer:
    """`scorer(batch)`: the served teacher's top-k ids (int32) and log-probs (float32) at the
    batch's loss rows (`row_mask`, in collate's order), as edgedistill.distill.train.teacher_topk
    gives them from a local teacher; `k` is at most ENDPOINT_TOPK (the OpenAI API's limit)."""

    def __init__(self, endpoint: EndpointConfig, tokenizer, topk: int):
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self.table = TokenTable(tokenizer)
        self.k = min(topk, ENDPOINT_TOPK)
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def _answer_rows(self, sequence: tuple[list[int], list[int]], stop: threading.Event) -> list:
        """The rows of one sequence (ids, positions): the server's next-token top-k after ids[:p + 1] for each p."""
        ids, positions = sequence
        rows = []
        for position in positions:
            prefix = self.tokenizer.decode(ids[:position + 1], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
            found = with_retries(self.endpoint, partial(next_token_top, self.endpoint, prefix, self.k), stop)
            if found is None:
                return []  # stopped: another answer's error is raised
            if isinstance(found, BadResponse):
                raise EdgedistillError(
                    f"the teacher endpoint {completions_url(self.endpoint)} would not score a student's answer "
                    f"({position + 1} tokens): {found}",
                    f"{found.hint}; lower distill.on_policy.max_new_tokens or distill.max_seq_len. {KEPT}")
            counts: Counter = Counter()
            rows.append(_row({"top": found}, self.table, self.k, counts))
            with self._lock:
                self.counts.update(counts)
                self.counts["positions"] += 1
        return rows

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["row_mask"].cpu()
        sequences = [(batch["input_ids"][row].tolist(), torch.nonzero(mask[row]).flatten().tolist())
                     for row in range(mask.shape[0])]
        per_sequence = in_pool(self.endpoint, sequences, self._answer_rows, url=completions_url(self.endpoint),
                               refused="refused to score the student's tokens", down_hint=KEPT, name="teacher-score")
        rows = [row for found in per_sequence for row in found]
        device = batch["input_ids"].device
        return (torch.tensor([ids for ids, _ in rows], dtype=torch.int32, device=device),
                torch.tensor([logprobs for _, logprobs in rows], dtype=torch.float32, device=device))

    def stats(self) -> dict:
        """What the scoring asked and how much of the servers' answers mapped to local ids."""
        return {"positions_scored": self.counts["positions"], "alternatives": self.counts["alternatives"],
                "alternatives_unmapped": self.counts["alternatives_unmapped"], "topk": self.k}
