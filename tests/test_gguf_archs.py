"""GGUF export of the architectures besides llama, and of rope scaling, checked against PyTorch in llama.cpp.

For Mistral, Qwen2, Qwen3 and Gemma 3 (text-only) the tiny random model of tests/conftest.py
(2 layers, width 64) is written as an F16 GGUF; llama.cpp's logits must match the torch model's and its greedy
continuations must be identical, and a Q8_0 quantization must load. Norm weights and biases are
randomized so that a wrong norm transform (Gemma's 1 + weight), a swapped norm or a misplaced bias
shows in the logits. Rope scaling: Llama 3's (rope_freqs.weight) and linear scaling (llama, and
Gemma 3's full-attention layers) match PyTorch on a 64-token prompt, twice the original context;
other types are refused by name.

    .venv/bin/python -m pytest -q tests/test_gguf_archs.py
"""

from __future__ import annotations

import itertools
import json

import gguf
import numpy as np
import pytest
from conftest import make_tiny_model, tiny_config
from test_export_gguf import PROMPTS, _llama_logits, _load, _torch_greedy, _torch_logits, assert_f16_matches_torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import arch, quantize_gguf, write_gguf
from edgedistill.export.gguf.arch import spec_for

llama_cpp = pytest.importorskip("llama_cpp")

# (tiny_config overrides of the conftest shape, GGUF architecture); between them: tied and untied
# heads, head_dim != hidden/heads
ARCHS = {
    "mistral": (dict(model_type="mistral", sliding_window=None, tie_word_embeddings=False), "llama"),
    "qwen2": (dict(model_type="qwen2"), "qwen2"),
    "qwen3": (dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False), "qwen3"),
    "gemma3": (
        dict(
            model_type="gemma3_text", head_dim=32, query_pre_attn_scalar=32,
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


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tmp_path_factory):
    """(name, torch model, F16 GGUF path) for each architecture; norm weights and biases randomized."""
    out = make_tiny_model(tmp_path_factory.mktemp(request.param), seed=SEED, jitter_norms=True,
                          **ARCHS[request.param][0])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    return request.param, model, write_gguf(out, out.parent / f"{request.param}-f16.gguf")


@pytest.mark.integration
def test_f16_logits_and_greedy_match_torch(exported):
    _, model, gguf_file = exported
    assert_f16_matches_torch(_load(gguf_file), model, PROMPTS)


@pytest.mark.integration
def test_q8_0_loads_and_tracks_torch(exported):
    name, model, gguf_file = exported
    out = quantize_gguf(gguf_file, gguf_file.with_name(f"{name}-q8_0.gguf"), "Q8_0", threads=2)
    got, expected = _llama_logits(_load(out), PROMPTS[1]), _torch_logits(model, PROMPTS[1])
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9


@pytest.mark.integration
def test_metadata_and_norm_offsets(exported):
    name, model, gguf_file = exported
    arch = ARCHS[name][1]
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
    overrides = ARCHS[name][0]
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[overrides["model_type"]]
    return {**tiny_config(**overrides).to_dict(), "architectures": [model_class], **changes}


@pytest.mark.parametrize(("name", "changes", "field"), [
    ("gemma3", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"hidden_activation": "silu"}, "hidden_activation"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "layer_types": None}, "use_sliding_window"),
    ("qwen2", {"head_dim": 32}, "head_dim"),
])
@pytest.mark.unit
def test_configs_llama_cpp_cannot_reproduce_are_refused(tmp_path, name, changes, field):
    # the config is checked before the tokenizer or any tensor is read
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(_config_dict(name, **changes)))
    with pytest.raises(EdgedistillError, match=f"`{field}`"):
        write_gguf(hf_dir, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.unit
def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    config = _config_dict("gemma3", architectures=["Gemma3ForConditionalGeneration"])
    with pytest.raises(EdgedistillError, match="Gemma3ForConditionalGeneration.*not supported") as err:
        spec_for(config, tmp_path / "config.json")
    for supported in ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Gemma3ForCausalLM"]:
        assert supported in err.value.hint


@pytest.mark.unit
def test_mistral_context_is_capped_at_its_sliding_window(tmp_path):
    config = _config_dict("mistral", sliding_window=32)
    spec = spec_for(config, tmp_path / "config.json")
    assert spec.dims(config, tmp_path / "config.json")["ctx"] == 32


# Llama 3.1/3.2's rope scaling with its original context shrunk to 32 positions: on a 64-token prompt the
# long wavelengths (divided by `factor`), the short ones (kept) and one blended pair all occur
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
LONG_PROMPT = [int(i) for i in np.random.default_rng(0).integers(3, 440, 64)]


def _max_logit_gap(gguf_file, model, prompt) -> tuple[float, float]:
    """(largest |llama.cpp - PyTorch| logit over the prompt, largest |PyTorch logit|)."""
    llm = llama_cpp.Llama(model_path=str(gguf_file), logits_all=True, n_ctx=128, verbose=False)
    got, expected = _llama_logits(llm, prompt), _torch_logits(model, prompt)
    llm.close()
    return float(np.abs(got - expected).max()), float(np.abs(expected).max())


@pytest.mark.integration
def test_llama3_rope_scaling_is_written_as_rope_freqs_and_matches_torch(tmp_path, monkeypatch):
    out = make_tiny_model(tmp_path / "llama3", seed=SEED, jitter_norms=True, rope_scaling=LLAMA3_ROPE)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    gguf_file = write_gguf(out, tmp_path / "llama3-f16.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    # the divisors are what transformers' llama3 rope divides the default frequencies by
    default = 1.0 / 10000.0 ** (np.arange(0, 16, 2, dtype=np.float32) / 16)
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    assert np.allclose(factors, default / model.model.rotary_emb.inv_freq.numpy(), rtol=1e-5)
    assert {1.0, 8.0} < set(factors.round(4).tolist())  # kept, divided, and blended pairs
    gap, logit_range = _max_logit_gap(gguf_file, model, LONG_PROMPT)
    assert gap < 1e-2 * logit_range + 1e-3
    llm = _load(gguf_file)
    assert list(itertools.islice(llm.generate(LONG_PROMPT, temp=0.0), 4)) == _torch_greedy(model, LONG_PROMPT, 4)
    # the same file without rope_freqs.weight is the unscaled rope: the test would see it
    monkeypatch.setattr(arch, "computed_tensors", lambda dims: {})
    unscaled = write_gguf(out, tmp_path / "llama3-no-rope-freqs.gguf")
    assert "rope_freqs.weight" not in {t.name for t in gguf.GGUFReader(unscaled).tensors}
    assert _max_logit_gap(unscaled, model, LONG_PROMPT)[0] > 10 * gap


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.integration
def test_linear_rope_scaling_matches_torch(tmp_path, name):
    # Gemma 3 4B and up scale their full-attention layers' rope by 8, the sliding ones not at all
    overrides = ARCHS[name][0] if name in ARCHS else {}
    out = make_tiny_model(tmp_path / name, seed=SEED, jitter_norms=True, **overrides,
                          rope_scaling={"rope_type": "linear", "factor": 8.0})
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    gguf_file = write_gguf(out, tmp_path / f"{name}-f16.gguf")
    arch_name = ARCHS[name][1] if name in ARCHS else "llama"
    fields = {key: field.contents() for key, field in gguf.GGUFReader(gguf_file).fields.items()}
    assert fields[f"{arch_name}.rope.scaling.type"] == "linear" and fields[f"{arch_name}.rope.scaling.factor"] == 8.0
    gap, logit_range = _max_logit_gap(gguf_file, model, LONG_PROMPT)
    assert gap < 1e-2 * logit_range + 1e-3


@pytest.mark.parametrize(("name", "rope"), [
    ("mistral", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("mistral", {"rope_type": "dynamic", "factor": 2.0}),
    ("qwen3", {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16, "factor": 2.0}),
    # llama.cpp reads rope_freqs.weight in its llama graph only
    ("qwen2", LLAMA3_ROPE),
    ("gemma3", LLAMA3_ROPE),
])
@pytest.mark.unit
def test_other_rope_scaling_types_are_refused_by_name(tmp_path, name, rope):
    with pytest.raises(EdgedistillError, match=f"rope_scaling type '{rope['rope_type']}'.*writes linear") as error:
        spec_for(_config_dict(name), tmp_path / "config.json").dims(_config_dict(name, rope_scaling=rope),
                                                                    tmp_path / "config.json")
    assert error.value.keys == ("rope_scaling",)
