"""GGUF LoRA export, checked by loading base + adapter in llama.cpp against the merged model.

The tiny random llama of tests/conftest.py (2 layers, width 64, untied) gets a PEFT adapter on
every projection with random non-zero lora_B; llama.cpp applying the adapter GGUF to the base GGUF must match the F16 GGUF of
the PEFT-merged model, and the merged torch model.

    .venv/bin/python -m pytest -q tests/test_gguf_lora.py
"""

from __future__ import annotations

import itertools
import json

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import write_gguf
from edgedistill.export.gguf.lora import write_lora_gguf
from edgedistill.runtimes.pytorch import load_model
from conftest import make_tiny_model
from test_export_gguf import PROMPTS, _llama_logits, _torch_logits
from transformers import AutoTokenizer

pytestmark = pytest.mark.integration

llama_cpp = pytest.importorskip("llama_cpp")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(base F16 GGUF, adapter GGUF, merged F16 GGUF, merged torch model, adapter folder, base folder)."""
    root = tmp_path_factory.mktemp("lora")
    base_dir, adapter_dir, merged_dir = root / "base", root / "adapter", root / "merged"
    make_tiny_model(base_dir, tie_word_embeddings=False)
    torch.manual_seed(1)
    adapted = get_peft_model(load_model(base_dir), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                # PEFT starts lora_B at zero, which would make the adapter change nothing. Multiples
                # of 1/64 make B·A exact, so the merged F16 file differs only by rounding W + B·A.
                param.copy_(torch.round(torch.randn_like(param) * 6.4) / 64)
    adapted.save_pretrained(adapter_dir, safe_serialization=True)
    merged = adapted.merge_and_unload().eval()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(merged_dir)

    base_gguf = write_gguf(base_dir, root / "base-f16.gguf")
    adapter_gguf = write_lora_gguf(adapter_dir, base_dir, root / "adapter.gguf")
    merged_gguf = write_gguf(merged_dir, root / "merged-f16.gguf")
    return base_gguf, adapter_gguf, merged_gguf, merged, adapter_dir, base_dir


def _load(gguf_file, lora=None):
    return llama_cpp.Llama(model_path=str(gguf_file), lora_path=str(lora) if lora else None, logits_all=True,
                           n_ctx=128, verbose=False)


def _greedy(llm, prompt: list[int], n: int = 8) -> list[int]:
    llm.reset()
    return list(itertools.islice(llm.generate(prompt, temp=0.0), n))


def _tolerance(logits: np.ndarray) -> float:
    # llama.cpp rounds activations to float16 for F16 matmuls: ~0.2% of the logit range
    return 1e-2 * np.abs(logits).max() + 1e-3


def assert_same_greedy(llm, reference, prompt: list[int]) -> None:
    """Equal greedy continuations, except that they may part where `reference`'s top two tokens tie within tolerance."""
    got, want = _greedy(llm, prompt), _greedy(reference, prompt)
    split = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if split is not None:
        logits = _llama_logits(reference, prompt + want[:split])
        top2 = np.sort(logits[-1])[-2:]
        assert top2[1] - top2[0] < 2 * _tolerance(logits), f"greedy parts at step {split}: {got} != {want}"


def test_base_plus_adapter_matches_merged(exported):
    base_gguf, adapter_gguf, merged_gguf, merged, _, _ = exported
    with_adapter, merged_llm, base_llm = _load(base_gguf, adapter_gguf), _load(merged_gguf), _load(base_gguf)
    for prompt in PROMPTS:
        got, want = _llama_logits(with_adapter, prompt), _llama_logits(merged_llm, prompt)
        assert np.abs(got - want).max() < _tolerance(want)
        assert np.abs(got - _torch_logits(merged, prompt)).max() < _tolerance(want)
        assert (got.argmax(-1) == want.argmax(-1)).all()
        # the adapter matters: without it the logits are far from the merged model's
        assert np.abs(_llama_logits(base_llm, prompt) - want).max() > 0.1 * np.abs(want).max()
        assert_same_greedy(with_adapter, merged_llm, prompt)


def test_adapter_metadata_and_layout(exported):
    _, adapter_gguf, _, _, adapter_dir, _ = exported
    reader = gguf.GGUFReader(adapter_gguf)

    def value(key):
        return reader.fields[key].contents()

    assert value("general.type") == "adapter"
    assert value("adapter.type") == "lora"
    assert value("adapter.lora.alpha") == pytest.approx(ALPHA)
    assert value("general.architecture") == "llama"
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 2 * len(TARGETS)
    # GGUF stores dims reversed: lora_a is (rank, in) = ne [in, rank], lora_b (out, rank) = ne [rank, out]
    assert list(tensors["blk.0.attn_k.weight.lora_a"].shape) == [64, RANK]
    assert list(tensors["blk.0.attn_k.weight.lora_b"].shape) == [RANK, 32]
    peft = load_file(adapter_dir / "adapter_model.safetensors")
    lora_a = peft["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight.lora_a"].data), lora_a)


def test_existing_output_and_foreign_tensors_are_refused(exported, tmp_path):
    _, adapter_gguf, _, _, adapter_dir, base_dir = exported
    with pytest.raises(EdgedistillError, match="already exists"):
        write_lora_gguf(adapter_dir, base_dir, adapter_gguf)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(RANK, 64)
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(EdgedistillError, match="rotary.lora_A"):
        write_lora_gguf(broken, base_dir, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(EdgedistillError, match="use_dora"):
        write_lora_gguf(broken, base_dir, tmp_path / "out.gguf")
