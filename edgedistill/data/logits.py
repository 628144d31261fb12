"""The logits stage: tokenize the training set once and cache the teacher's top-k log-probs.

    edgedistill run recipes/tiny.yaml --out runs/tiny --from logits

For every position of every training example (prompt and answer), the teacher's `topk` most
likely next tokens and their log-probabilities (at temperature 1, normalized over the full
vocabulary) are stored in `cache.safetensors`, together with the token ids of the examples. The
prompt positions cost little to keep and give the KL term some 30 times more signal than the
few answer tokens of a classification task (distill.kl_positions chooses which are used). The
distill stage trains from this folder alone, so the teacher is never in memory while the student
trains.

Layout of cache.safetensors (flat tensors, one row per token; offsets index them per example):
  input_ids        int32 [total_tokens]        prompt + answer + eos, example after example
  example_offsets  int64 [examples + 1]        where each example starts in input_ids
  prompt_lengths   int32 [examples]            tokens before the answer
  topk_ids         int32 [rows, k]             teacher's top-k next tokens at positions 0 .. len - 2
  topk_logprobs    float32 [rows, k]
  row_offsets      int64 [examples + 1]        where each example starts in topk_* (len - 1 rows)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from edgedistill.data.prompts import read_jsonl
from edgedistill.pipeline import sha256_file
from edgedistill.recipe import Recipe
from edgedistill.runtimes.pytorch import load_model, load_tokenizer

CACHE = "cache.safetensors"


def tokenize_example(tokenizer, messages: list[dict[str, str]], max_seq_len: int) -> tuple[list[int], int] | None:
    """(ids, prompt_length) for prompt + answer + eos, or None when the prompt alone fills the context."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    answer = tokenizer.encode(messages[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(prompt) >= max_seq_len - 1:
        return None
    return (prompt + answer)[:max_seq_len], len(prompt)


@torch.inference_mode()
def cache_teacher_logits(recipe: Recipe, out: Path, *, teacher: Path, generate: Path) -> dict:
    tokenizer = load_tokenizer(teacher)
    model = load_model(teacher, trust_remote_code=recipe.teacher.trust_remote_code)
    k, max_len = recipe.distill.topk, recipe.distill.max_seq_len
    examples, skipped = [], 0
    for row in read_jsonl(generate / "train.jsonl"):
        tokenized = tokenize_example(tokenizer, row["messages"], max_len)
        if tokenized is None:
            skipped += 1
        else:
            examples.append(tokenized)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    topk_ids, topk_logprobs = [None] * len(examples), [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    batch_size = recipe.generate.batch_size
    for start in tqdm(range(0, len(order), batch_size), desc="teacher logits", unit="batch"):
        index = order[start:start + batch_size]
        width = max(len(examples[i][0]) for i in index)
        ids = torch.full((len(index), width), pad, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            seq = examples[i][0]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, i in enumerate(index):
            seq, prompt_len = examples[i]
            # The logits at position t predict token t + 1; the last position predicts nothing.
            values, indices = logprobs[row, :len(seq) - 1].topk(k, dim=-1)
            topk_ids[i], topk_logprobs[i] = indices.to(torch.int32), values

    lengths = [len(seq) for seq, _ in examples]
    save_file({
        "input_ids": torch.tensor([t for seq, _ in examples for t in seq], dtype=torch.int32),
        "example_offsets": torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0),
        "prompt_lengths": torch.tensor([p for _, p in examples], dtype=torch.int32),
        "topk_ids": torch.cat(topk_ids) if examples else torch.zeros((0, k), dtype=torch.int32),
        "topk_logprobs": torch.cat(topk_logprobs) if examples else torch.zeros((0, k)),
        "row_offsets": torch.tensor([0] + [n - 1 for n in lengths], dtype=torch.int64).cumsum(0),
    }, str(out / CACHE))
    meta = {"topk": k, "max_seq_len": max_len, "vocab_size": model.config.vocab_size,
            "examples": len(examples), "tokens": sum(lengths),
            "answer_tokens": sum(len(seq) - p for seq, p in examples), "skipped_too_long": skipped,
            "tokenizer_sha256": sha256_file(teacher / "tokenizer.json")}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
