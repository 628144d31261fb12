"""GGUF export of the architectures besides llama, checked against PyTorch in llama.cpp.

For Mistral, Qwen2, Qwen3 and Gemma 3 (text-only) a tiny random model (2 layers, width 64) is
written as an F16 GGUF; llama.cpp's logits must match the torch model's and its greedy
continuations must be identical, and a Q8_0 quantization must load. Norm weights and biases are
randomized so that a wrong norm transform (Gemma's 1 + weight), a swapped norm or a misplaced bias
shows in the logits.

    .venv/bin/python -m pytest -q tests/test_gguf_archs.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
# tokenizer_dir is that file's fixture, used here too.
from test_export_gguf import PROMPTS, _llama_logits, _load, _torch_logits, assert_f16_matches_torch, tokenizer_dir  # noqa: F401
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import quantize_gguf, write_gguf
from edgedistill.export.gguf.arch import spec_for

pytest.importorskip("llama_cpp")

SHAPE = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    # weights this large make attention position-sensitive, so a wrong rotary layout shows in the logits
    initializer_range=0.2,
)
# (model class, config, GGUF architecture); between them: tied and untied heads, head_dim != hidden/heads
ARCHS = {
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, sliding_window=None, tie_word_embeddings=False), "llama"),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPE, tie_word_embeddings=True), "qwen2"),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=False), "qwen3"),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **SHAPE, head_dim=32, query_pre_attn_scalar=32, tie_word_embeddings=True,
            # a window shorter than PROMPTS[1], on the first layer only; distinct rope bases per kind
            sliding_window=4, layer_types=["sliding_attention", "full_attention"],
            rope_theta=10000.0, rope_local_base_freq=100.0, final_logit_softcapping=10.0,
        ),
        "gemma3",
    ),
}


# with these weights no greedy step of PROMPTS is a near-tie (top-2 logits closer than llama.cpp's
# float16 rounding), which would make the continuations differ without anything being wrong
SEED = 3


def _save_model(out: Path, name: str, vocab_size: int):
    model_class, config, _ = ARCHS[name]
    config = config.__class__.from_dict({**config.to_dict(), "vocab_size": vocab_size})
    torch.manual_seed(SEED)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith(".bias"):  # initialized to constants
                param.add_(0.2 * torch.randn_like(param))
            # F16 GGUF stores float16 weights; rounding here leaves only runtime differences to compare
            param.copy_(param.half().float())
    model.save_pretrained(out, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tmp_path_factory, tokenizer_dir):
    """(name, torch model, F16 GGUF path) for each architecture."""
    out = tmp_path_factory.mktemp(request.param)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    model = _save_model(out, request.param, len(PreTrainedTokenizerFast.from_pretrained(out)))
    return request.param, model, write_gguf(out, out.parent / f"{request.param}-f16.gguf")


def test_f16_logits_and_greedy_match_torch(exported):
    _, model, gguf_file = exported
    assert_f16_matches_torch(_load(gguf_file), model, PROMPTS)


def test_q8_0_loads_and_tracks_torch(exported):
    name, model, gguf_file = exported
    out = quantize_gguf(gguf_file, gguf_file.with_name(f"{name}-q8_0.gguf"), "Q8_0", threads=2)
    got, expected = _llama_logits(_load(out), PROMPTS[1]), _torch_logits(model, PROMPTS[1])
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9


def test_metadata_and_norm_offsets(exported):
    name, model, gguf_file = exported
    arch = ARCHS[name][2]
    reader = gguf.GGUFReader(gguf_file)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    config = model.config
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.key_length"] == {"qwen3": 32, "gemma3": 32}.get(name, 16)
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings)
    if name == "qwen2":
        assert "blk.0.attn_q.bias" in tensors and "blk.0.attn_output.bias" not in tensors
    if name == "gemma3":
        assert fields["gemma3.attention.sliding_window"] == 4
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
        assert fields["gemma3.rope.freq_base"] == 10000.0 and fields["gemma3.rope.freq_base_swa"] == 100.0
        assert fields["gemma3.final_logit_softcapping"] == 10.0
        q_norm = model.model.layers[1].self_attn.q_norm.weight.detach().numpy()
        assert np.allclose(tensors["blk.1.attn_q_norm.weight"].data, q_norm + 1)
        assert len(tensors) == 1 + 13 * 2 + 1


def _config_dict(name: str, **changes) -> dict:
    model_class, config, _ = ARCHS[name]
    return {**config.to_dict(), "architectures": [model_class.__name__], **changes}


@pytest.mark.parametrize(("name", "changes", "field"), [
    ("gemma3", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"hidden_activation": "silu"}, "hidden_activation"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "layer_types": None}, "use_sliding_window"),
    ("qwen2", {"head_dim": 32}, "head_dim"),
])
def test_configs_llama_cpp_cannot_reproduce_are_refused(tmp_path, name, changes, field):
    # the config is checked before the tokenizer or any tensor is read
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(_config_dict(name, **changes)))
    with pytest.raises(EdgedistillError, match=f"`{field}`"):
        write_gguf(hf_dir, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    config = _config_dict("gemma3", architectures=["Gemma3ForConditionalGeneration"])
    with pytest.raises(EdgedistillError, match="Gemma3ForConditionalGeneration.*not supported") as err:
        spec_for(config, tmp_path / "config.json")
    for supported in ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Gemma3ForCausalLM"]:
        assert supported in err.value.hint


def test_mistral_context_is_capped_at_its_sliding_window(tmp_path):
    config = _config_dict("mistral", sliding_window=32)
    spec = spec_for(config, tmp_path / "config.json")
    assert spec.dims(config, tmp_path / "config.json")["ctx"] == 32
