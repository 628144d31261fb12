"""Per-architecture knowledge for the HF → GGUF writer, kept as data.

One `ArchSpec` per HF architecture (the first entry of config.json's `architectures`) says which
GGUF architecture it becomes, how config.json values become GGUF hyperparameters, which HF tensor
becomes which GGUF tensor (with its expected shape and any value transform), and how llama.cpp
lays out that architecture's rotary dims. The writer has no per-architecture branches: a new
architecture is an `ArchSpec` (and a dims function where its config differs) in `ARCHITECTURES`.
What llama.cpp cannot reproduce (rope scaling types other than linear and llama3, sliding windows it
does not implement, Gemma's attention scale when it differs from llama.cpp's fixed one) is refused
here, naming the field. Llama 3.1/3.2's rope scaling becomes a tensor computed from config.json
(`computed_tensors`: rope_freqs.weight, as llama.cpp's own converter writes it).
These rules read config.json only, so `edgedistill run` also applies them right after the teacher
stage to the config the student will have (edgedistill.export.check), before any training.

    spec, dims = gguf_layout(config, config_file)  # ConfigRefusal if unsupported; dims: {"hidden": 64, ...}
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFValueType, Keys

from edgedistill.export.refusal import ConfigRefusal

Dims = dict[str, Any]


class Rotary(Enum):
    """How llama.cpp's rope for a GGUF architecture pairs the dims of a head.

    HF's rotate_half rotates dim i with dim i + head_dim/2. llama.cpp's NEOX rope does the same,
    so q/k rows are written as they are; its NORM rope (the llama architecture) rotates dims 2j
    and 2j+1, so q/k rows are permuted (`permute_rotary_rows`).
    """

    HALVES = "neox"
    ADJACENT = "norm"


@dataclass(frozen=True)
class TensorRule:
    """One HF module (without `.weight`/`.bias`) and the GGUF tensor it becomes.

    `hf_name` and the GGUF name may hold `{bid}`, the block index. `shape` names dims from the
    arch's dims function, in HF (PyTorch) order. `rope_heads` names the head-count dim of q/k
    projections, whose rows follow the arch's rotary layout. `bias`: a `.bias` may accompany the
    weight. `dropped_when_tied`: with tied embeddings the tensor is not written (llama.cpp then
    reuses token_embd) and a copy in the checkpoint is ignored. `weight_offset` is added to every
    weight value (Gemma's RMSNorm scales by 1 + weight, llama.cpp's by weight).
    """

    hf_name: str
    tensor: MODEL_TENSOR
    shape: tuple[str, ...]
    rope_heads: str | None = None
    bias: bool = False
    dropped_when_tied: bool = False
    weight_offset: float = 0.0

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
    rotary: Rotary
    # regexes (full match) of checkpoint tensors that carry nothing llama.cpp needs
    ignored: tuple[str, ...] = ()
    # HF configs leave tie_word_embeddings out when it has the model class's default
    tied_default: bool = False

    @property
    def gguf_arch_name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]

    def permuted_heads(self, rule: TensorRule, dims: Dims) -> int | None:
        """The head count to permute `rule`'s rows by, or None when they are written as they are."""
        return dims[rule.rope_heads] if rule.rope_heads and self.rotary is Rotary.ADJACENT else None


def _require(config: dict, key: str, config_file: Path) -> Any:
    if key not in config:
        raise ConfigRefusal(f"{config_file}: missing `{key}`", "re-save the model with transformers", keys=(key,))
    return config[key]


def _refuse(config_file: Path, key: str, value: Any, why: str, also: tuple[str, ...] = ()) -> ConfigRefusal:
    """The refusal of `key`'s value; `also`: the other config keys the rule reads."""
    return ConfigRefusal(
        f"{config_file}: `{key}` = {value!r} is not supported by the GGUF exporter: {why}",
        "export a model without it, or teach edgedistill/export/gguf/arch.py how llama.cpp expresses it",
        keys=(key, *also),
    )


def _expect(config: dict, key: str, allowed: tuple, config_file: Path, why: str) -> None:
    """Refuse a config whose `key` (absent: the first allowed value, the HF default) is not allowed."""
    value = config.get(key, allowed[0])
    if value not in allowed:
        raise _refuse(config_file, key, value, why)


def _decoder_dims(config: dict, config_file: Path, rope_types: tuple[str, ...] = ("linear",)) -> Dims:
    """Sizes of a llama-style decoder, with LlamaConfig's defaults for keys left out; `rope_types`:
    the rope_scaling types llama.cpp's graph for the architecture reproduces.

    Callers put their own config class's defaults into `config` first.
    """
    hidden = _require(config, "hidden_size", config_file)
    n_head = _require(config, "num_attention_heads", config_file)
    n_kv_head = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    if head_dim % 2:
        raise ConfigRefusal(f"{config_file}: head_dim {head_dim} is odd; rotary needs it even",
                            keys=("head_dim", "hidden_size", "num_attention_heads"))
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
        **_rope_scaling(config, config_file, head_dim, rope_types),
    }


def _rope_scaling(config: dict, config_file: Path, head_dim: int, allowed: tuple[str, ...]) -> Dims:
    """config.json's `rope_scaling` as llama.cpp expresses it, or a refusal naming its type.

    linear (positions divided by `factor`): rope.scaling.type "linear" and rope.scaling.factor.
    llama3 (Llama 3.1/3.2: long wavelengths divided by `factor`, short ones kept, a smooth blend
    between): one frequency divisor per rotated pair in the tensor rope_freqs.weight, which
    llama.cpp's llama graph divides each frequency by, with rope.scaling.type "none".
    """
    rope = config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind == "default":
        return {"rope_scaling_type": "none"}
    if kind not in allowed:
        supported = f"this architecture's exporter writes {', '.join(allowed)}" if allowed else \
            "this architecture's exporter writes none"
        raise ConfigRefusal(
            f"{config_file}: rope_scaling type {kind!r} ({rope}) is not supported by the GGUF exporter: {supported}",
            "export a model without that rope scaling, or teach edgedistill/export/gguf/arch.py how llama.cpp "
            "expresses it", keys=("rope_scaling",))
    try:
        factor = float(rope["factor"])
        if kind == "linear":
            return {"rope_scaling_type": "linear", "rope_scaling_factor": factor}
        factors = llama3_rope_factors(head_dim, float(config.get("rope_theta", 10000.0)), factor,
                                      float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                                      float(rope["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise ConfigRefusal(f"{config_file}: rope_scaling {rope} is incomplete or invalid for type {kind!r} "
                            f"({type(error).__name__}: {error})", "re-save the model with transformers",
                            keys=("rope_scaling",)) from None
    return {"rope_scaling_type": "none", "rope_freq_factors": factors}


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: float) -> np.ndarray:
    """What Llama 3's rope scaling divides each rotary frequency by (transformers'
    _compute_llama3_parameters, expressed as divisors): 1 for wavelengths shorter than
    original_context / high_freq_factor, `factor` for those longer than original_context /
    low_freq_factor, and a blend of the two frequencies in between."""
    if high_freq_factor == low_freq_factor:
        raise ZeroDivisionError("high_freq_factor equals low_freq_factor")
    # float32, as transformers computes the frequencies it divides
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    wavelength = 2 * np.pi / inv_freq
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelength < original_context / high_freq_factor, 1.0,
                        np.where(wavelength > original_context / low_freq_factor, factor, blended))
    return divisors.astype(np.float32)


def computed_tensors(dims: Dims) -> dict[str, np.ndarray]:
    """GGUF tensors that no checkpoint holds, computed from config.json (in `dims`): llama3 rope's
    rope_freqs.weight. Written after the checkpoint's tensors, in float32."""
    if "rope_freq_factors" not in dims:
        return {}
    return {TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight": np.asarray(dims["rope_freq_factors"], np.float32)}


def llama_dims(config: dict, config_file: Path) -> Dims:
    """Sizes of a llama decoder, with the defaults transformers' LlamaConfig uses."""
    _expect(config, "hidden_act", ("silu",), config_file, "llama.cpp's llama MLP is SiLU")
    # llama.cpp's llama graph reads rope_freqs.weight (its other graphs here do not)
    return _decoder_dims(config, config_file, ("linear", "llama3"))


def mistral_dims(config: dict, config_file: Path) -> Dims:
    """A llama decoder whose attention may be limited to the last `sliding_window` positions.

    llama.cpp's llama graph attends to every position, which equals HF's sliding-window
    attention only up to the window, so the context length written is capped at the window.
    """
    config = {"sliding_window": 4096, "max_position_embeddings": 131072, **config}
    dims = llama_dims(config, config_file)
    if config["sliding_window"]:
        dims["ctx"] = min(dims["ctx"], config["sliding_window"])
    return dims


def qwen_dims(config: dict, config_file: Path) -> Dims:
    """Qwen2/Qwen3 decoders; llama.cpp implements neither's optional sliding-window layers."""
    config = {"max_position_embeddings": 32768, **config}
    _expect(config, "hidden_act", ("silu",), config_file, "llama.cpp's Qwen MLP is SiLU")
    # without layer_types, HF makes the layers from max_window_layers on slide
    sliding = config.get("use_sliding_window") and config.get("sliding_window")
    if sliding and set(config.get("layer_types") or ["sliding_attention"]) != {"full_attention"}:
        raise _refuse(config_file, "use_sliding_window", True, "llama.cpp's Qwen graphs attend to every position",
                      ("sliding_window", "layer_types"))
    return _decoder_dims(config, config_file)


def qwen2_dims(config: dict, config_file: Path) -> Dims:
    dims = qwen_dims(config, config_file)
    if dims["q_dim"] != dims["hidden"]:
        raise _refuse(config_file, "head_dim", dims["head_dim"],
                      "llama.cpp's qwen2 needs num_attention_heads * head_dim == hidden_size",
                      ("num_attention_heads", "hidden_size"))
    return dims


def qwen3_dims(config: dict, config_file: Path) -> Dims:
    return qwen_dims({"head_dim": 128, **config}, config_file)


GEMMA3_DEFAULTS = {  # transformers' Gemma3TextConfig, for keys a config.json leaves out
    "head_dim": 256, "max_position_embeddings": 131072, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6,
}


def gemma3_dims(config: dict, config_file: Path) -> Dims:
    """Text-only Gemma 3: sliding-window layers with their own rope base, logit soft-capping."""
    config = {**GEMMA3_DEFAULTS, **config}
    dims = _decoder_dims(config, config_file)
    _expect(config, "hidden_activation", ("gelu_pytorch_tanh", "gelu_new"), config_file,
            "llama.cpp's gemma3 MLP is GELU with the tanh approximation")
    _expect(config, "attn_logit_softcapping", (None,), config_file, "llama.cpp's gemma3 does not soft-cap attention")
    _expect(config, "use_bidirectional_attention", (False, None), config_file, "llama.cpp's gemma3 is causal")
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B
    scale_dim = dims["hidden"] // dims["n_head"] if dims["n_layer"] == 62 else dims["head_dim"]
    if float(config["query_pre_attn_scalar"]) != scale_dim:
        raise _refuse(config_file, "query_pre_attn_scalar", config["query_pre_attn_scalar"],
                      f"llama.cpp's gemma3 scales queries by 1/sqrt({scale_dim}) for this shape",
                      ("head_dim", "num_hidden_layers", "hidden_size", "num_attention_heads"))
    pattern = config["sliding_window_pattern"]
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(dims["n_layer"])
    ]
    if len(layer_types) != dims["n_layer"] or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise _refuse(config_file, "layer_types", layer_types, "expected one sliding/full entry per layer",
                      ("num_hidden_layers",))
    swa_layers = [kind == "sliding_attention" for kind in layer_types]
    return {
        **dims,
        # 0 tells llama.cpp no layer slides (HF: a window of None)
        "sliding_window": int(config["sliding_window"] or 0) if any(swa_layers) else 0,
        "swa_layers": swa_layers,
        "rope_theta_swa": float(config["rope_local_base_freq"]),
        # 0 turns llama.cpp's soft-capping off, as None does in HF
        "final_softcap": float(config.get("final_logit_softcapping") or 0.0),
    }


U32, F32, ARRAY = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.ARRAY

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

GEMMA3_HPARAMS = LLAMA_HPARAMS + (
    HParam(Keys.Attention.SLIDING_WINDOW, "sliding_window", U32),
    # one bool per layer (llama.cpp also reads this key as an array), exact for any layer_types
    HParam(Keys.Attention.SLIDING_WINDOW_PATTERN, "swa_layers", ARRAY),
    HParam(Keys.Rope.FREQ_BASE_SWA, "rope_theta_swa", F32),
    HParam(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, "final_softcap", F32),
)

_L = "model.layers.{bid}."


def _qkv(bias: bool) -> tuple[TensorRule, ...]:
    return (
        TensorRule(_L + "self_attn.q_proj", MODEL_TENSOR.ATTN_Q, ("q_dim", "hidden"), rope_heads="n_head", bias=bias),
        TensorRule(_L + "self_attn.k_proj", MODEL_TENSOR.ATTN_K, ("kv_dim", "hidden"), rope_heads="n_kv_head",
                   bias=bias),
        TensorRule(_L + "self_attn.v_proj", MODEL_TENSOR.ATTN_V, ("kv_dim", "hidden"), bias=bias),
    )


def _mlp(bias: bool) -> tuple[TensorRule, ...]:
    return (
        TensorRule(_L + "mlp.gate_proj", MODEL_TENSOR.FFN_GATE, ("ff", "hidden"), bias=bias),
        TensorRule(_L + "mlp.up_proj", MODEL_TENSOR.FFN_UP, ("ff", "hidden"), bias=bias),
        TensorRule(_L + "mlp.down_proj", MODEL_TENSOR.FFN_DOWN, ("hidden", "ff"), bias=bias),
    )


EMBEDDING = TensorRule("model.embed_tokens", MODEL_TENSOR.TOKEN_EMBD, ("vocab", "hidden"))
ATTN_NORM = TensorRule(_L + "input_layernorm", MODEL_TENSOR.ATTN_NORM, ("hidden",))
FFN_NORM = TensorRule(_L + "post_attention_layernorm", MODEL_TENSOR.FFN_NORM, ("hidden",))
OUTPUT_NORM = TensorRule("model.norm", MODEL_TENSOR.OUTPUT_NORM, ("hidden",))
O_PROJ = TensorRule(_L + "self_attn.o_proj", MODEL_TENSOR.ATTN_OUT, ("hidden", "q_dim"))
LM_HEAD = TensorRule("lm_head", MODEL_TENSOR.OUTPUT, ("vocab", "hidden"), dropped_when_tied=True)
QK_NORMS = (
    TensorRule(_L + "self_attn.q_norm", MODEL_TENSOR.ATTN_Q_NORM, ("head_dim",)),
    TensorRule(_L + "self_attn.k_norm", MODEL_TENSOR.ATTN_K_NORM, ("head_dim",)),
)

LLAMA_TENSORS = (
    EMBEDDING, ATTN_NORM, *_qkv(bias=True),
    TensorRule(_L + "self_attn.o_proj", MODEL_TENSOR.ATTN_OUT, ("hidden", "q_dim"), bias=True),
    FFN_NORM, *_mlp(bias=True), OUTPUT_NORM, LM_HEAD,
)
# Qwen2 has biases on q/k/v only, and llama.cpp's qwen2 loads no others
QWEN2_TENSORS = (EMBEDDING, ATTN_NORM, *_qkv(bias=True), O_PROJ, FFN_NORM, *_mlp(bias=False), OUTPUT_NORM, LM_HEAD)
# Qwen3's attention_bias would put one on o_proj too, which llama.cpp's qwen3 cannot load
QWEN3_TENSORS = (
    EMBEDDING, ATTN_NORM, *_qkv(bias=False), *QK_NORMS, O_PROJ, FFN_NORM, *_mlp(bias=False), OUTPUT_NORM, LM_HEAD,
)


def _gemma_norm(rule: TensorRule) -> TensorRule:
    # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by weight
    return replace(rule, weight_offset=1.0)


GEMMA3_TENSORS = (
    EMBEDDING, _gemma_norm(ATTN_NORM), *_qkv(bias=False), *map(_gemma_norm, QK_NORMS), O_PROJ,
    _gemma_norm(TensorRule(_L + "post_attention_layernorm", MODEL_TENSOR.ATTN_POST_NORM, ("hidden",))),
    _gemma_norm(TensorRule(_L + "pre_feedforward_layernorm", MODEL_TENSOR.FFN_PRE_NORM, ("hidden",))),
    *_mlp(bias=False),
    _gemma_norm(TensorRule(_L + "post_feedforward_layernorm", MODEL_TENSOR.FFN_POST_NORM, ("hidden",))),
    _gemma_norm(OUTPUT_NORM), LM_HEAD,
)

# rotary inverse frequencies are recomputed by llama.cpp from rope.freq_base; older checkpoints stored them
ROTARY_BUFFERS = (
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"model\.rotary_emb(_local)?\.inv_freq",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("LlamaForCausalLM", MODEL_ARCH.LLAMA, llama_dims, LLAMA_HPARAMS, LLAMA_TENSORS, Rotary.ADJACENT,
             ROTARY_BUFFERS),
    ArchSpec("MistralForCausalLM", MODEL_ARCH.LLAMA, mistral_dims, LLAMA_HPARAMS, LLAMA_TENSORS, Rotary.ADJACENT,
             ROTARY_BUFFERS),
    ArchSpec("Qwen2ForCausalLM", MODEL_ARCH.QWEN2, qwen2_dims, LLAMA_HPARAMS, QWEN2_TENSORS, Rotary.HALVES,
             ROTARY_BUFFERS),
    ArchSpec("Qwen3ForCausalLM", MODEL_ARCH.QWEN3, qwen3_dims, LLAMA_HPARAMS, QWEN3_TENSORS, Rotary.HALVES,
             ROTARY_BUFFERS),
    ArchSpec("Gemma3ForCausalLM", MODEL_ARCH.GEMMA3, gemma3_dims, GEMMA3_HPARAMS, GEMMA3_TENSORS, Rotary.HALVES,
             ROTARY_BUFFERS, tied_default=True),
)


def spec_for(config: dict, config_file: Path) -> ArchSpec:
    """The spec for config.json's architecture; ConfigRefusal (an EdgedistillError) naming the supported ones."""
    names = config.get("architectures") or []
    by_name = {spec.hf_architecture: spec for spec in ARCHITECTURES}
    for arch_name in names:
        if arch_name in by_name:
            return by_name[arch_name]
    raise ConfigRefusal(
        f"{config_file}: architecture {names or 'missing'} is not supported by the GGUF exporter",
        f"supported: {', '.join(sorted(by_name))}",
        keys=("architectures",),
    )


def gguf_layout(config: dict, config_file: Path) -> tuple[ArchSpec, Dims]:
    """The spec and dims of a config.json, after every rule the GGUF exporter applies to the config:
    the writer, the LoRA writer and the imatrix read a model through this, and edgedistill.export.check
    runs it on the run's teacher and future student before the long stages."""
    spec = spec_for(config, config_file)
    return spec, spec.dims(config, config_file)


def permute_rotary_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotary layout to llama.cpp's NORM rope layout.

    HF's rotate_half rotates dim i of each head together with dim i + head_dim/2; llama.cpp's
    llama rope (GGML_ROPE_TYPE_NORM) rotates adjacent dims 2j and 2j+1. Moving row (h, i, j)
    — head h, half i, offset j — to (h, j, i) puts each rotated pair side by side. q and k get the
    same reordering within a head, so q·k, and hence attention, is unchanged. Works on weights
    (rows, hidden) and biases (rows,).
    """
    head_dim = rows.shape[0] // n_head
    halves = rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:])
    return halves.swapaxes(1, 2).reshape(rows.shape)
