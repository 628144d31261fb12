"""A llama-architecture model with random weights and a real tokenizer: the tiny test teacher.

    edgedistill run recipes/tiny.yaml --out runs/tiny

The tokenizer (and its chat template) comes from another source, so everything downstream
(generation, the logits cache, GGUF export, llama.cpp) runs on real tokenization in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from edgedistill.recipe import RandomModelConfig


def build_random_model(cfg: RandomModelConfig, tokenizer: PreTrainedTokenizerBase, out: Path, *, seed: int) -> Path:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    # The chat template goes into tokenizer_config.json, where every consumer here looks for it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    return out
