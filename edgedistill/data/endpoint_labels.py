"""Soft labels from a teacher behind an inference engine: the OpenAI API's top_logprobs of its answer tokens.

    # recipe: teacher: {source: endpoint, tokenizer: served-model-folder}
    #         generate: {endpoint: {url: http://127.0.0.1:8000/v1}}
    edgedistill run recipe.yaml --out runs/remote --to distill

With an endpoint teacher (edgedistill.sources.endpoint) the generate stage asks for each answer
token's top ENDPOINT_TOPK alternatives (`logprobs: true, top_logprobs: 20`, which vLLM and
llama.cpp's servers give) and keeps them in generate/teacher_tokens.jsonl; the logits stage turns
them into the same sharded cache the local teacher writes (edgedistill.data.logits), so the
distill stage cannot tell the two apart. What differs:

- Only the answer positions carry the teacher's distribution: a chat endpoint gives no log-probs
  for the prompt. The cache says so (`soft_label_positions: "answer"`), and distill then applies the
  divergence to the answer positions whatever distill.kl_positions says. The row that predicts the
  final eos, and every prompt row, hold the actual next token with log-prob 0 (a hard label).
- Servers name tokens differently: llama.cpp's server by id, OpenAI and vLLM by bytes, and
  llama-cpp-python's server by text alone (partial UTF-8 dropped). TokenTable maps each form to
  the local tokenizer's ids; an alternative that maps to no id, or to several, is left out of its
  row (counted), and the row keeps the top ENDPOINT_TOPK of what is left.
- The answer's tokens are the teacher's own (as generated, which may differ from how the local
  tokenizer would split the same text); an answer whose tokens do not line up with the stored
  answer text (a server that rewrote it) is trained on with hard labels only, and counted.
- The endpoint must run the tokenizer the recipe names: when too few generated tokens map to the
  local vocabulary, or too few answers re-tokenize to the ids the server generated, the stage
  stops before writing anything (EdgedistillError): soft labels over another vocabulary would
  teach wrong ids without a word. Response distillation (distill.kl_weight: 0) needs no match.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgedistill.data.logits import (CACHE_FORMAT, _shard_tensors, teacher_identity, tokenize_example,
                                     tokenizer_identity)
from edgedistill.data.prompts import read_jsonl
from edgedistill.errors import EdgedistillError
from edgedistill.layout import LOGITS_META, TEACHER_TOKENS_JSONL, TRAIN_JSONL, logits_shard_name
from edgedistill.recipe import Recipe
from edgedistill.runtimes.pytorch import load_tokenizer

# The OpenAI API's limit on top_logprobs; vLLM and llama.cpp's servers accept it.
ENDPOINT_TOPK = 20
# Log-prob of the filler ids that pad a row to k: finite, so the divergences stay finite, and
# far below the float32 eps floor of the losses' tail, so they carry no mass.
FILLER_LOGPROB = -1e4
# Texts the server's tokenizer must split as the local one does (check_endpoint_tokenizer): words,
# digits, whitespace runs, accents, CJK, emoji.
PROBE_TEXTS = ("Hello world", "The capital of France is Paris.", "  two  spaces\nand a line\t tab",
               "numbers 12345 and 3.14", "naïve café, Größe, ñandú", "東京は日本の首都です。", "emoji 🚀🎉 ok")
# Without a tokenize route the check falls back to this share of generated tokens that must name
# a local token.
MIN_MAPPED_TOKENS = 0.95
MISMATCH_HINT = ("set teacher.tokenizer to the tokenizer of the model the endpoint serves (its HF folder or GGUF), "
                 "or set distill.kl_weight: 0 to learn from the endpoint's answers alone (response distillation, "
                 "which needs no shared tokenizer)")


def _byte_decoder() -> dict[str, int]:
    """How byte-level BPE tokens spell bytes: GPT-2's byte-to-printable-character table, inverted."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenTable:
    """The local tokenizer's ids by what a server may call a token: an id, its bytes, or its text."""

    def __init__(self, tokenizer):
        self.vocab_size = len(tokenizer)
        byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
        decoder = _byte_decoder() if byte_level else None
        self.bytes_of: list[bytes] = []
        by_bytes: dict[bytes, list[int]] = {}
        by_text: dict[str, list[int]] = {}
        special = set(tokenizer.all_special_ids)
        for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))):
            raw = self._piece_bytes(piece or "", decoder) if token_id not in special else (piece or "").encode()
            self.bytes_of.append(raw)
            by_bytes.setdefault(raw, []).append(token_id)
            texts = {tokenizer.decode([token_id], clean_up_tokenization_spaces=False)}
            try:
                texts.add(raw.decode("utf-8"))
            except UnicodeDecodeError:
                pass  # a partial character: servers that send text alone cannot name it
            for text in texts:
                if text and "\ufffd" not in text:
                    by_text.setdefault(text, []).append(token_id)
        # a name that fits several ids names none of them for sure
        self.by_bytes = {key: ids[0] for key, ids in by_bytes.items() if len(ids) == 1 and key}
        self.by_text = {key: ids[0] for key, ids in by_text.items() if len(set(ids)) == 1}

    @staticmethod
    def _piece_bytes(piece: str, decoder: dict[str, int] | None) -> bytes:
        if decoder is not None and all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")

    def id_of(self, entry: dict) -> int | None:
        """The local id of a server's token entry ({"token", "bytes"?, "id"?}), or None."""
        if isinstance(entry.get("id"), int):
            return entry["id"] if 0 <= entry["id"] < self.vocab_size else None
        token = entry.get("token", "")
        if token.startswith("token_id:") and token[9:].isdigit():  # vLLM's return_tokens_as_token_ids
            found = int(token[9:])
            return found if found < self.vocab_size else None
        if entry.get("bytes"):
            return self.by_bytes.get(bytes(entry["bytes"]))
        return self.by_text.get(token)


def align_answer(tokens: list[dict], answer: str, table: TokenTable) -> tuple[list[int], list[dict]] | None:
    """(the answer's ids as the teacher generated them, their entries) for the generated `tokens`
    that spell `answer` (the stored answer: stripped, end-of-turn text removed), or None.

    The tokens are the teacher's own: a first token that carries the space the stored answer was
    stripped of (" Paris") is kept whole, as is a last one with trailing whitespace; a token that
    straddles the answer's edge with anything else does not line up."""
    ids = [table.id_of(token) for token in tokens]
    if any(i is None for i in ids):
        return None
    starts, ends, total = [], [], 0
    for token_id in ids:
        starts.append(total)
        total += len(table.bytes_of[token_id])
        ends.append(total)
    spelled = b"".join(table.bytes_of[i] for i in ids)
    wanted = answer.encode("utf-8")
    start = spelled.find(wanted)  # the first: what comes before it is whitespace the answer lost
    if not wanted or start < 0:
        return None
    stop = start + len(wanted)
    first = max(j for j, begin in enumerate(starts) if begin <= start)
    last = min(j for j, end in enumerate(ends) if end >= stop)
    if spelled[starts[first]:start].strip() or spelled[stop:ends[last]].strip():
        return None
    return ids[first:last + 1], tokens[first:last + 1]


def spelled_text(ids: list[int], table: TokenTable) -> str:
    return b"".join(table.bytes_of[i] for i in ids).decode("utf-8", errors="replace")


def _row(entry: dict, table: TokenTable, k: int, counts: Counter) -> tuple[list[int], list[float]]:
    """One position's top-k ids and log-probs from a token entry's alternatives, padded with fillers."""
    best: dict[int, float] = {}
    for alternative in entry["top"]:
        token_id = table.id_of(alternative)
        counts["alternatives"] += 1
        if token_id is None:
            counts["alternatives_unmapped"] += 1
            continue
        best[token_id] = max(best.get(token_id, alternative["logprob"]), alternative["logprob"])
    ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
    return _padded([i for i, _ in ranked], [lp for _, lp in ranked], k)


def _padded(ids: list[int], logprobs: list[float], k: int) -> tuple[list[int], list[float]]:
    taken, filler = set(ids), 0
    while len(ids) < k:
        while filler in taken:
            filler += 1
        ids.append(filler)
        logprobs.append(FILLER_LOGPROB)
        taken.add(filler)
    return ids, logprobs


def _hard(target: int, k: int) -> tuple[list[int], list[float]]:
    return _padded([target], [0.0], k)


def read_teacher_tokens(generate: Path) -> dict[tuple[int, int], list[dict]]:
    path = generate / TEACHER_TOKENS_JSONL
    if not path.is_file():
        raise EdgedistillError(f"{path} is missing: the generate stage did not keep the endpoint's log-probs",
                               "run the generate stage again with this version: edgedistill run RECIPE --from generate")
    return {(row["id"], row.get("sample", 0)): row["tokens"] for row in read_jsonl(path)}


def cache_endpoint_logits(recipe: Recipe, out: Path, *, teacher: Path, generate: Path) -> dict:
    """The logits stage for an endpoint teacher: the cache of edgedistill.data.logits from the
    endpoint's top log-probs (module docstring)."""
    tokenizer = load_tokenizer(teacher)
    table = TokenTable(tokenizer)
    k, max_len, per_shard = min(recipe.distill.topk, ENDPOINT_TOPK), recipe.distill.max_seq_len, \
        recipe.distill.shard_examples
    teacher_tokens = read_teacher_tokens(generate)
    counts: Counter = Counter()
    examples, topk_ids, topk_logprobs, skipped = [], [], [], 0
    for row in read_jsonl(generate / TRAIN_JSONL):
        tokenized = tokenize_example(tokenizer, row["messages"], max_len)
        if tokenized is None:
            skipped += 1
            continue
        prompt = tokenized[0][:tokenized[1]]
        answer = row["messages"][-1]["content"]
        # a reasoning run's "label" row pairs the plain prompt with the final answer the teacher
        # wrote after a trace: its log-probs were for another context, so it gets hard labels
        tokens = teacher_tokens.get((row["id"], row.get("sample", 0))) if row.get("task") != "label" else None
        counts["generated_tokens"] += len(tokens or [])
        counts["generated_tokens_unmapped"] += sum(table.id_of(t) is None for t in tokens or [])
        aligned = align_answer(tokens, answer, table) if tokens else None
        if aligned is not None:
            answer_ids, entries = aligned
            counts["answers_aligned"] += 1
            # a model may generate a split its tokenizer would not make, rarely; another tokenizer almost always
            counts["answers_canonical"] += tokenizer.encode(spelled_text(answer_ids, table),
                                                            add_special_tokens=False) == answer_ids
        else:
            answer_ids, entries = tokenizer.encode(answer, add_special_tokens=False), []
            counts["answers_hard_labels"] += 1
        seq = (prompt + answer_ids + [tokenizer.eos_token_id])[:max_len]
        rows = [_hard(seq[p + 1], k) for p in range(len(seq) - 1)]
        for j, entry in enumerate(entries):
            position = len(prompt) - 1 + j  # the position whose next token is answer token j
            if position < len(rows):
                rows[position] = _row(entry, table, k, counts)
                counts["soft_label_rows"] += 1
        examples.append((seq, len(prompt)))
        topk_ids.append(torch.tensor([ids for ids, _ in rows], dtype=torch.int32).reshape(-1, k))
        topk_logprobs.append(torch.tensor([lps for _, lps in rows], dtype=torch.float32).reshape(-1, k))
    _check_tokenizer(counts)
    starts = list(range(0, len(examples), per_shard)) or [0]
    for index, start in enumerate(starts):
        chunk = slice(start, start + per_shard)
        aside = out / f"{logits_shard_name(index)}.writing"
        save_file(_shard_tensors(examples[chunk], topk_ids[chunk], topk_logprobs[chunk], k), str(aside))
        os.rename(aside, out / logits_shard_name(index))
    lengths = [len(seq) for seq, _ in examples]
    endpoint = {key: counts[key] for key in ("generated_tokens", "generated_tokens_unmapped", "answers_aligned",
                                             "answers_canonical", "answers_hard_labels", "soft_label_rows",
                                             "alternatives", "alternatives_unmapped")}
    meta = {"format": CACHE_FORMAT, "topk": k, "max_seq_len": max_len, "vocab_size": len(tokenizer),
            "examples": len(examples), "tokens": sum(lengths),
            "answer_tokens": sum(len(seq) - p for seq, p in examples), "skipped_too_long": skipped,
            "tokenizer_sha256": tokenizer_identity(teacher), "teacher_sha256": teacher_identity(teacher),
            "source": "endpoint", "soft_label_positions": "answer", "endpoint": endpoint,
            "shards": [{"file": logits_shard_name(i), "examples": len(examples[s:s + per_shard])}
                       for i, s in enumerate(starts)]}
    (out / LOGITS_META).write_text(json.dumps(meta, indent=2) + "\n")
    return {key: value for key, value in meta.items() if key != "shards"} | {"shards": len(starts)}


def _check_tokenizer(counts: Counter) -> None:
    generated, unmapped = counts["generated_tokens"], counts["generated_tokens_unmapped"]
    if generated and (generated - unmapped) < MIN_MAPPED_TOKENS * generated:
        raise EdgedistillError(
            f"the endpoint's tokenizer is not teacher.tokenizer's: {unmapped} of the {generated} tokens it generated "
            "name no token of the local vocabulary", MISMATCH_HINT)


def check_endpoint_tokenizer(endpoint, teacher: Path) -> str:
    """Whether the server splits PROBE_TEXTS into the ids teacher.tokenizer gives (EdgedistillError
    if not), before any answer is asked for: "same ids", or "unchecked" for a server without a
    tokenize route (the logits stage then checks the generated tokens' names)."""
    from edgedistill.data.remote import endpoint_token_ids

    tokenizer = load_tokenizer(teacher)
    for text in PROBE_TEXTS:
        served = endpoint_token_ids(endpoint, text)
        if served is None:
            return "unchecked (the server has no tokenize route)"
        local = tokenizer.encode(text, add_special_tokens=False)
        if tokenizer.bos_token_id is not None and served[:1] == [tokenizer.bos_token_id] and local[:1] != served[:1]:
            served = served[1:]  # the server's own BOS, added as its tokenizer config says
        if served != local:
            raise EdgedistillError(f"the endpoint's tokenizer is not teacher.tokenizer's: it splits {text!r} into "
                                   f"{served[:12]}, teacher.tokenizer into {local[:12]}", MISMATCH_HINT)
    return "same ids"
