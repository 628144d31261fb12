"""LoRA for task specialization: train an adapter on the distilled task data, then merge it.

    edgedistill run recipes/tiny-lora.yaml --out runs/tiny-lora      # a recipe with a `lora:` section

The `lora` stage trains a PEFT LoRA adapter on the full-precision distilled student with the same
loss and data as distillation (the teacher's answers and cached soft labels) and keeps the
adapter on its own (adapter_config.json + adapter_model.safetensors), so one base model can serve
several task adapters. The `merge` stage folds the adapter into the full-precision student (never
into a quantized one) and checks that the merged model's logits equal the adapter model's within
MERGE_TOLERANCE on a few training sequences before the folder is accepted.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from edgedistill.distill.train import finish, kl_positions_of, train_and_save, training_processes, training_set
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe
from edgedistill.runtimes.pytorch import load_model

# Max |logit difference| between the merged model and base + adapter, in float32.
MERGE_TOLERANCE = 1e-3


def _lora_model(recipe: Recipe, distill: Path):
    cfg = recipe.lora
    base = load_model(distill)
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise EdgedistillError(f"lora.target_modules: the student has no modules named {missing}",
                               f"use some of: {', '.join(sorted(present - {''}))}")
    # The same seed in every data-parallel worker: the same initial adapter.
    torch.manual_seed(recipe.seed)
    return get_peft_model(base, PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                               target_modules=cfg.target_modules, task_type="CAUSAL_LM"))


def train_lora(recipe: Recipe, out: Path, *, distill: Path, logits: Path, generate: Path) -> dict:
    cfg, note = kl_positions_of(recipe.lora, logits)
    trainable = sum(p.numel() for p in _lora_model(recipe, distill).parameters() if p.requires_grad)
    history, examples = train_and_save(_lora_model, (recipe, distill), cfg, out, logits=logits, student=distill,
                                       generate=generate, topk=recipe.distill.topk, seed=recipe.seed, name="lora")
    return {"epochs": history, "trainable_parameters": trainable, "processes": training_processes(cfg),
            "steps": math.ceil(examples / cfg.batch_size) * cfg.epochs, **note}


@torch.inference_mode()
def merge_lora(recipe: Recipe, out: Path, *, distill: Path, lora: Path, logits: Path, generate: Path) -> dict:
    adapted = PeftModel.from_pretrained(load_model(distill), lora).eval()
    data = training_set(recipe.lora, logits, distill, generate)
    probes = [data[i][0].long().unsqueeze(0) for i in range(min(4, len(data)))]
    expected = [adapted(input_ids=ids).logits for ids in probes]
    merged = adapted.merge_and_unload()
    difference = max((merged(input_ids=ids).logits - want).abs().max().item() for ids, want in zip(probes, expected))
    if difference > MERGE_TOLERANCE:
        raise EdgedistillError(f"the merged model's logits differ from base + adapter by {difference:.2e} "
                               f"(tolerance {MERGE_TOLERANCE})", "report this as a bug, with the recipe")
    merged.save_pretrained(out, safe_serialization=True)
    finish(out, distill)
    return {"max_abs_logit_difference": difference, "tolerance": MERGE_TOLERANCE}
