"""The student stage: the initial student, by depth pruning of the teacher or from a config.

    edgedistill run recipes/default.yaml --from student

Depth pruning keeps a subset of the teacher's transformer blocks (a count spread evenly from the
first block to the last, or explicit indices) and everything else (embeddings, final norm,
lm_head) as is, so the student starts from the teacher's representations and shares its
tokenizer. A config student is a fresh random model of the teacher's family with some keys of the
teacher's config overridden (for instance fewer layers and a narrower width).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe
from edgedistill.runtimes.pytorch import load_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def evenly_spaced_layers(n_layers: int, keep: int) -> list[int]:
    """`keep` block indices from 0 to n_layers - 1, first and last always kept."""
    if not 1 <= keep <= n_layers:
        raise EdgedistillError(f"student.keep_layers is {keep}, but the teacher has {n_layers} layers",
                               f"choose a count between 1 and {n_layers}")
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def prune_depth(model, keep: list[int]):
    """The same model with only the blocks in `keep`, in order; layer indices renumbered."""
    n_layers = model.config.num_hidden_layers
    if sorted(set(keep)) != sorted(keep) or any(not 0 <= i < n_layers for i in keep):
        raise EdgedistillError(f"student.keep_layers {keep} must be distinct indices in 0..{n_layers - 1}")
    blocks = model.model.layers
    model.model.layers = torch.nn.ModuleList(blocks[i] for i in sorted(keep))
    for new_index, block in enumerate(model.model.layers):
        # The KV cache is addressed by this index.
        block.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in sorted(keep)]
    return model


def count_parameters(model) -> int:
    # Tied input/output embeddings are one tensor and counted once.
    return sum(p.numel() for p in model.parameters())


def build_student(recipe: Recipe, out: Path, *, teacher: Path) -> dict:
    cfg = recipe.student
    teacher_model = load_model(teacher, trust_remote_code=recipe.teacher.trust_remote_code)
    teacher_params = count_parameters(teacher_model)
    if cfg.method == "prune":
        n_layers = teacher_model.config.num_hidden_layers
        keep = (evenly_spaced_layers(n_layers, cfg.keep_layers) if isinstance(cfg.keep_layers, int)
                else list(cfg.keep_layers))
        student = prune_depth(teacher_model, keep)
        detail = {"kept_layers": sorted(keep)}
    else:
        config = AutoConfig.from_pretrained(teacher)
        for key, value in cfg.config.items():
            if not hasattr(config, key):
                raise EdgedistillError(f"student.config.{key}: the teacher's config has no such key",
                                       f"use keys of {type(config).__name__}, e.g. num_hidden_layers, hidden_size")
            setattr(config, key, value)
        torch.manual_seed(recipe.seed)
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        detail = {"config_overrides": cfg.config}
    student.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (teacher / name).exists() and not (out / name).exists():
            shutil.copy2(teacher / name, out / name)
    student_params = count_parameters(student)
    return {"method": cfg.method, **detail, "teacher_parameters": teacher_params,
            "student_parameters": student_params, "parameter_ratio": round(student_params / teacher_params, 4)}
