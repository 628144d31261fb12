"""The student stage: importance scores, depth and width pruning, a given student, and GGUF export
of a width-pruned student checked in llama.cpp.

The tiny random llama of tests/conftest.py made 6 layers deep (width 64, 4 heads in 2 KV groups,
MLP 128), one block of it passing its input through.

    .venv/bin/python -m pytest -q tests/test_student.py
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SHAPE, make_tiny_model, student_recipe
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from edgedistill.distill.importance import compute_importance
from edgedistill.distill.student import build_student, count_parameters, important_layers, prune_width
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe

SYLLABLES = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "de", "va"]
WORDS = ["".join(pair) for pair in itertools.product(SYLLABLES, repeat=2)]
IDENTITY_BLOCK = 2
LAYERS = 6
HIDDEN, HEADS, KV_HEADS, FF = (TINY_SHAPE[key] for key in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                           "intermediate_size"))


def _pass_through(block: int):
    def edit(model) -> None:
        # Both residual branches write nothing: the block passes its input through unchanged.
        model.model.layers[block].self_attn.o_proj.weight.zero_()
        model.model.layers[block].mlp.down_proj.weight.zero_()
    return edit


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("teacher"), num_hidden_layers=LAYERS,
                           edit=_pass_through(IDENTITY_BLOCK))


@pytest.fixture(scope="module")
def generate(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generate")
    rows = []
    for i in range(10):
        # Conversations of different lengths, so batches carry padding.
        question = " ".join(WORDS[i * 7: i * 7 + 3 + 2 * i])
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": WORDS[i]}]
        rows.append(json.dumps({"id": str(i), "messages": messages, "label": "x"}))
    (out / "train.jsonl").write_text("\n".join(rows) + "\n")
    return out


def _recipe(generate: Path, **student) -> Recipe:
    return student_recipe(generate / "train.jsonl", **student)


def _sequences(teacher: Path) -> list[list[int]]:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher)
    return [tokenizer.encode(" ".join(WORDS[i: i + n])) for i, n in ((0, 3), (10, 9), (30, 1), (50, 6))]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.integration
def test_importance_shapes_and_identity_block(teacher):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    sequences = _sequences(teacher)
    scores = compute_importance(model, sequences, batch_size=4, pad_id=2)
    assert len(scores.blocks) == len(scores.channels) == len(scores.heads) == LAYERS
    assert all(c.shape == (FF,) for c in scores.channels) and all(h.shape == (HEADS,) for h in scores.heads)
    assert scores.tokens == sum(map(len, sequences)) and scores.sequences == len(sequences)
    assert scores.blocks[IDENTITY_BLOCK] < 1e-6
    assert min(b for i, b in enumerate(scores.blocks) if i != IDENTITY_BLOCK) > 1e-3
    assert all((c >= 0).all() and (h > 0).all() for c, h in zip(scores.channels, scores.heads))


@pytest.mark.integration
def test_importance_excludes_padding(teacher):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    one_by_one = compute_importance(model, _sequences(teacher), batch_size=1, pad_id=2)
    padded = compute_importance(model, _sequences(teacher), batch_size=4, pad_id=2)
    assert np.allclose(one_by_one.blocks, padded.blocks, atol=1e-5)
    for a, b in zip(one_by_one.channels + one_by_one.heads, padded.channels + padded.heads):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.unit
def test_important_layers_pin_first_and_last():
    assert important_layers([0.0, 0.9, 0.1, 0.8, 0.2, 0.0], 4) == [0, 1, 3, 5]
    assert important_layers([0.5, 0.9, 0.1], 1) == [0]
    with pytest.raises(EdgedistillError, match="keep_layers is 4"):
        important_layers([0.1, 0.2, 0.3], 4)


@pytest.mark.integration
def test_importance_selection_drops_the_identity_block_first(teacher, generate, tmp_path):
    result = build_student(_recipe(generate, keep_layers=5, layer_selection="importance"), tmp_path,
                           teacher=teacher, generate=generate)
    assert result["kept_layers"] == [i for i in range(LAYERS) if i != IDENTITY_BLOCK]
    assert len(result["block_importance"]) == LAYERS and result["block_importance"][IDENTITY_BLOCK] < 1e-6
    assert result["calibration"]["sequences"] == 10 and result["layer_selection"] == "importance"
    student = AutoModelForCausalLM.from_pretrained(tmp_path)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher)
    # Dropping a block that passes its input through changes nothing.
    ids = _sequences(teacher)[1]
    assert torch.allclose(_logits(student, ids), _logits(teacher_model, ids), atol=1e-4)


def _block_params(q_heads: int, kv_heads: int, ff: int, head_dim: int = HIDDEN // HEADS) -> int:
    attention = 2 * HIDDEN * q_heads * head_dim + 2 * HIDDEN * kv_heads * head_dim
    return attention + 3 * HIDDEN * ff + 2 * HIDDEN


@pytest.mark.integration
def test_width_pruned_student_reloads_with_the_expected_size(teacher, generate, tmp_path):
    recipe = _recipe(generate, keep_layers=4, width={"intermediate_size": 48, "num_attention_heads": 2})
    result = build_student(recipe, tmp_path, teacher=teacher, generate=generate)
    assert result["width"]["num_key_value_heads"] == 1 and result["width"]["head_dim"] == HIDDEN // HEADS
    assert len(result["width"]["kept_kv_groups"]) == 4
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (4, 48, 2, 1, 16)
    vocab = config["vocab_size"]
    embeddings = vocab * HIDDEN + HIDDEN
    assert result["teacher_parameters"] == embeddings + LAYERS * _block_params(HEADS, KV_HEADS, FF)
    assert result["student_parameters"] == embeddings + 4 * _block_params(2, 1, 48)
    assert count_parameters(AutoModelForCausalLM.from_pretrained(tmp_path)) == result["student_parameters"]
    assert (tmp_path / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()


@pytest.mark.integration
def test_width_pruning_equals_masking_what_it_drops(teacher, tmp_path):
    """Dropping a KV group and MLP channels gives the teacher's logits with those outputs zeroed."""
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    masked = AutoModelForCausalLM.from_pretrained(teacher).eval()
    head_dim = HIDDEN // HEADS
    # Group 1 (query heads 2 and 3, KV head 1) scores higher everywhere; channels prefer odd indices.
    heads = [torch.tensor([1.0, 1.0, 2.0, 2.0])] * LAYERS
    channels = [torch.arange(FF, dtype=torch.float32) % 2 + torch.rand(FF) * 0.1] * LAYERS
    result = prune_width(model, channels, heads, intermediate_size=FF // 2, num_attention_heads=2)
    assert result["kept_kv_groups"] == [[1]] * LAYERS
    with torch.no_grad():
        for layer in masked.model.layers:
            layer.self_attn.o_proj.weight[:, : 2 * head_dim] = 0
            layer.mlp.down_proj.weight[:, 0::2] = 0
    ids = _sequences(teacher)[1]
    assert torch.allclose(_logits(model, ids), _logits(masked, ids), atol=1e-4)
    original = masked.model.layers[0].self_attn
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, original.k_proj.weight[head_dim:])
    # The saved model reloads (valid GQA config) and gives the in-memory model's logits.
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.head_dim == head_dim and reloaded.config.num_key_value_heads == 1
    assert torch.allclose(_logits(reloaded, ids), _logits(model, ids), atol=1e-6)


@pytest.mark.integration
def test_full_width_is_unchanged(teacher):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    reference = AutoModelForCausalLM.from_pretrained(teacher).eval()
    scores = compute_importance(model, _sequences(teacher), pad_id=2)
    prune_width(model, scores.channels, scores.heads, intermediate_size=FF, num_attention_heads=HEADS)
    ids = _sequences(teacher)[0]
    assert torch.allclose(_logits(model, ids), _logits(reference, ids), atol=1e-6)


@pytest.mark.parametrize("student, message", [
    ({"keep_layers": 6, "width": {"intermediate_size": 200}}, r"(?s)student.width.intermediate_size is 200.*1\.\.128"),
    ({"keep_layers": 6, "width": {"num_attention_heads": 3}}, r"(?s)student.width.num_attention_heads is 3.*2, 4"),
    ({"keep_layers": 6, "width": {"num_attention_heads": 8}}, r"num_attention_heads is 8"),
    ({"keep_layers": 7, "layer_selection": "importance"}, r"(?s)keep_layers is 7.*6 layers"),
    ({"keep_layers": [0, 5], "layer_selection": "importance"}, r"layer_selection is 'importance'"),
])
@pytest.mark.integration
def test_impossible_students_are_errors(teacher, generate, tmp_path, student, message):
    with pytest.raises(EdgedistillError, match=message):
        build_student(_recipe(generate, **student), tmp_path, teacher=teacher, generate=generate)


@pytest.mark.integration
def test_importance_needs_the_generate_folder(teacher, generate, tmp_path):
    with pytest.raises(EdgedistillError, match="generate"):
        build_student(_recipe(generate, keep_layers=3, layer_selection="importance"), tmp_path, teacher=teacher)


@pytest.mark.integration
def test_given_student_with_the_teachers_tokenizer(teacher, generate, tmp_path):
    source = make_tiny_model(tmp_path / "small", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "leftover.txt").write_text("from a killed attempt")
    result = build_student(_recipe(generate, method="given", source=str(source)), out, teacher=teacher)
    assert result["method"] == "given" and result["source_kind"] == "hf"
    assert result["student_parameters"] < result["teacher_parameters"]
    assert not (out / "leftover.txt").exists()
    assert (out / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.integration
def test_given_student_with_another_tokenizer_is_an_error(teacher, generate, tmp_path):
    source = make_tiny_model(tmp_path / "other", tokenizer_vocab_size=280)
    with pytest.raises(EdgedistillError, match="needs identical tokenizers") as error:
        build_student(_recipe(generate, method="given", source=str(source)), tmp_path / "out", teacher=teacher)
    assert "vocabularies differ" in str(error.value) and "kl_weight: 0" in error.value.hint


@pytest.mark.integration
def test_width_pruned_student_gguf_matches_torch(teacher, generate, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from edgedistill.export.gguf import write_gguf

    student_dir = tmp_path / "student"
    student_dir.mkdir()
    recipe = _recipe(generate, keep_layers=4, layer_selection="importance",
                     width={"intermediate_size": 64, "num_attention_heads": 2})
    build_student(recipe, student_dir, teacher=teacher, generate=generate)
    # head_dim 16 with hidden 64 and 2 heads: hidden / n_head would wrongly say 32
    assert json.loads((student_dir / "config.json").read_text())["head_dim"] == 16
    gguf_file = write_gguf(student_dir, tmp_path / "student-f16.gguf")
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    llm = llama_cpp.Llama(model_path=str(gguf_file), logits_all=True, n_ctx=128, verbose=False)
    for ids in _sequences(teacher):
        llm.reset()
        llm.eval(ids)
        got, expected = np.array(llm.scores[: len(ids)]), _logits(model, ids).numpy()
        # llama.cpp rounds activations to float16 for F16 matmuls: ~0.2% of the logit range
        assert np.abs(got - expected).max() < 1e-2 * np.abs(expected).max() + 1e-3
        assert (got.argmax(-1) == expected.argmax(-1)).all()
