"""Per-architecture knowledge for the HF → GGUF writer, kept as data.

One `ArchSpec` per HF architecture (the first entry of config.json's `architectures`) says which
GGUF architecture it becomes, how config.json values become GGUF hyperparameters, and which HF
tensor becomes which GGUF tensor, with its expected shape and whether it needs the llama q/k row
permutation. The writer has no per-architecture branches: Qwen2 or Gemma3 is a new `ArchSpec`
(and a new dims function where the config differs) appended to `ARCHITECTURES`.

    spec = spec_for(config, config_file)          # EdgedistillError if unsupported
    dims = spec.dims(config, config_file)         # {"hidden": 64, "n_head": 4, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFValueType, Keys

from edgedistill.errors import EdgedistillError

Dims = dict[str, Any]


@dataclass(frozen=True)
class TensorRule:
    """One HF module (without `.weight`/`.bias`) and the GGUF tensor it becomes.

    `hf_name` and the GGUF name may hold `{bid}`, the block index. `shape` names dims from the
    arch's dims function, in HF (PyTorch) order. `rope_heads` names the head-count dim when the
    rows need the llama rotary permutation. `bias`: a `.bias` may accompany the weight.
    `dropped_when_tied`: with tied embeddings the tensor is not written (llama.cpp then reuses
    token_embd) and a copy in the checkpoint is ignored.
    """

    hf_name: str
    tensor: MODEL_TENSOR
    shape: tuple[str, ...]
    rope_heads: str | None = None
    bias: bool = False
    dropped_when_tied: bool = False

    @property
    def per_block(self) -> bool:
        return "{bid}" in self.hf_name

    def gguf_name(self, bid: int | None) -> str:
        return TENSOR_NAMES[self.tensor].format(bid=bid)


@dataclass(frozen=True)
class HParam:
    """A GGUF metadata key (a `Keys` template with `{arch}`) filled from one dim."""

    key: str
    dim: str
    vtype: GGUFValueType


@dataclass(frozen=True)
class ArchSpec:
    hf_architecture: str
    gguf_arch: MODEL_ARCH
    dims: Callable[[dict, Path], Dims]
    hparams: tuple[HParam, ...]
    tensors: tuple[TensorRule, ...]
    # regexes (full match) of checkpoint tensors that carry nothing llama.cpp needs
    ignored: tuple[str, ...] = ()
    # HF configs leave tie_word_embeddings out when it has the model class's default
    tied_default: bool = False

    @property
    def gguf_arch_name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]


def _require(config: dict, key: str, config_file: Path) -> Any:
    if key not in config:
        raise EdgedistillError(f"{config_file}: missing `{key}`", "re-save the model with transformers")
    return config[key]


def llama_dims(config: dict, config_file: Path) -> Dims:
    """Sizes of a llama-style decoder, with the defaults transformers' LlamaConfig uses."""
    hidden = _require(config, "hidden_size", config_file)
    n_head = _require(config, "num_attention_heads", config_file)
    n_kv_head = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    rope_scaling = config.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise EdgedistillError(
            f"{config_file}: rope_scaling {rope_scaling} is not supported by the GGUF exporter yet",
            "export a model without rope scaling, or add the scaling keys to export/gguf/arch.py",
        )
    if head_dim % 2:
        raise EdgedistillError(f"{config_file}: head_dim {head_dim} is odd; rotary needs it even")
    return {
        "vocab": _require(config, "vocab_size", config_file),
        "hidden": hidden,
        "n_layer": _require(config, "num_hidden_layers", config_file),
        "n_head": n_head,
        "n_kv_head": n_kv_head,
        "head_dim": head_dim,
        "q_dim": n_head * head_dim,
        "kv_dim": n_kv_head * head_dim,
        "ff": _require(config, "intermediate_size", config_file),
        "ctx": config.get("max_position_embeddings", 2048),
        "rope_theta": float(config.get("rope_theta", 10000.0)),
        "rms_eps": float(config.get("rms_norm_eps", 1e-6)),
    }


U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32

LLAMA_HPARAMS = (
    HParam(Keys.LLM.VOCAB_SIZE, "vocab", U32),
    HParam(Keys.LLM.CONTEXT_LENGTH, "ctx", U32),
    HParam(Keys.LLM.EMBEDDING_LENGTH, "hidden", U32),
    HParam(Keys.LLM.BLOCK_COUNT, "n_layer", U32),
    HParam(Keys.LLM.FEED_FORWARD_LENGTH, "ff", U32),
    HParam(Keys.Attention.HEAD_COUNT, "n_head", U32),
    HParam(Keys.Attention.HEAD_COUNT_KV, "n_kv_head", U32),
    # explicit so models whose head_dim != hidden / n_head (allowed by HF) load correctly
    HParam(Keys.Attention.KEY_LENGTH, "head_dim", U32),
    HParam(Keys.Attention.VALUE_LENGTH, "head_dim", U32),
    HParam(Keys.Rope.DIMENSION_COUNT, "head_dim", U32),
    HParam(Keys.Rope.FREQ_BASE, "rope_theta", F32),
    HParam(Keys.Attention.LAYERNORM_RMS_EPS, "rms_eps", F32),
)

_L = "model.layers.{bid}."
LLAMA_TENSORS = (
    TensorRule("model.embed_tokens", MODEL_TENSOR.TOKEN_EMBD, ("vocab", "hidden")),
    TensorRule(_L + "input_layernorm", MODEL_TENSOR.ATTN_NORM, ("hidden",)),
    TensorRule(_L + "self_attn.q_proj", MODEL_TENSOR.ATTN_Q, ("q_dim", "hidden"), rope_heads="n_head", bias=True),
    TensorRule(_L + "self_attn.k_proj", MODEL_TENSOR.ATTN_K, ("kv_dim", "hidden"), rope_heads="n_kv_head", bias=True),
    TensorRule(_L + "self_attn.v_proj", MODEL_TENSOR.ATTN_V, ("kv_dim", "hidden"), bias=True),
    TensorRule(_L + "self_attn.o_proj", MODEL_TENSOR.ATTN_OUT, ("hidden", "q_dim"), bias=True),
    TensorRule(_L + "post_attention_layernorm", MODEL_TENSOR.FFN_NORM, ("hidden",)),
    TensorRule(_L + "mlp.gate_proj", MODEL_TENSOR.FFN_GATE, ("ff", "hidden"), bias=True),
    TensorRule(_L + "mlp.up_proj", MODEL_TENSOR.FFN_UP, ("ff", "hidden"), bias=True),
    TensorRule(_L + "mlp.down_proj", MODEL_TENSOR.FFN_DOWN, ("hidden", "ff"), bias=True),
    TensorRule("model.norm", MODEL_TENSOR.OUTPUT_NORM, ("hidden",)),
    TensorRule("lm_head", MODEL_TENSOR.OUTPUT, ("vocab", "hidden"), dropped_when_tied=True),
)

# rotary inverse frequencies are recomputed by llama.cpp from rope.freq_base; older checkpoints stored them
ROTARY_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("LlamaForCausalLM", MODEL_ARCH.LLAMA, llama_dims, LLAMA_HPARAMS, LLAMA_TENSORS, ROTARY_BUFFERS),
)


def spec_for(config: dict, config_file: Path) -> ArchSpec:
    """The spec for config.json's architecture; EdgedistillError naming the supported ones."""
    names = config.get("architectures") or []
    by_name = {spec.hf_architecture: spec for spec in ARCHITECTURES}
    for arch_name in names:
        if arch_name in by_name:
            return by_name[arch_name]
    raise EdgedistillError(
        f"{config_file}: architecture {names or 'missing'} is not supported by the GGUF exporter",
        f"supported: {', '.join(sorted(by_name))}",
    )


def permute_rotary_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotary layout to llama.cpp's.

    HF's rotate_half rotates dim i of each head together with dim i + head_dim/2; llama.cpp's
    llama rope (GGML_ROPE_TYPE_NORM) rotates adjacent dims 2j and 2j+1. Moving row (h, i, j)
    — head h, half i, offset j — to (h, j, i) puts each rotated pair side by side. q and k get the
    same reordering within a head, so q·k, and hence attention, is unchanged. Works on weights
    (rows, hidden) and biases (rows,).
    """
    head_dim = rows.shape[0] // n_head
    halves = rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:])
    return halves.swapaxes(1, 2).reshape(rows.shape)
