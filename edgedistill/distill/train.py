"""The distill stage: train the student on the teacher's answers and top-k log-probs.

    edgedistill run recipes/tiny.yaml --out runs/tiny --from distill

The loss is (1 - kl_weight) * cross-entropy on the teacher's answer tokens plus kl_weight * T^2 *
a divergence (forward KL, reverse KL or JSD) from the teacher's top-k distribution
(edgedistill.distill.losses), on the answer tokens or, with kl_positions: all, on every position
of prompt and answer. The top-k comes from the logits stage's cache, or with
distill.soft_labels_from: online from the teacher's forward pass on every batch (teacher_topk:
taken as the cache takes it, so both give the same loss up to float rounding; no cache is read,
at the price of a teacher forward per step and the teacher in memory beside the student, one copy
per worker). The loop runs under HF Accelerate; with distill.processes > 1 the stage starts that
many data-parallel workers on this machine (torch.distributed over loopback: gloo on CPU, NCCL on
GPUs), each training on its share of every batch with its loss weighted so that the averaged
gradient is the whole batch's: the result matches one process. Under torchrun or
accelerate launch every launched process is such a worker (edgedistill.pipeline runs the other
stages in the first). The LoRA stage (edgedistill.lora) uses the same loop. A student with
another tokenizer than the teacher's learns the teacher's answers alone (training_set).

After every epoch the model, optimizer, scheduler and RNG state go to `checkpoint/` in the
stage's partial folder (written aside, then renamed); a killed run reloads it (weights_only) and
goes on with the next epoch. The finished folder holds the student as an HF folder.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import socket
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from edgedistill.data.logits import SoftLabelSet, read_meta, tokenize_train_set, tokenizer_identity
from edgedistill.distill.losses import distill_loss
from edgedistill.distill.quant_aware import QuantAware
from edgedistill.distill.student import TOKENIZER_FILES
from edgedistill.errors import EdgedistillError
from edgedistill.layout import FLOAT_STUDENT, TRAIN_JSONL
from edgedistill.pipeline import launched
from edgedistill.recipe import DistillConfig, Recipe, TrainingConfig
from edgedistill.runtimes.compute import Compute, load_on, resolve_compute
from edgedistill.runtimes.pytorch import load_model, load_tokenizer

CHECKPOINT = "checkpoint"


def collate(examples, pad_id: int, kl_positions: str) -> dict[str, torch.Tensor]:
    """A padded batch; `row_mask` picks the positions the losses use, in the order of the top-k rows.

    `is_answer` says which of those rows predict an answer token (the cross-entropy rows).
    """
    width = max(len(ids) for ids, *_ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    row_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    is_answer, topk_ids, topk_logprobs = [], [], []
    for row, (ids, prompt_len, ex_topk_ids, ex_topk_logprobs) in enumerate(examples):
        n = len(ids)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        first = 0 if kl_positions == "all" else prompt_len - 1
        row_mask[row, first:n - 1] = True
        is_answer.append(torch.arange(first, n - 1) >= prompt_len - 1)
        topk_ids.append(ex_topk_ids[first:])
        topk_logprobs.append(ex_topk_logprobs[first:])
    targets = torch.cat([ids[p:].long() for ids, p, _, _ in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "row_mask": row_mask,
            "is_answer": torch.cat(is_answer), "targets": targets,
            "topk_ids": torch.cat(topk_ids), "topk_logprobs": torch.cat(topk_logprobs)}


@dataclass(frozen=True)
class OnlineTeacher:
    """The teacher run on every batch (distill.soft_labels_from: online): its folder, where and in
    what dtype it runs (the recipe's compute: section, as for the logits stage) and its top-k."""

    folder: Path
    compute: Compute
    topk: int
    trust_remote_code: bool = False

    def load(self):
        model = load_on(self.folder, self.compute, trust_remote_code=self.trust_remote_code).eval()
        return model.requires_grad_(False)


@torch.no_grad()
def teacher_topk(teacher, batch: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely next tokens (int32) and their float32 log-probs at the batch's
    loss rows (`row_mask`, in collate's order), on the batch's device.

    Taken as the logits stage caches them: log_softmax over the full vocabulary at T=1 in float32,
    then topk, one sequence at a time (a float32 copy of the whole batch's logits would outweigh a
    small teacher).
    """
    logits = teacher(input_ids=batch["input_ids"].to(teacher.device),
                     attention_mask=batch["attention_mask"].to(teacher.device)).logits
    mask = batch["row_mask"].to(logits.device)
    ids, logprobs = [], []
    for row in range(logits.shape[0]):
        values, indices = logits[row][mask[row]].float().log_softmax(-1).topk(k, dim=-1)
        ids.append(indices.to(torch.int32))
        logprobs.append(values)
    device = batch["input_ids"].device
    return torch.cat(ids).to(device), torch.cat(logprobs).to(device)


def load_checkpoint(out: Path, name: str, model, optimizer, scheduler=None) -> dict | None:
    """The state save_checkpoint left in `out`, loaded into `model`, `optimizer` (and `scheduler`)
    with the torch RNG restored; None when there is none (a fresh start)."""
    checkpoint = out / CHECKPOINT / "state.pt"
    if not checkpoint.exists():
        return None
    state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    print(f"[{name}] resuming after epoch {state['epoch'] + 1} from {checkpoint}")
    return state


def save_checkpoint(out: Path, state: dict) -> None:
    """`state` (torch.save-able) as out/checkpoint/state.pt, written aside and renamed into place."""
    aside = out / f"{CHECKPOINT}.writing"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    try:
        torch.save(state, aside / "state.pt")
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)  # the previous checkpoint stays, for the rerun
        raise
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    os.rename(aside, out / CHECKPOINT)


def training_set(cfg: TrainingConfig, logits: Path, student: Path, generate: Path | None = None,
                 topk: int | None = None) -> SoftLabelSet:
    """The examples to train on: the logits cache's, with the teacher's top-k (the first `topk`).

    A student with another tokenizer cannot be compared with the teacher token by token; with
    kl_weight 0 it trains on the teacher's answers (generate/train.jsonl) tokenized with its own
    tokenizer: response distillation, no soft labels.
    """
    meta = read_meta(logits)
    if meta["tokenizer_sha256"] == tokenizer_identity(student):
        data = SoftLabelSet.from_cache(logits, topk)
    elif cfg.kl_weight > 0:
        raise _other_tokenizer()
    else:
        assert generate is not None, "response distillation reads generate/train.jsonl"
        examples, _ = tokenize_train_set(load_tokenizer(student), generate / TRAIN_JSONL, meta["max_seq_len"])
        data = SoftLabelSet.responses_only(examples)
    return _not_empty(data)


def online_training_set(cfg: DistillConfig, teacher: Path, student: Path, generate: Path) -> SoftLabelSet:
    """The examples to train on when the teacher runs every step: generate/train.jsonl tokenized as
    the logits stage tokenizes it (the cache's examples, in its order), without soft labels."""
    same = tokenizer_identity(teacher) == tokenizer_identity(student)
    if not same and cfg.kl_weight > 0:
        raise _other_tokenizer()
    examples, _ = tokenize_train_set(load_tokenizer(teacher if same else student), generate / TRAIN_JSONL,
                                     cfg.max_seq_len)
    return _not_empty(SoftLabelSet.responses_only(examples))


def _other_tokenizer() -> EdgedistillError:
    return EdgedistillError(
        "the student's tokenizer is not the teacher's, so the teacher's soft labels (top-k token ids of the "
        "teacher's vocabulary) cannot be compared with the student's predictions",
        "set kl_weight: 0 in the recipe's distill (and lora) section to train the student on the teacher's "
        "answers tokenized with its own tokenizer (response distillation), or use a student with the teacher's "
        "tokenizer")


def _not_empty(data: SoftLabelSet) -> SoftLabelSet:
    if len(data) == 0:
        raise EdgedistillError("there are no training examples (all too long, or none generated)",
                               "check generate/train.jsonl and distill.max_seq_len")
    return data


def load_soft_labels(logits: Path, student: Path, topk: int | None = None) -> SoftLabelSet:
    """The cache's examples with soft labels, for a model with the teacher's tokenizer."""
    return training_set(TrainingConfig(kl_weight=1.0), logits, student, topk=topk)


def _shard(data: SoftLabelSet, rows: list[int], rank: int, world: int, kl_positions: str):
    """This process's rows of a batch, and the scales that make its loss its share of the batch's.

    Gradients are averaged over processes, so a process's CE mean is weighted by world * (its
    answer tokens / the batch's), and likewise the divergence: the average is then the loss of the
    whole batch on one process. A process left without rows (a short last batch) computes one row
    at weight 0 so that every process takes part in the gradient average.
    """
    if world == 1:
        return rows, (1.0, 1.0)
    mine = rows[rank::world]
    if not mine:
        return rows[:1], (0.0, 0.0)
    counts = [data.row_counts(i, kl_positions) for i in rows]
    my_counts = [data.row_counts(i, kl_positions) for i in mine]
    return mine, tuple(world * sum(c[t] for c in my_counts) / sum(c[t] for c in counts) for t in (0, 1))


def float_student(accelerator: Accelerator, model, out: Path):
    """The float student as the fake-quantized epochs begin, frozen: with quant_aware.soft_labels
    float_student it gives those epochs their soft labels. Saved in out/float_student (written
    aside, then renamed) by the first process, so a resumed run reads back the same model and the
    finished stage holds the model its files are measured against."""
    folder = out / FLOAT_STUDENT
    inner = accelerator.unwrap_model(model)
    if accelerator.is_main_process and not folder.is_dir():
        aside = out / f".{FLOAT_STUDENT}.writing"  # a killed write's leftover is dropped (pipeline.drop_leftovers)
        shutil.rmtree(aside, ignore_errors=True)
        inner.config.use_cache = True  # the saved config is the one generation reads
        inner.save_pretrained(aside, safe_serialization=True)
        inner.config.use_cache = False
        os.rename(aside, folder)
    accelerator.wait_for_everyone()
    # the stage's own folder, without its tokenizer until finish(): load_model's checks would refuse it
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    return reference.to(accelerator.device).eval().requires_grad_(False)


def train_epochs(model, data: SoftLabelSet, cfg: TrainingConfig, out: Path, *, seed: int, name: str,
                 teacher=None, topk: int | None = None, quant_aware: QuantAware | None = None) -> list[dict]:
    """Trains the parameters of `model` that require grad; checkpoints to `out` after each epoch.

    Resumes from the checkpoint in `out` if there is one. Returns the per-epoch mean losses. In a
    data-parallel worker (see `train_and_save`) each process trains on its share of every batch.
    With a `teacher` model, each batch's soft labels are its top `topk` (teacher_topk), not `data`'s.
    With `quant_aware`, its epochs run the forward pass on its grids' rounded weights
    (edgedistill.distill.quant_aware), one grid per step in turn, learning the teacher's soft
    labels or (soft_labels float_student) the float student's as those epochs begin, with the
    divergence alone at temperature 1.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model.config.use_cache = False
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)

    def schedule(step: int) -> float:
        # Linear warm-up, then cosine decay to a tenth of the peak rate.
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = load_checkpoint(out, name, model, optimizer, scheduler)
    start_epoch, history = (state["epoch"] + 1, state["history"]) if state else (0, [])

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    reference = None
    for epoch in range(start_epoch, cfg.epochs):
        if (quant_aware is not None and quant_aware.soft_labels == "float_student"
                and epoch >= quant_aware.first_epoch and reference is None):
            reference = float_student(accelerator, model, out)
        order = list(range(len(data)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not accelerator.is_main_process)
        rounding_before = quant_aware.rounding_seconds if quant_aware is not None else 0.0
        for step, start in enumerate(bar, 1):
            grid = quant_aware.grid_at(epoch, epoch * steps_per_epoch + step - 1) if quant_aware is not None else None
            rows, scales = _shard(data, order[start:start + cfg.batch_size], rank, world, cfg.kl_positions)
            batch = collate([data[i] for i in rows], pad_id, cfg.kl_positions)
            batch = {key: t.to(accelerator.device) for key, t in batch.items()}
            if teacher is not None:
                batch["topk_ids"], batch["topk_logprobs"] = teacher_topk(teacher, batch, topk)
            kl_weight, temperature = cfg.kl_weight, cfg.temperature
            if reference is not None and grid is not None:
                # the float student's distribution as it is, alone: the cross-entropy on the teacher's
                # answers (or a temperature) would pull the rounded student away from it
                batch["topk_ids"], batch["topk_logprobs"] = teacher_topk(reference, batch, cfg.topk)
                kl_weight, temperature = 1.0, 1.0
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            logits = (quant_aware.forward(model, grid, **inputs) if grid is not None else model(**inputs)).logits
            losses = distill_loss(logits[batch["row_mask"]], batch["is_answer"], batch["targets"],
                                  batch["topk_logprobs"], batch["topk_ids"], kl_weight=kl_weight,
                                  temperature=temperature, divergence=cfg.divergence, jsd_beta=cfg.jsd_beta,
                                  scales=scales)
            accelerator.backward(losses["loss"])
            accelerator.clip_grad_norm_(trainable, 1.0)
            if grid is not None and quant_aware.learning_rate is not None:
                for group in optimizer.param_groups:
                    group["lr"] = quant_aware.learning_rate  # the scheduler sets it anew after the step
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # Logged unweighted: a data-parallel worker's weighted loss is not its batch's loss.
            ce, kl = losses["ce"].item(), losses["kl"].item()
            sums["ce"] += ce
            sums["kl"] += kl
            sums["loss"] += (1 - kl_weight) * ce + kl_weight * kl
            bar.set_postfix(loss=f"{sums['loss'] / step:.3f}", ce=f"{sums['ce'] / step:.3f}", kl=f"{sums['kl'] / step:.3f}")
        history.append({"epoch": epoch + 1, **{key: round(v / steps_per_epoch, 4) for key, v in sums.items()}})
        if quant_aware is not None:
            quant_aware.record(history[-1], epoch, steps_per_epoch, rounding_before)
        if accelerator.is_main_process:
            save_checkpoint(out, {"model": accelerator.unwrap_model(model).state_dict(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "epoch": epoch, "history": history, "examples": len(data),
                                  "torch_rng": torch.get_rng_state()})
        accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).config.use_cache = True
    return history


def finish(out: Path, tokenizer_from: Path) -> None:
    """Copies the tokenizer files next to the saved model (and the float student, where one
    taught the fake-quantized epochs) and drops the checkpoint."""
    for folder in (out, out / FLOAT_STUDENT):
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).exists() and folder.is_dir():
                shutil.copy2(tokenizer_from / name, folder / name)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)


def _train_worker(rank: int, processes: int, build, build_args: tuple, cfg: TrainingConfig, load_data,
                  out: Path, seed: int, name: str, online: OnlineTeacher | None,
                  quant_aware: QuantAware | None) -> None:
    if processes > 1:
        # Read by torch.distributed through Accelerate; a spawned worker's own environment.
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
        if not cfg.threads:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    model = build(*build_args)
    # with kl_weight 0 the divergence is not computed: the teacher's answers alone, no teacher needed
    teacher = online.load() if online is not None and cfg.kl_weight > 0 else None
    train_epochs(model, load_data(), cfg, out, seed=seed, name=name, teacher=teacher,
                 topk=online.topk if online is not None else None, quant_aware=quant_aware)
    if rank == 0:
        model.save_pretrained(out, safe_serialization=True)


def train_and_save(build, build_args: tuple, cfg: TrainingConfig, out: Path, *, logits: Path | None = None,
                   student: Path, generate: Path, topk: int | None = None, seed: int, name: str,
                   online: OnlineTeacher | None = None,
                   quant_aware: QuantAware | None = None) -> tuple[list[dict], int]:
    """Trains `build(*build_args)` as `cfg` says and saves it into `out` (in every process of a launch).

    The data is `training_set(cfg, logits, student, generate, topk)`, or with an `online` teacher
    `online_training_set` and the teacher's top-k on every batch (each worker holds one
    teacher); with `quant_aware`, its epochs are fake-quantized; `student` is the folder whose
    tokenizer the model uses. Returns the per-epoch losses and the number of examples. With
    cfg.processes > 1, that many workers (picklable `build`) are joined by torch.distributed on
    loopback; the pipeline itself stays in one process, only training is spread.
    """
    load_data = (partial(training_set, cfg, logits, student, generate, topk) if online is None
                 else partial(online_training_set, cfg, online.folder, student, generate))
    args = (build, build_args, cfg, load_data, out, seed, name, online, quant_aware)
    rank, world = launched()
    if world > 1:
        # Started by torchrun or accelerate launch: this process is already one of the workers, and
        # Accelerate reads the launcher's environment. The first one finishes the folder.
        _train_worker(rank, 1, *args)
        if rank > 0:
            return [], 0
    elif cfg.processes == 1:
        _train_worker(0, 1, *args)
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(cfg.processes)})
        try:
            torch.multiprocessing.start_processes(_train_worker, args=(cfg.processes, *args),
                                                  nprocs=cfg.processes, start_method="spawn")
        finally:
            for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):
                os.environ.pop(key, None)
    # Every run ends with a checkpoint holding the per-epoch losses, whichever process wrote it.
    state = torch.load(out / CHECKPOINT / "state.pt", weights_only=True)
    finish(out, student)
    return state["history"], state["examples"]


def training_processes(cfg: TrainingConfig) -> int:
    """How many processes trained: the launcher's world size, else cfg.processes."""
    world = launched()[1]
    return world if world > 1 else cfg.processes


def kl_positions_of(cfg: TrainingConfig, logits: Path) -> tuple[TrainingConfig, dict]:
    """`cfg` with the divergence on the answer positions when the cache has soft labels there alone
    (an endpoint teacher's: edgedistill.data.endpoint_labels), and the note that says so."""
    if cfg.kl_positions == "all" and read_meta(logits).get("soft_label_positions") == "answer":
        return cfg.model_copy(update={"kl_positions": "answer"}), {
            "kl_positions": "answer (the soft labels came from an endpoint, which gives none for the prompt)"}
    return cfg, {}


def distill(recipe: Recipe, out: Path, *, student: Path, generate: Path, logits: Path | None = None,
            teacher: Path | None = None, quant_aware: QuantAware | None = None) -> dict:
    """The distill stage: from the `logits` cache, or with soft_labels_from online from the `teacher`
    folder; with `quant_aware` (distill.quant_aware's grids, built by the stage graph from the
    exporters: edgedistill.export.quant_grids), its epochs fake-quantized."""
    online = None
    if recipe.distill.soft_labels_from == "online":
        cfg = recipe.distill
        compute = resolve_compute(recipe.compute, teacher)
        online = OnlineTeacher(teacher, compute, cfg.topk, recipe.teacher.trust_remote_code)
        note = {"soft_labels_from": "online", "teacher_compute": compute.as_dict()}
    else:
        cfg, note = kl_positions_of(recipe.distill, logits)
    history, examples = train_and_save(load_model, (student,), cfg, out, logits=logits, student=student,
                                       generate=generate, topk=cfg.topk, seed=recipe.seed, name="distill",
                                       online=online, quant_aware=quant_aware)
    if quant_aware is not None:
        note["quant_aware"] = quant_aware.summary(history)
    return {"epochs": history, "train_examples": examples, "processes": training_processes(cfg),
            "soft_labels": cfg.kl_weight > 0, "steps": math.ceil(examples / cfg.batch_size) * cfg.epochs, **note}

