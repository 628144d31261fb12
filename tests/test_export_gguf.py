"""HF → GGUF export and quantization, checked by loading the result in llama.cpp.

The session's tiny random llamas (tests/conftest.py: 2 layers, width 64, a byte-level BPE
tokenizer trained there); every check compares llama.cpp against the torch model or the HF tokenizer.

    .venv/bin/python -m pytest -q tests/test_export_gguf.py
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import CHATML, make_tiny_model
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import ARCHITECTURES, quantize_gguf, write_gguf
from edgedistill.export.gguf.arch import permute_rotary_rows
from edgedistill.export.gguf.tokenizer import pre_tokenizer_name

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = [[1, 40, 41, 42], [5, 17, 42, 100, 7, 300, 8, 9, 10, 11, 5, 17, 42], [3]]
TEXTS = [
    "Hello world",
    "spaces   runs  \n\n\tand\ttabs    end ",
    "digits 12345 and 3.14159, 2024-11-05",
    "café naïve Zürich Ærø",
    "emoji 🚀🎉 done 👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module", params=["tied", "untied_padded_vocab"])
def exported(request, tmp_path_factory):
    """(hf_dir, torch model, F16 GGUF path): the session's tiny llama, then its untied twin whose
    vocab is padded to 512 rows."""
    hf_dir = request.getfixturevalue("tiny_llama_dir" if request.param == "tied" else "tiny_llama_untied_dir")
    gguf_file = write_gguf(hf_dir, tmp_path_factory.mktemp("gguf") / f"{request.param}-f16.gguf")
    return hf_dir, LlamaForCausalLM.from_pretrained(hf_dir).eval(), gguf_file


def _load(gguf_file: Path):
    # llama.cpp is built without its AMX kernels by setup.sh (they segfault on this CPU).
    return llama_cpp.Llama(model_path=str(gguf_file), logits_all=True, n_ctx=128, verbose=False)


def _llama_logits(llm, prompt: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(prompt)
    return np.array(llm.scores[: len(prompt)])


def _torch_logits(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_torch_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def assert_f16_matches_torch(llm, model, prompts: list[list[int]]) -> None:
    """llama.cpp's logits at every position and its greedy continuation equal PyTorch's."""
    for prompt in prompts:
        expected, got = _torch_logits(model, prompt), _llama_logits(llm, prompt)
        assert got.shape == expected.shape
        # llama.cpp rounds activations to float16 for F16 matmuls: ~0.2% of the logit range
        assert np.abs(got - expected).max() < 1e-2 * np.abs(expected).max() + 1e-3
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        llm.reset()
        continuation = list(itertools.islice(llm.generate(prompt, temp=0.0), 8))
        expected_ids = _torch_greedy(model, prompt, 8)
        top2 = np.sort(_torch_logits(model, prompt + expected_ids), axis=-1)[len(prompt) - 1 : -1, -2:]
        assert continuation == expected_ids, f"torch's top-2 margins per step: {np.diff(top2).ravel()}"


@pytest.mark.integration
def test_f16_logits_and_greedy_match_torch(exported):
    _, model, gguf_file = exported
    assert_f16_matches_torch(_load(gguf_file), model, PROMPTS)


@pytest.mark.integration
def test_llama_cpp_tokenizes_like_hf(exported):
    hf_dir, _, gguf_file = exported
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    llm = _load(gguf_file)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf_tokenizer.encode(
            text, add_special_tokens=False
        ), text
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert llm.detokenize(ids, special=True).decode() == text


@pytest.mark.integration
def test_gguf_metadata(exported):
    hf_dir, model, gguf_file = exported
    reader = gguf.GGUFReader(gguf_file)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == hf_dir.name
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["llama.block_count"] == 2
    assert fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.context_length"] == 256
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "smollm"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == CHATML

    vocab_size = model.config.vocab_size
    assert fields["llama.vocab_size"] == vocab_size
    token_types = fields["tokenizer.ggml.token_type"]
    assert len(fields["tokenizer.ggml.tokens"]) == len(token_types) == vocab_size
    assert token_types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL]
    n_tokens = len(PreTrainedTokenizerFast.from_pretrained(hf_dir))
    assert set(token_types[n_tokens:]) <= {gguf.TokenType.UNUSED}

    tensor_types = {t.name: t.tensor_type for t in reader.tensors}
    assert ("output.weight" in tensor_types) == (not model.config.tie_word_embeddings)
    assert tensor_types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert tensor_types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(tensor_types) == 2 + 9 * 2 + (not model.config.tie_word_embeddings)
    assert not list(gguf_file.parent.glob(".*.partial"))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
@pytest.mark.integration
def test_quantized_files_load_and_shrink(exported, qtype):
    _, model, gguf_file = exported
    out = quantize_gguf(gguf_file, gguf_file.with_name(f"{gguf_file.stem}-{qtype}.gguf"), qtype, threads=2)
    assert 0 < out.stat().st_size < gguf_file.stat().st_size
    prompt = PROMPTS[1]
    got, expected = _llama_logits(_load(out), prompt), _torch_logits(model, prompt)
    # lossy, so only sanity: same shape, finite, still tracking the model
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9


@pytest.mark.integration
def test_q4_k_m_uses_k_quants_when_rows_are_256_wide(tmp_path):
    # width 64 makes llama.cpp fall back to q5_0/q8_0; width 256 gets real K-quants
    hf_dir = make_tiny_model(tmp_path / "wide", hidden_size=256, intermediate_size=512)
    f16 = write_gguf(hf_dir, hf_dir / "wide-f16.gguf")
    q4 = quantize_gguf(f16, hf_dir / "wide-q4_k_m.gguf", "q4_k_m")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q4).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert gguf.GGMLQuantizationType.Q6_K in types.values()
    assert len(_llama_logits(_load(q4), PROMPTS[0])) == len(PROMPTS[0])


def _broken_copy(hf_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(hf_dir, out, ignore=shutil.ignore_patterns("*.gguf"))
    return out


@pytest.mark.integration
def test_unknown_architecture_is_refused(exported, tmp_path):
    hf_dir = _broken_copy(exported[0], tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["FalconMambaForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgedistillError, match="FalconMambaForCausalLM.*not supported") as err:
        write_gguf(hf_dir, tmp_path / "out.gguf")
    assert "LlamaForCausalLM" in err.value.hint
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.partial"))


@pytest.mark.integration
def test_missing_and_extra_tensors_are_refused(exported, tmp_path):
    hf_dir = _broken_copy(exported[0], tmp_path)
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EdgedistillError) as err:
        write_gguf(hf_dir, tmp_path / "out.gguf")
    assert "model.layers.1.mlp.up_proj.weight" in err.value.problem
    assert "model.layers.0.mystery.weight" in err.value.problem
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.integration
def test_failure_while_writing_leaves_no_file(exported, tmp_path):
    hf_dir = _broken_copy(exported[0], tmp_path)
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6  # beyond float16
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EdgedistillError, match="down_proj.*float16"):
        write_gguf(hf_dir, tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.integration
def test_existing_output_needs_overwrite(exported, tmp_path):
    hf_dir, _, gguf_file = exported
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(EdgedistillError, match="already exists"):
        write_gguf(hf_dir, out)
    with pytest.raises(EdgedistillError, match="already exists"):
        quantize_gguf(gguf_file, out, "Q8_0")
    assert out.read_bytes() == b"keep me"
    write_gguf(hf_dir, out, overwrite=True)
    assert out.read_bytes() == gguf_file.read_bytes()


@pytest.mark.integration
def test_quantize_errors(exported, tmp_path):
    gguf_file = exported[2]
    with pytest.raises(EdgedistillError, match="unknown GGUF quantization 'Q3_X'") as err:
        quantize_gguf(gguf_file, tmp_path / "q.gguf", "Q3_X")
    assert "Q4_K_M" in err.value.hint
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(EdgedistillError, match="could not quantize"):
        quantize_gguf(not_gguf, tmp_path / "q.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.gguf"]


@pytest.mark.unit
def test_pre_tokenizer_table():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}, Path("t")) == "smollm"
    assert pre_tokenizer_name(byte_level, Path("t")) == "gpt-2"
    with pytest.raises(EdgedistillError, match='"add_prefix_space": true'):
        pre_tokenizer_name({**byte_level, "add_prefix_space": True}, Path("t"))
    with pytest.raises(EdgedistillError, match="Whitespace"):
        pre_tokenizer_name({"type": "Whitespace"}, Path("t"))


@pytest.mark.unit
def test_rotary_permutation_pairs_rotated_dims():
    n_head, head_dim = 2, 8
    rows = np.arange(n_head * head_dim, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    permuted = permute_rotary_rows(rows, n_head)
    for head, j in itertools.product(range(n_head), range(head_dim // 2)):
        # HF rotates dim j with dim j + head_dim/2; llama.cpp rotates 2j with 2j+1
        base = head * head_dim
        assert permuted[base + 2 * j, 0] == base + j
        assert permuted[base + 2 * j + 1, 0] == base + j + head_dim // 2
    assert np.array_equal(permute_rotary_rows(rows[:, 0], n_head), permuted[:, 0])


@pytest.mark.unit
def test_architecture_tables_name_real_gguf_tensors():
    for spec in ARCHITECTURES:
        allowed = set(gguf.MODEL_TENSORS[spec.gguf_arch])
        assert {rule.tensor for rule in spec.tensors} <= allowed, spec.hf_architecture


@pytest.mark.parametrize("keep_bytes", [4, 60, -1000])
@pytest.mark.integration
def test_truncated_safetensors_are_named(exported, tmp_path, keep_bytes):
    hf_dir = _broken_copy(exported[0], tmp_path)
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep_bytes])
    with pytest.raises(EdgedistillError, match="model.safetensors is damaged or truncated") as err:
        write_gguf(hf_dir, tmp_path / "out.gguf")
    assert "save the model again" in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.integration
def test_tokenizer_larger_than_the_embedding_is_refused(exported, tmp_path):
    hf_dir = _broken_copy(exported[0], tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    n_tokens = len(PreTrainedTokenizerFast.from_pretrained(hf_dir))
    tensors = load_file(hf_dir / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = tensors[name][: n_tokens - 10].clone()
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps({**config, "vocab_size": n_tokens - 10}))
    with pytest.raises(EdgedistillError, match=f"ids up to {n_tokens - 1} but the model's vocab_size is {n_tokens - 10}"):
        write_gguf(hf_dir, tmp_path / "out.gguf")


@pytest.mark.integration
def test_no_room_to_write_is_a_clear_error(exported, tmp_path):
    # A real failing write, not a mock: a subprocess whose file size limit (RLIMIT_FSIZE) is below
    # the model's size gets EFBIG from the kernel part-way through, as a full disk gives ENOSPC.
    hf_dir = exported[0]
    script = f"""
import resource, signal
from pathlib import Path
from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import write_gguf
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
try:
    write_gguf(Path({str(hf_dir)!r}), Path({str(tmp_path / "out.gguf")!r}))
except EdgedistillError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "no room to write" in done.stdout and "partial file was removed" in done.stdout, done.stderr
    assert list(tmp_path.iterdir()) == []
