"""The on_policy stage: the distilled student samples answers, the teacher scores every sampled token.

    edgedistill run recipes/my-task.yaml --out runs/my-task --from on_policy   # a recipe with distill.on_policy

The distill stage shows the student the teacher's text only (off-policy); at inference the student
conditions on its own tokens, whose mistakes the teacher never corrected. This stage follows it: on
a `fraction` of the batches (GKD's lambda, Agarwal et al. 2024, arXiv:2306.13649) the student
samples an answer to each of the batch's prompts and the targets are the teacher's top-k at every
sampled position; the other batches keep the teacher's own answers (generate/train.jsonl), scored
the same way. The loss is distill.on_policy.divergence (reverse KL by default, mode-seeking, as in
MiniLLM and on-policy distillation) on the k+1 buckets of edgedistill.distill.losses at T=1, on the
answer positions only. The teacher's top-k is edgedistill.distill.train.teacher_topk, the one
distill.soft_labels_from: online uses, computed by the local teacher (one copy in memory beside the
student); where teacher.source is endpoint, the served teacher scores every position instead
(edgedistill.distill.endpoint_scorer: one text completion per position, its top_logprobs, at most
20 of them), and no teacher weights are read here.

Sampling is batched: one HF `generate` per batch, prompts padded on the left, KV cache on,
do_sample at on_policy.temperature with top-k and top-p off (the student's whole distribution).
A sample that ends its turn at once (empty) or runs to max_new_tokens without ending it
(truncated) is counted in the stage result and trained on all the same (the teacher's top-k at an
empty answer's one position says what to say instead of stopping). When every sample of the first
on-policy batch is empty, or every one is truncated while the teacher's answers to the same
prompts end within max_new_tokens, the student cannot answer yet: the stage stops and names the
off-policy warm-up (the distill stage's epochs) as the fix.

With distill.quant_aware as well, every epoch of this stage is fake-quantized
(edgedistill.distill.quant_aware): the training forward passes and the sampling both run on the
rounded weights of the step's grid (one grid per step in turn), so the student samples as the
exported file it becomes would, and learns from the teacher's scores of those samples.

After every epoch the student, optimizer and RNG state go to `checkpoint/` (as in the distill
stage) and a killed stage resumes after its last finished epoch. The finished folder holds the
student as an HF folder; the export stages read it instead of distill/.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig

from edgedistill.data.endpoint_labels import check_endpoint_tokenizer
from edgedistill.data.logits import SoftLabelSet, tokenize_train_set, tokenizer_identity
from edgedistill.data.remote import completions_url
from edgedistill.distill.endpoint_scorer import EndpointScorer
from edgedistill.distill.losses import distill_loss
from edgedistill.distill.quant_aware import QuantAware, generate_rounded
from edgedistill.distill.train import (OnlineTeacher, collate, finish, load_checkpoint, save_checkpoint,
                                      teacher_topk)
from edgedistill.errors import EdgedistillError
from edgedistill.layout import TRAIN_JSONL
from edgedistill.recipe import OnPolicyConfig, Recipe
from edgedistill.runtimes.common import declared_stop_tokens
from edgedistill.runtimes.compute import resolve_compute
from edgedistill.runtimes.pytorch import load_model, load_tokenizer

NO_SOFT_LABELS = torch.zeros((0, 0))


@dataclass
class SampleCounts:
    """What the student's sampling produced, for the stage result."""

    samples: int = 0
    sampled_tokens: int = 0
    # ended the turn at once: the first sampled token was a stop token
    empty: int = 0
    # ran to max_new_tokens (or max_seq_len) without ending the turn
    truncated: int = 0
    sampling_seconds: float = 0.0

    def add(self, answers: list[tuple[list[int], bool]], seconds: float) -> None:
        self.samples += len(answers)
        self.sampled_tokens += sum(len(answer) for answer, _ in answers)
        self.empty += sum(finished and len(answer) == 1 for answer, finished in answers)
        self.truncated += sum(not finished for _, finished in answers)
        self.sampling_seconds += seconds

    def as_dict(self) -> dict:
        rate = self.sampled_tokens / self.sampling_seconds if self.sampling_seconds else None
        return {**asdict(self), "sampling_seconds": round(self.sampling_seconds, 3),
                "sampled_tokens_per_s": None if rate is None else round(rate, 1)}


@torch.no_grad()
def sample_answers(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, pad_id: int,
                   stop_ids: list[int], generate=None) -> list[tuple[list[int], bool]]:
    """(answer ids, finished) per prompt, sampled in one batched `generate` with the KV cache
    (`generate`: model.generate with other weights, edgedistill.distill.quant_aware.generate_rounded).

    A finished answer ends with the stop token that ended it (the student learns to stop, as the
    training answers end with eos); an unfinished one ran to max_new_tokens.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        # on the left, so that every row's next token comes at the same column
        input_ids[row, width - len(prompt):] = torch.as_tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    training = model.training
    model.eval()
    try:
        output = (generate or model.generate)(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device), do_sample=True,
            temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
            min_new_tokens=0, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True)
    finally:
        model.train(training)
    answers = []
    stops = set(stop_ids)
    for row in output[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), None)
        answers.append((row[:end + 1], True) if end is not None else (row, False))
    return answers


def _check_can_answer(answers: list[tuple[list[int], bool]], teacher_answer_tokens: list[int],
                      max_new_tokens: int) -> None:
    """Refuses a first on-policy batch that shows a student which cannot answer yet."""
    if all(finished and len(answer) == 1 for answer, finished in answers):
        problem = (f"all {len(answers)} samples of the first on-policy batch are empty "
                   "(the student ends its turn at once)")
    elif not any(finished for _, finished in answers) and max(teacher_answer_tokens) <= max_new_tokens:
        problem = (f"all {len(answers)} samples of the first on-policy batch ran to max_new_tokens {max_new_tokens} "
                   f"without ending the turn, while the teacher's answers to the same prompts end within "
                   f"{max(teacher_answer_tokens)} tokens")
    else:
        return
    raise EdgedistillError(
        f"distill.on_policy: the student cannot answer yet: {problem}",
        "train it off-policy first: raise distill.epochs (the distill stage before on_policy is the warm-up) "
        "or its learning_rate; if its answers are meant to be longer, raise distill.on_policy.max_new_tokens")


def _on_policy_examples(student, examples: list, *, max_new_tokens: int, max_seq_len: int, temperature: float,
                        pad_id: int, stop_ids: list[int], counts: SampleCounts, check: bool, generate=None) -> list:
    """The batch's prompts, each followed by the student's sampled answer, as collate takes examples."""
    prompts = [ids[:prompt_len].tolist() for ids, prompt_len, *_ in examples]
    started = time.perf_counter()
    answers = sample_answers(student, prompts, max_new_tokens=max_new_tokens, temperature=temperature, pad_id=pad_id,
                             stop_ids=stop_ids, generate=generate)
    # a sequence longer than distill.max_seq_len is cut there, as the teacher's training answers are
    answers = [(answer[:max_seq_len - len(prompt)], finished and len(prompt) + len(answer) <= max_seq_len)
               for prompt, (answer, finished) in zip(prompts, answers)]
    counts.add(answers, time.perf_counter() - started)
    if check:
        _check_can_answer(answers, [len(ids) - prompt_len for ids, prompt_len, *_ in examples], max_new_tokens)
    return [(torch.tensor(prompt + answer, dtype=torch.int32), len(prompt), NO_SOFT_LABELS, NO_SOFT_LABELS)
            for prompt, (answer, _) in zip(prompts, answers)]


def train_on_policy(student, score: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], data: SoftLabelSet,
                    cfg: OnPolicyConfig, out: Path, *, seed: int, max_new_tokens: int, max_seq_len: int, pad_id: int,
                    stop_ids: list[int], quant_aware: QuantAware | None = None) -> dict:
    """Trains `student` on `data`'s prompts as the module docstring says, the teacher's top-k at a
    batch's answer rows being `score(batch)` (teacher_topk of a local teacher, or an EndpointScorer);
    checkpoints to `out` after each epoch and resumes from there. Returns the per-epoch losses and
    the sampling counts."""
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=0.0)
    state = load_checkpoint(out, "on_policy", student, optimizer)
    start_epoch, history, counts = ((state["epoch"] + 1, state["history"], SampleCounts(**state["counts"]))
                                    if state else (0, [], SampleCounts()))
    device = next(student.parameters()).device
    student.config.use_cache = False  # the training forward; generate turns it on for sampling
    student.train()
    for epoch in range(start_epoch, cfg.epochs):
        order = list(range(len(data)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        # which batches are on-policy: the same draw on a rerun
        draw = random.Random(f"on_policy {seed} {epoch}")
        sums = {"on_policy": [0.0, 0], "off_policy": [0.0, 0]}
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"on_policy epoch {epoch + 1}/{cfg.epochs}", unit="step")
        steps_per_epoch = len(bar)
        rounding_before = quant_aware.rounding_seconds if quant_aware is not None else 0.0
        for step, start in enumerate(bar):
            grid = quant_aware.grid_at(epoch, epoch * steps_per_epoch + step) if quant_aware is not None else None
            examples = [data[i] for i in order[start:start + cfg.batch_size]]
            kind = "on_policy" if draw.random() < cfg.fraction else "off_policy"
            if kind == "on_policy":
                examples = _on_policy_examples(student, examples, max_new_tokens=max_new_tokens,
                                               max_seq_len=max_seq_len, temperature=cfg.temperature, pad_id=pad_id,
                                               stop_ids=stop_ids, counts=counts, check=counts.samples == 0,
                                               generate=partial(generate_rounded, quant_aware, student, grid)
                                               if grid is not None else None)
            batch = {key: t.to(device) for key, t in collate(examples, pad_id, "answer").items()}
            batch["topk_ids"], batch["topk_logprobs"] = score(batch)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            logits = (quant_aware.forward(student, grid, **inputs) if grid is not None else student(**inputs)).logits
            losses = distill_loss(logits[batch["row_mask"]], batch["is_answer"], batch["targets"],
                                  batch["topk_logprobs"], batch["topk_ids"], kl_weight=1.0, temperature=1.0,
                                  divergence=cfg.divergence, jsd_beta=cfg.jsd_beta)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums[kind][0] += losses["kl"].item()
            sums[kind][1] += 1
            bar.set_postfix({f"{name}_{cfg.divergence}": f"{total / n:.3f}" for name, (total, n) in sums.items() if n})
        history.append({"epoch": epoch + 1, **{f"{name}_batches": n for name, (_, n) in sums.items()},
                        **{f"{name}_{cfg.divergence}": round(total / n, 4) for name, (total, n) in sums.items() if n}})
        if quant_aware is not None:
            quant_aware.record(history[-1], epoch, steps_per_epoch, rounding_before)
        save_checkpoint(out, {"model": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                              "history": history, "counts": asdict(counts), "torch_rng": torch.get_rng_state()})
    student.config.use_cache = True
    return {"epochs": history, "samples": counts.as_dict(),
            **({"quant_aware": quant_aware.summary(history)} if quant_aware is not None else {})}


def on_policy_stage(recipe: Recipe, out: Path, *, distill: Path, teacher: Path, generate: Path,
                    quant_aware: QuantAware | None = None) -> dict:
    """The on_policy stage; with `quant_aware` (distill.quant_aware's grids, built by the stage graph
    from the exporters: edgedistill.export.quant_grids) every epoch fake-quantized."""
    cfg = recipe.distill.on_policy
    max_new_tokens = cfg.max_new_tokens or recipe.generate.max_new_tokens
    if tokenizer_identity(distill) != tokenizer_identity(teacher):
        raise EdgedistillError("distill.on_policy: the student's tokenizer is not the teacher's, so the teacher cannot "
                               "score the student's sampled tokens",
                               "remove distill.on_policy, or use a student with the teacher's tokenizer")
    if recipe.distill.threads:
        torch.set_num_threads(recipe.distill.threads)
    compute = resolve_compute(recipe.compute, teacher)
    tokenizer = load_tokenizer(teacher)
    endpoint = recipe.generate.endpoint if recipe.teacher.source == "endpoint" else None
    if endpoint is None:
        teacher_model = OnlineTeacher(teacher, compute, recipe.distill.topk, recipe.teacher.trust_remote_code).load()
        score = partial(teacher_topk, teacher_model, k=recipe.distill.topk)
        teacher_rows = teacher_model.get_output_embeddings().weight.shape[0]
    else:
        endpoint_tokenizer = check_endpoint_tokenizer(endpoint, teacher)
        score = EndpointScorer(endpoint, tokenizer, recipe.distill.topk)
        teacher_rows = AutoConfig.from_pretrained(teacher).vocab_size
    student = load_model(distill).to(compute.device)
    rows = {"student": student.get_output_embeddings().weight.shape[0], "teacher": teacher_rows}
    if rows["student"] != rows["teacher"]:
        raise EdgedistillError(f"distill.on_policy: the student's output layer has {rows['student']} rows, the "
                               f"teacher's {rows['teacher']}: the student could sample ids the teacher has no row for",
                               "use a student with the teacher's vocabulary (a pruned one has it), or remove "
                               "distill.on_policy")
    examples, skipped = tokenize_train_set(tokenizer, generate / TRAIN_JSONL, recipe.distill.max_seq_len)
    if not examples:
        raise EdgedistillError("distill.on_policy: there are no training prompts (all too long, or none generated)",
                               "check generate/train.jsonl and distill.max_seq_len")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = [i for i in dict.fromkeys([tokenizer.eos_token_id, *declared_stop_tokens(distill)]) if i is not None]
    torch.manual_seed(recipe.seed)
    result = train_on_policy(student, score, SoftLabelSet.responses_only(examples), cfg, out, seed=recipe.seed,
                             max_new_tokens=max_new_tokens, max_seq_len=recipe.distill.max_seq_len, pad_id=pad_id,
                             stop_ids=stop_ids, quant_aware=quant_aware)
    student.save_pretrained(out, safe_serialization=True)
    finish(out, distill)
    return {**result, "prompts": len(examples), "skipped_too_long": skipped, "max_new_tokens": max_new_tokens,
            "teacher": ({"compute": compute.as_dict()} if endpoint is None else
                        {"endpoint": completions_url(endpoint), "endpoint_tokenizer": endpoint_tokenizer,
                         **score.stats()})}
