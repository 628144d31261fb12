"""The logits stage: tokenize the training set once and cache the teacher's top-k log-probs.

    edgedistill run recipes/tiny.yaml --out runs/tiny --from logits

For every position of every training example (prompt and answer), the teacher's `topk` most
likely next tokens and their log-probabilities (at temperature 1, normalized over the full
vocabulary) are stored with the token ids of the examples. The prompt positions cost little to
keep and give the KL term some 30 times more signal than the few answer tokens of a
classification task (distill.kl_positions chooses which are used). The distill stage trains from
this folder alone, so the teacher is never in memory while the student trains.

The cache is sharded: `cache-00000.safetensors`, ... hold `distill.shard_examples` examples each
and are written one at a time, so memory stays at one shard's soft labels and a killed stage
resumes after its last finished shard. Readers memory-map the shards (SoftLabelSet). meta.json
records the tokenizer and the teacher that made the cache (`teacher_sha256`, a hash of the
teacher folder's files); `distill.soft_labels` imports a cache made elsewhere (on a bigger
machine, say) after checking both against this run's teacher.

Layout of one shard (flat tensors, one row per token; offsets index them per example):
  input_ids        int32 [tokens]              prompt + answer + eos, example after example
  example_offsets  int64 [examples + 1]        where each example starts in input_ids
  prompt_lengths   int32 [examples]            tokens before the answer
  topk_ids         int32 [rows, k]             teacher's top-k next tokens at positions 0 .. len - 2
  topk_logprobs    float32 [rows, k]
  row_offsets      int64 [examples + 1]        where each example starts in topk_* (len - 1 rows)
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from edgedistill.data.prompts import read_jsonl
from edgedistill.errors import EdgedistillError
from edgedistill.layout import LOGITS_META, TOKENIZER_JSON, TRAIN_JSONL, logits_shard_name
from edgedistill.pipeline import manifest_digest, read_manifest, sha256_json
from edgedistill.recipe import Recipe
from edgedistill.runtimes.compute import load_on, resolve_compute
from edgedistill.runtimes.pytorch import load_tokenizer

META = LOGITS_META
CACHE_FORMAT = 2
# The parts of tokenizer.json that decide token ids; formatting and key order do not matter.
TOKENIZER_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


def tokenizer_identity(folder: Path) -> str:
    """A hash of what decides a tokenizer's ids, equal for files written differently."""
    try:
        spec = json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgedistillError(f"{folder}/tokenizer.json cannot be read ({exc})",
                               "the model folder needs a fast tokenizer's tokenizer.json") from None
    return sha256_json({part: spec.get(part) for part in TOKENIZER_PARTS})


def teacher_identity(teacher: Path) -> str:
    """The hash of the teacher folder's files, from its stage manifest."""
    manifest = read_manifest(teacher)
    if manifest is None:
        raise EdgedistillError(f"{teacher} has no manifest.json", "run the teacher stage: edgedistill run RECIPE")
    return manifest_digest(manifest)


def tokenize_example(tokenizer, messages: list[dict[str, str]], max_seq_len: int) -> tuple[list[int], int] | None:
    """(ids, prompt_length) for prompt + answer + eos, or None when the prompt alone fills the context."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    answer = tokenizer.encode(messages[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(prompt) >= max_seq_len - 1:
        return None
    return (prompt + answer)[:max_seq_len], len(prompt)


def tokenize_train_set(tokenizer, train_jsonl: Path, max_seq_len: int) -> tuple[list[tuple[list[int], int]], int]:
    """The tokenized training examples and how many were skipped as too long."""
    examples, skipped = [], 0
    for row in read_jsonl(train_jsonl):
        tokenized = tokenize_example(tokenizer, row["messages"], max_seq_len)
        if tokenized is None:
            skipped += 1
        else:
            examples.append(tokenized)
    return examples, skipped


def _shard_tensors(examples: list[tuple[list[int], int]], topk_ids: list, topk_logprobs: list, k: int) -> dict:
    lengths = [len(seq) for seq, _ in examples]
    return {
        "input_ids": torch.tensor([t for seq, _ in examples for t in seq], dtype=torch.int32),
        "example_offsets": torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0),
        "prompt_lengths": torch.tensor([p for _, p in examples], dtype=torch.int32),
        "topk_ids": torch.cat(topk_ids) if examples else torch.zeros((0, k), dtype=torch.int32),
        "topk_logprobs": torch.cat(topk_logprobs) if examples else torch.zeros((0, k)),
        "row_offsets": torch.tensor([0] + [n - 1 for n in lengths], dtype=torch.int64).cumsum(0),
    }


def _teacher_topk(model, examples: list[tuple[list[int], int]], k: int, pad: int, batch_size: int, bar):
    """Each example's top-k next tokens and float32 log-probs, in batches on the model's device."""
    topk_ids, topk_logprobs = [None] * len(examples), [None] * len(examples)
    # Batches of similar lengths waste little on padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        width = max(len(examples[i][0]) for i in index)
        ids = torch.full((len(index), width), pad, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            seq = examples[i][0]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for row, i in enumerate(index):
            # The logits at position t predict token t + 1; the last position predicts nothing.
            # float32 log-probs whatever the teacher's dtype, one example at a time: a float32 copy
            # of the whole batch's logits (batch x length x vocabulary) would outweigh a small teacher.
            logprobs = torch.log_softmax(logits[row, :len(examples[i][0]) - 1].float(), dim=-1)
            values, indices = logprobs.topk(k, dim=-1)
            topk_ids[i], topk_logprobs[i] = indices.to(torch.int32).cpu(), values.cpu()
        bar.update(len(index))
    return topk_ids, topk_logprobs


@torch.inference_mode()
def cache_teacher_logits(recipe: Recipe, out: Path, *, teacher: Path, generate: Path) -> dict:
    if recipe.distill.soft_labels is not None:
        return import_cache(recipe, out, teacher=teacher)
    tokenizer = load_tokenizer(teacher)
    k, max_len, per_shard = recipe.distill.topk, recipe.distill.max_seq_len, recipe.distill.shard_examples
    examples, skipped = tokenize_train_set(tokenizer, generate / TRAIN_JSONL, max_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    starts = list(range(0, len(examples), per_shard)) or [0]
    # Shards a killed attempt finished are kept: the examples and the teacher are the same (same key).
    todo = [i for i in range(len(starts)) if not (out / logits_shard_name(i)).exists()]
    compute = resolve_compute(recipe.compute, teacher)
    if todo:
        model = load_on(teacher, compute, trust_remote_code=recipe.teacher.trust_remote_code)
        bar = tqdm(total=sum(len(examples[starts[i]:starts[i] + per_shard]) for i in todo), desc="teacher logits",
                   unit="example")
        for index in todo:
            chunk = examples[starts[index]:starts[index] + per_shard]
            ids, logprobs = _teacher_topk(model, chunk, k, pad, recipe.generate.batch_size, bar)
            # Written aside and renamed, so a shard under its final name is always whole.
            aside = out / f"{logits_shard_name(index)}.writing"
            save_file(_shard_tensors(chunk, ids, logprobs, k), str(aside))
            os.rename(aside, out / logits_shard_name(index))
        bar.close()
    lengths = [len(seq) for seq, _ in examples]
    meta = {"format": CACHE_FORMAT, "topk": k, "max_seq_len": max_len, "vocab_size": len(tokenizer),
            "examples": len(examples), "tokens": sum(lengths),
            "answer_tokens": sum(len(seq) - p for seq, p in examples), "skipped_too_long": skipped,
            "tokenizer_sha256": tokenizer_identity(teacher), "teacher_sha256": teacher_identity(teacher),
            "shards": [{"file": logits_shard_name(i), "examples": len(examples[s:s + per_shard])}
                       for i, s in enumerate(starts)]}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    # compute in the manifest only: meta.json is an input of distill, whose key must not move with it
    return {key: value for key, value in meta.items() if key != "shards"} | {"shards": len(starts),
                                                                              "compute": compute.as_dict()}


def import_cache(recipe: Recipe, out: Path, *, teacher: Path) -> dict:
    """Takes the cache at distill.soft_labels after checking it was made by this run's teacher."""
    source = recipe.resolve(recipe.distill.soft_labels)
    meta = read_meta(source)
    problems = []
    if meta["teacher_sha256"] != teacher_identity(teacher):
        problems.append(f"it was made by another teacher (teacher hash {meta['teacher_sha256'][:12]}, "
                        f"this run's teacher is {teacher_identity(teacher)[:12]})")
    if meta["tokenizer_sha256"] != tokenizer_identity(teacher):
        problems.append("its tokenizer is not this teacher's")
    if meta["topk"] < recipe.distill.topk:
        problems.append(f"it holds the top {meta['topk']}, the recipe asks for distill.topk {recipe.distill.topk}")
    if problems:
        raise EdgedistillError(f"distill.soft_labels {source}: " + "; ".join(problems),
                               "point distill.soft_labels at a cache made with this recipe's teacher, or remove it "
                               "to compute the soft labels here")
    for shard in meta["shards"]:
        # A hard link costs no space; a copy where the two folders are on different disks.
        try:
            os.link(source / shard["file"], out / shard["file"])
        except OSError:
            shutil.copy2(source / shard["file"], out / shard["file"])
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return {"imported_from": str(source), "examples": meta["examples"], "topk": meta["topk"],
            "teacher_sha256": meta["teacher_sha256"]}


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as exc:
        raise EdgedistillError(f"{folder} is not a logits cache: {folder / META} cannot be read ({exc})",
                               "point at the logits/ folder of a finished run") from None
    if meta.get("format") != CACHE_FORMAT:
        raise EdgedistillError(f"{folder} is a logits cache of another format ({meta.get('format', 1)}, "
                               f"this version reads {CACHE_FORMAT})", "make it again with this version: "
                               "edgedistill run RECIPE --from logits")
    missing = [s["file"] for s in meta["shards"] if not (folder / s["file"]).is_file()]
    if missing:
        raise EdgedistillError(f"{folder}: shards missing: {', '.join(missing)}",
                               "make the cache again: edgedistill run RECIPE --from logits")
    return meta


class SoftLabelSet:
    """Training examples as (input_ids, prompt_length, topk_ids, topk_logprobs), shard after shard.

    The top-k rows of an example are its positions 0 .. len - 2, each predicting the next token;
    they are read from the memory-mapped shards when asked for. Built from a cache folder
    (`from_cache`) or from examples alone with no soft labels (`responses_only`: k = 0).
    """

    def __init__(self, shards: list[dict], topk: int):
        self.shards, self.topk = shards, topk
        self.ends = list(itertools.accumulate(len(s["prompt_lengths"]) for s in shards))
        for shard in shards:
            for name in ("example_offsets", "prompt_lengths", "row_offsets"):
                shard[name] = shard[name].tolist()

    @classmethod
    def from_cache(cls, folder: Path, topk: int | None = None) -> SoftLabelSet:
        meta = read_meta(folder)
        shards = []
        for info in meta["shards"]:
            handle = safe_open(str(folder / info["file"]), framework="pt")
            shard = {name: handle.get_tensor(name) for name in
                     ("input_ids", "example_offsets", "prompt_lengths", "row_offsets")}
            shard.update(topk_ids=handle.get_slice("topk_ids"), topk_logprobs=handle.get_slice("topk_logprobs"),
                         handle=handle)
            shards.append(shard)
        return cls(shards, min(topk or meta["topk"], meta["topk"]))

    @classmethod
    def responses_only(cls, examples: list[tuple[list[int], int]]) -> SoftLabelSet:
        lengths = [len(seq) - 1 for seq, _ in examples]
        empty = torch.zeros((sum(lengths), 0))
        return cls([_shard_tensors(examples, [empty.to(torch.int32)], [empty], 0)], 0)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def _locate(self, i: int) -> tuple[dict, int]:
        index = bisect.bisect_right(self.ends, i)
        return self.shards[index], i - (self.ends[index - 1] if index else 0)

    def row_counts(self, i: int, kl_positions: str) -> tuple[int, int]:
        """(answer tokens, divergence rows) of example i: the denominators of its loss terms."""
        shard, j = self._locate(i)
        length = shard["example_offsets"][j + 1] - shard["example_offsets"][j]
        answer = length - shard["prompt_lengths"][j]
        return answer, (length - 1 if kl_positions == "all" else answer)

    def __getitem__(self, i: int):
        shard, j = self._locate(i)
        ids = shard["input_ids"][shard["example_offsets"][j]:shard["example_offsets"][j + 1]]
        a, b = shard["row_offsets"][j], shard["row_offsets"][j + 1]
        return (ids, shard["prompt_lengths"][j], shard["topk_ids"][a:b][:, :self.topk],
                shard["topk_logprobs"][a:b][:, :self.topk])
