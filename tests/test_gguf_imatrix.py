"""Importance matrices: computed in PyTorch, written in llama.cpp's format, used by its quantizer.

    .venv/bin/python -m pytest -q tests/test_gguf_imatrix.py
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import quantize_gguf, write_gguf
from edgedistill.data.calibration import CHUNK_TOKENS, calibration_texts
from edgedistill.export.gguf.imatrix import compute_imatrix, read_imatrix
from conftest import tokenizer_corpus
from test_export_gguf import TEXTS, _llama_logits, _load, _torch_logits
from transformers import LlamaForCausalLM

pytestmark = pytest.mark.integration

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_llama_dir):
    """(hf_dir, torch model, calibration texts, imatrix file, F16 GGUF): the session's tiny llama."""
    hf_dir, out = tiny_llama_dir, tmp_path_factory.mktemp("calibrated")
    texts = tokenizer_corpus() * 3
    imatrix = compute_imatrix(hf_dir, texts, out / "imatrix.gguf", dataset="corpus")
    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    return hf_dir, model, texts, imatrix, write_gguf(hf_dir, out / "calibrated-f16.gguf")


def test_values_are_mean_squared_inputs(calibrated):
    hf_dir, model, texts, imatrix, _ = calibrated
    found = read_imatrix(imatrix)
    tokenizer_ids = [i for text in texts for i in _tokenize(hf_dir, text)]
    assert found.datasets == ["corpus"] and found.chunk_size == min(CHUNK_TOKENS, len(tokenizer_ids))
    # q, k and v read the first block's normed embeddings; computed here without hooks
    n = found.chunk_count * found.chunk_size
    with torch.inference_mode():
        ids = torch.tensor([tokenizer_ids[:n]]).reshape(found.chunk_count, -1)
        normed = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    want = (normed.double() ** 2).reshape(-1, normed.shape[-1]).mean(0).numpy()
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        np.testing.assert_allclose(found.values[name], want, rtol=1e-5)
    # tied: llama.cpp's logits product uses token_embd, so that is where the lm_head input goes
    assert "token_embd.weight" in found.values and "output.weight" not in found.values
    assert len(found.values) == 7 * 2 + 1
    assert all(v.shape == (64,) for k, v in found.values.items() if "ffn_down" not in k)
    assert found.values["blk.1.ffn_down.weight"].shape == (128,)


def _tokenize(hf_dir, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)(text, add_special_tokens=False)["input_ids"]


def test_llama_cpp_quantizes_with_it(calibrated, tmp_path):
    hf_dir, model, _, imatrix, f16 = calibrated
    plain = quantize_gguf(f16, tmp_path / "plain-q4_0.gguf", "Q4_0")
    weighted = quantize_gguf(f16, tmp_path / "imatrix-q4_0.gguf", "Q4_0", imatrix=imatrix)
    fields = {name: field.contents() for name, field in gguf.GGUFReader(weighted).fields.items()
              if name.startswith("quantize.imatrix")}
    assert fields == {"quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.dataset": "corpus",
                      "quantize.imatrix.entries_count": 15,
                      "quantize.imatrix.chunks_count": read_imatrix(imatrix).chunk_count}
    tensors = {t.name: bytes(t.data) for t in gguf.GGUFReader(plain).tensors}
    changed = [t.name for t in gguf.GGUFReader(weighted).tensors if bytes(t.data) != tensors[t.name]]
    assert "blk.0.attn_q.weight" in changed, "the importance matrix changed no rounding"
    prompt = [1, 40, 41, 42, 43, 44]
    got, expected = _llama_logits(_load(weighted), prompt), _torch_logits(model, prompt)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9


def test_calibration_files(calibrated, tmp_path):
    hf_dir = calibrated[0]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    chat = tmp_path / "train.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n"
                    + json.dumps({"text": "plain text row"}) + "\n", encoding="utf-8")
    texts = calibration_texts(chat, tokenizer)
    assert texts == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n", "plain text row"]
    plain = tmp_path / "task.txt"
    plain.write_text("one text\nover lines", encoding="utf-8")
    assert calibration_texts(plain, tokenizer) == ["one text\nover lines"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no"}\n', encoding="utf-8")
    with pytest.raises(EdgedistillError, match="bad.jsonl:1 has neither"):
        calibration_texts(bad, tokenizer)
    with pytest.raises(EdgedistillError, match="not found"):
        calibration_texts(tmp_path / "missing.jsonl", tokenizer)


def test_broken_imatrix_files_are_refused(calibrated, tmp_path):
    f16 = calibrated[4]
    not_gguf = tmp_path / "imatrix.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(EdgedistillError, match="not a GGUF imatrix"):
        quantize_gguf(f16, tmp_path / "x.gguf", "Q4_0", imatrix=not_gguf)
    with pytest.raises(EdgedistillError, match="no <tensor>.in_sum2"):
        quantize_gguf(f16, tmp_path / "x.gguf", "Q4_0", imatrix=f16)  # a model, not an imatrix
    assert not (tmp_path / "x.gguf").exists()


def test_cli_calibration(calibrated, tmp_path):
    hf_dir = calibrated[0]
    texts = tmp_path / "task.txt"
    texts.write_text("\n".join(TEXTS[:4]), encoding="utf-8")
    out = tmp_path / "model-q4_0.gguf"
    assert main(["export", str(hf_dir), "--quant", "q4_0", "--calibration", str(texts), "--out", str(out)]) == 0
    assert gguf.GGUFReader(out).get_field("quantize.imatrix.dataset").contents() == "task.txt"
    assert not list(tmp_path.glob(".*"))  # the scratch folder is gone
