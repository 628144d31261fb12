"""Hidden-size (residual-stream) pruning: its importance scores, exactness on a stream whose dropped
channels are silent, composition with depth/head/MLP pruning, bad input, and the exports of a
hidden-pruned student (GGUF F16 and Q4_K_M in llama.cpp, ONNX int4 in ONNX Runtime GenAI) checked
against the PyTorch student by the exporters' own verification.

The tiny random llama of tests/conftest.py (width 64, 4 heads in 2 KV groups of head_dim 16, MLP 128).

    .venv/bin/python -m pytest -q tests/test_hidden_prune.py
    .venv/bin/python -m pytest -q -m slow tests/test_hidden_prune.py     # the exports (about 70 s)
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_SHAPE, build_tiny_model, make_tiny_model, make_tiny_tokenizer, student_recipe
from transformers import AutoModelForCausalLM

from edgedistill.distill.importance import compute_importance
from edgedistill.distill.student import build_student, count_parameters, hidden_size_notes, prune_hidden
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import Recipe

HIDDEN, HEADS, FF = (TINY_SHAPE[key] for key in ("hidden_size", "num_attention_heads", "intermediate_size"))
HEAD_DIM = HIDDEN // HEADS
LAYERS = 4
WORDS = ["".join(pair) for pair in itertools.product(["ka", "lo", "mi", "ne", "tu", "ra", "si", "po"], repeat=2)]
# hidden channels made silent (zero everywhere in the residual stream) in the exactness test
SILENT = list(range(0, HIDDEN, 4))


def _sequences() -> list[list[int]]:
    tokenizer = make_tiny_tokenizer()
    return [tokenizer.encode(" ".join(WORDS[i: i + n])) for i, n in ((0, 5), (8, 11), (30, 2))]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _silence(model) -> None:
    # nothing writes to the SILENT channels: the embeddings and both residual branches leave them at 0
    model.model.embed_tokens.weight[:, SILENT] = 0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[SILENT] = 0
        layer.mlp.down_proj.weight[SILENT] = 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("teacher"), num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def generate(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generate")
    rows = [json.dumps({"id": str(i), "messages": [{"role": "user", "content": " ".join(WORDS[i * 5: i * 5 + 2 + i])},
                                                    {"role": "assistant", "content": WORDS[i]}], "label": "x"})
            for i in range(8)]
    (out / "train.jsonl").write_text("\n".join(rows) + "\n")
    return out


def _recipe(generate: Path, **student) -> Recipe:
    return student_recipe(generate / "train.jsonl", **student)


@pytest.mark.unit
def test_hidden_scores_and_norm_energy_per_block():
    model = build_tiny_model(num_hidden_layers=LAYERS, edit=_silence)
    scores = compute_importance(model, _sequences(), batch_size=2, pad_id=2)
    assert len(scores.hidden) == LAYERS and all(h.shape == (HIDDEN,) for h in scores.hidden)
    assert scores.hidden_final.shape == (HIDDEN,)
    assert set(scores.norm_energy) == {f"model.layers.{i}.{n}" for i in range(LAYERS)
                                       for n in ("input_layernorm", "post_attention_layernorm")} | {"model.norm"}
    for per_channel in [*scores.hidden, scores.hidden_final, *scores.norm_energy.values()]:
        assert (per_channel[SILENT] == 0).all()
        assert (per_channel[[c for c in range(HIDDEN) if c not in SILENT]] > 0).all()


@pytest.mark.unit
def test_pruning_silent_channels_keeps_the_logits():
    """With the dropped channels silent, the pruned model must give the teacher's logits exactly:
    every tensor sliced on the same channels, and each norm rescaled for the narrower mean square."""
    model = build_tiny_model(num_hidden_layers=LAYERS, edit=_silence, jitter_norms=True)
    reference = build_tiny_model(num_hidden_layers=LAYERS, edit=_silence, jitter_norms=True)
    scores = compute_importance(model, _sequences(), pad_id=2)
    kept = HIDDEN - len(SILENT)
    summed = torch.stack([*scores.hidden, scores.hidden_final]).sum(dim=0)
    result = prune_hidden(model, summed, kept, scores.norm_energy)
    assert result["hidden_size"] == kept and result["head_dim"] == HEAD_DIM
    assert set(result["kept_energy_share_by_norm"].values()) == {1.0}
    assert model.config.hidden_size == kept and model.config.head_dim == HEAD_DIM
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.layers[0].self_attn.q_proj.in_features == kept
    assert model.model.layers[0].mlp.down_proj.out_features == kept
    for ids in _sequences():
        assert torch.allclose(_logits(model, ids), _logits(reference, ids), atol=1e-4)


@pytest.mark.unit
def test_untied_head_is_pruned_with_the_embeddings():
    model = build_tiny_model(tie_word_embeddings=False, edit=_silence)
    reference = build_tiny_model(tie_word_embeddings=False, edit=_silence)
    scores = compute_importance(model, _sequences(), pad_id=2)
    prune_hidden(model, torch.stack([*scores.hidden, scores.hidden_final]).sum(dim=0), HIDDEN - len(SILENT),
                 scores.norm_energy)
    assert model.lm_head.weight.shape == (model.config.vocab_size, HIDDEN - len(SILENT))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids = _sequences()[1]
    assert torch.allclose(_logits(model, ids), _logits(reference, ids), atol=1e-4)


@pytest.mark.integration
def test_hidden_pruning_composes_with_depth_heads_and_mlp(teacher, generate, tmp_path):
    recipe = _recipe(generate, keep_layers=3, layer_selection="importance",
                     width={"hidden_size": 32, "intermediate_size": 96, "num_attention_heads": 2})
    result = build_student(recipe, tmp_path, teacher=teacher, generate=generate)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (3, 32, 96, 2, 1, 16)
    assert result["width"]["hidden_size"] == 32 and "hidden_size_notes" in result["width"]  # 32: not 256
    # one share per pruned norm: 2 per kept block and the final one
    assert len(result["width"]["kept_energy_share_by_norm"]) == 2 * 3 + 1
    student = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    vocab = config["vocab_size"]
    attention = 32 * 2 * HEAD_DIM * 2 + 32 * 1 * HEAD_DIM * 2  # q and o; k and v of one KV head
    block = attention + 3 * 32 * 96 + 2 * 32
    assert count_parameters(student) == result["student_parameters"] == vocab * 32 + 32 + 3 * block
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    logits = _logits(student, _sequences()[0])
    assert logits.shape[-1] == vocab and torch.isfinite(logits).all()


@pytest.mark.unit
def test_exporter_grid_notes():
    assert hidden_size_notes(512) == []
    assert [n.split(":")[0] for n in hidden_size_notes(384)] == ["hidden_size 384 is not a multiple of 256"]
    assert len(hidden_size_notes(40)) == 2 and "ONNX int4" in hidden_size_notes(40)[1]


@pytest.mark.integration
def test_bad_hidden_sizes(teacher, generate, tmp_path):
    with pytest.raises(EdgedistillError, match=r"(?s)student.width.hidden_size is 65.*1\.\.64"):
        build_student(_recipe(generate, keep_layers=2, width={"hidden_size": 65}), tmp_path, teacher=teacher,
                      generate=generate)
    with pytest.raises(ValueError, match="hidden_size"):
        _recipe(generate, keep_layers=2, width={"hidden_size": 0})


@pytest.mark.unit
def test_architecture_with_a_hidden_dependent_scale_is_refused():
    gemma = build_tiny_model(model_type="gemma3_text", head_dim=16)
    with pytest.raises(EdgedistillError, match="sqrt"):
        prune_hidden(gemma, torch.rand(HIDDEN), 32)


@pytest.mark.unit
def test_unknown_tensor_is_refused():
    model = build_tiny_model()
    model.model.layers[0].mlp.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(HIDDEN)))
    with pytest.raises(EdgedistillError, match="mlp.extra_scale is not one hidden-size pruning knows"):
        prune_hidden(model, torch.rand(HIDDEN), 32)


@pytest.mark.slow  # about 35 s a size on 2 cores: the ONNX builder and both verifications
@pytest.mark.parametrize("hidden_size", [32, 40])  # on the ONNX int4 block grid, and off it
def test_hidden_pruned_student_exports_match_torch(teacher, generate, tmp_path, hidden_size):
    """GGUF F16 and Q4_K_M in llama.cpp and ONNX int4 in ONNX Runtime GenAI, each within its
    exporter's bounds against the PyTorch student (the verification raises otherwise)."""
    pytest.importorskip("llama_cpp")
    from edgedistill.export.gguf import quantize_gguf, write_gguf
    from edgedistill.export.gguf.verify import verify_ggufs
    from edgedistill.export.onnx import OnnxExportOptions, export_onnx

    student = tmp_path / "student"
    build_student(_recipe(generate, keep_layers=3, width={"hidden_size": hidden_size, "num_attention_heads": 2}),
                  student, teacher=teacher, generate=generate)
    f16 = write_gguf(student, tmp_path / "student-f16.gguf")
    q4 = quantize_gguf(f16, tmp_path / "student-q4_k_m.gguf", "Q4_K_M")
    checks = {c["file_type"]: c for c in verify_ggufs([f16, q4], student)}
    # the student's weights are not float16 values (rescaled norms): F16 is held to its bound, not to 1.0
    assert set(checks) == {"F16", "Q4_K_M"} and all(c["passed"] for c in checks.values())
    manifest = export_onnx(student, tmp_path / "student-int4", OnnxExportOptions("int4"))
    verification = manifest["verification"]
    assert verification["passed"] and verification["tokenization_identical"]
    embeddings = manifest["quantization"]["embeddings"]
    assert ("shared with the lm_head" in embeddings) == (hidden_size % 32 == 0)
