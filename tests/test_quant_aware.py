"""Quantization-aware distillation (distill.quant_aware): the fake-quantized weights are bit for bit
what the exported GGUF and ONNX files hold, the fake-quantized forward pass gives the logits of
the files in llama.cpp and onnxruntime, the distill and on_policy stages train with it, and bad
recipes are refused. Tiny random models of conftest (width 256, so Q4_K_M uses Q4_K and Q6_K).

    .venv/bin/python -m pytest -q tests/test_quant_aware.py
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from conftest import make_tiny_model
from edgedistill.data.logits import cache_teacher_logits
from edgedistill.distill.on_policy import on_policy_stage
from edgedistill.distill.train import distill
from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import GgufExportOptions, arch, export_gguf
from edgedistill.export.gguf.writer import plan_tensors
from edgedistill.export.onnx import OnnxExportOptions, export_onnx
from edgedistill.export.onnx.rounding import QuantizedWeight, dequantize
from edgedistill.export.quant_grids import build_quant_aware
from edgedistill.layout import FLOAT_STUDENT, MANIFEST, TRAIN_JSONL
from edgedistill.pipeline import Pipeline
from edgedistill.recipe import ExportConfig, Recipe, load_recipe
from edgedistill.runtimes.llamacpp import LlamaCppChatModel
from edgedistill.runtimes.onnx import OnnxDecoder
from edgedistill.runtimes.pytorch import load_model
from edgedistill.stages import ON_POLICY, stages_for

ROOT = Path(__file__).resolve().parent.parent
# width 256: rows that K-quants take whole; 4 heads of 64; initializer 0.05 so that int4 keeps the
# random model's argmax often enough for the ONNX exporter's own verification
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.05)
EXPORT = ExportConfig(quants=["Q8_0", "Q4_K_M"], onnx=["int4"])
TEXT_IDS = [1, 5, 17, 42, 99, 123, 7, 300, 250, 64, 8, 77, 12, 400, 3, 31]


def tiny_recipe(**distill) -> Recipe:
    """recipes/tiny.yaml with distill fields replaced and round-to-nearest int4 (no calibration)."""
    raw = load_recipe(ROOT / "recipes" / "tiny.yaml").model_dump()
    raw["distill"] = {**raw["distill"], **distill}
    raw["export"] = {**raw["export"], "onnx_options": {**raw["export"]["onnx_options"], "calibrate": False}}
    return Recipe.model_validate(raw)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("quant-aware") / "student", **SHAPE)


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> dict:
    """The student's Q8_0 and Q4_K_M GGUF and int4 ONNX, by the exporters, and its grids."""
    out = tmp_path_factory.mktemp("exports")
    files = {quant: export_gguf(student, out / f"student-{quant.lower()}.gguf", GgufExportOptions(quant=quant)).path
             for quant in EXPORT.quants}
    export_onnx(student, out / "student-int4", OnnxExportOptions("int4"))
    files["onnx-int4"] = out / "student-int4"
    model = load_model(student)
    quant_aware = build_quant_aware(model, student, tiny_recipe(quant_aware={}).distill, EXPORT, first_epoch=0)
    return {"files": files, "model": model, "quant_aware": quant_aware,
            "grids": {grid.name: grid for grid in quant_aware.grids}}


def _rounded(exported: dict, grid: str) -> dict[str, np.ndarray]:
    values = exported["quant_aware"].rounded(exported["model"], exported["grids"][grid])
    # + 0: a straight-through sum turns -0.0 into 0.0, which the files' bytes tell apart
    return {name: value.detach().numpy() + np.float32(0) for name, value in values.items()}


@pytest.mark.integration
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0"])
def test_fake_quantized_weights_are_the_gguf_tensors(exported, student, quant):
    rounded = _rounded(exported, quant)
    config = json.loads((student / "config.json").read_text())
    spec, dims = arch.gguf_layout(config, student / "config.json")
    shapes = {name: tuple(value.shape) for name, value in exported["model"].state_dict().items()}
    plan = {p.gguf_name: p for p in plan_tensors(spec, dims, True, shapes, student)}
    types = set()
    reader = gguf.GGUFReader(str(exported["files"][quant]))
    for tensor in reader.tensors:
        planned = plan[tensor.name]
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            assert planned.source not in exported["grids"][quant].weights, "norms are not rounded"
            continue
        types.add(tensor.tensor_type.name)
        held = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(planned.shape)
        mine = rounded[planned.source]
        if planned.rope_heads is not None:  # the writer's rotary row order
            mine = arch.permute_rotary_rows(mine, planned.rope_heads)
        assert np.array_equal(held, mine), tensor.name
    assert types == ({"Q4_K", "Q6_K"} if quant == "Q4_K_M" else {"Q8_0"})
    # the tied output is the token table under its second name
    assert np.array_equal(rounded["lm_head.weight"], rounded["model.embed_tokens.weight"])


@pytest.mark.integration
def test_fake_quantized_weights_are_the_onnx_initializers(exported):
    rounded = _rounded(exported, "onnx-int4")
    folder = exported["files"]["onnx-int4"]
    assert json.loads((folder / "onnx_export.json").read_text())["quantization"]["embeddings"] == \
        "int8, shared with the lm_head"
    # every output column of every MatMulNBits is a row of a rounded weight (the builder fuses q/k/v
    # and names them its own way; which column goes where the logits test shows)
    rows = {row.tobytes(): name for name, value in rounded.items() for row in value}
    model = onnx.load(str(folder / "model.onnx"))
    inits = {init.name: numpy_helper.to_array(init, base_dir=str(folder)) for init in model.graph.initializer}
    vocab = rounded["lm_head.weight"].shape[0]
    columns = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        held = dequantize(QuantizedWeight(inits[node.input[1]], inits[node.input[2]], None), attrs["K"],
                          attrs["bits"], attrs["block_size"]).astype(np.float32) + np.float32(0)
        found = [rows.get(np.ascontiguousarray(column).tobytes()) for column in held.T]
        assert None not in found, node.name
        columns += len(found)
        assert attrs["bits"] == (8 if attrs["N"] == vocab else 4), node.name  # lm_head_bits 8, the rest 4
    assert columns == sum(value.shape[0] for name, value in rounded.items() if name != "model.embed_tokens.weight")
    # the embedding table is read from the lm_head's int8 data: its rounding is the lm_head's
    assert np.array_equal(rounded["model.embed_tokens.weight"], rounded["lm_head.weight"])


def _logprobs(logits) -> np.ndarray:
    return torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), -1).numpy()


@pytest.mark.integration
@pytest.mark.parametrize("grid", ["Q4_K_M", "onnx-int4"])
def test_fake_quantized_forward_gives_the_files_logits(exported, grid):
    """The fake-quantized PyTorch forward against the file in its runtime, log-probs over 16 tokens:
    the difference left is the runtimes' own arithmetic (llama.cpp and MatMulNBits at accuracy
    level 4 quantize the activations to 8 bits), at most 0.15 and 0.03 on average, and at least 5
    times smaller than the float model's."""
    model, quant_aware = exported["model"], exported["quant_aware"]
    ids = torch.tensor([TEXT_IDS])
    with torch.no_grad():
        fake = _logprobs(quant_aware.forward(model, exported["grids"][grid], input_ids=ids).logits[0])
        plain = _logprobs(model(input_ids=ids).logits[0])
    if grid == "onnx-int4":
        runtime = _logprobs(OnnxDecoder(exported["files"][grid]).logits(TEXT_IDS))
    else:
        runtime = LlamaCppChatModel(exported["files"][grid], n_ctx=64, threads=2).score(TEXT_IDS).astype(np.float64)
    fake_error, float_error = np.abs(fake - runtime), np.abs(plain - runtime)
    # measured (max, mean): Q4_K_M 0.094, 0.017 against the float model's 0.84, 0.14; int4 0.055,
    # 0.012 against 0.99, 0.18
    assert fake_error.max() < 0.15 and fake_error.mean() < 0.03, (fake_error.max(), fake_error.mean())
    assert fake_error.max() < float_error.max() / 5 and fake_error.mean() < float_error.mean() / 5
    # a random model has near ties, where 8-bit activations can flip the argmax
    agree = {name: (value.argmax(-1) == runtime.argmax(-1)).mean() for name, value in (("fake", fake), ("float", plain))}
    assert agree["fake"] >= max(0.8, agree["float"]), agree


def _train_set(folder: Path, examples: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"kalo mine {i} tura"},
                                        {"role": "assistant", "content": "sipo deva" if i % 2 else "quzé ñuør"}]}
            for i in range(examples)]
    (folder / TRAIN_JSONL).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.mark.integration
def test_distill_and_on_policy_train_quant_aware_and_the_export_holds_the_rounding(student, tmp_path):
    """The distill stage (its last epoch fake-quantized, two grids in turn) and the on_policy stage
    (every epoch); the exporter's Q4_K_M of the trained student holds the rounding of its weights."""
    teacher = make_tiny_model(tmp_path / "teacher", seed=3, **SHAPE)
    (teacher / MANIFEST).write_text(json.dumps({"files": {"model.safetensors": "tiny"}}))
    generate = _train_set(tmp_path / "generate", 8)
    recipe = tiny_recipe(quant_aware={"grids": ["Q4_K_M", "onnx-int4"]}, epochs=2, batch_size=4, topk=8,
                         max_seq_len=64, on_policy={"fraction": 1.0, "max_new_tokens": 3, "batch_size": 4})
    for stage in ("logits", "distill", "on_policy"):
        (tmp_path / stage).mkdir()
    cache_teacher_logits(recipe, tmp_path / "logits", teacher=teacher, generate=generate)
    quant_aware = build_quant_aware(load_model(student), student, recipe.distill, recipe.export, first_epoch=1)
    result = distill(recipe, tmp_path / "distill", student=student, generate=generate, logits=tmp_path / "logits",
                     quant_aware=quant_aware)
    summary = result["quant_aware"]
    assert summary["epochs"] == [2] and summary["fake_quantized_steps"] == 2
    assert summary["one_grid_per_step"] == ["Q4_K_M", "onnx-int4"] and summary["rounding_ms_per_step"] > 0
    assert summary["grids"]["Q4_K_M"] == {"Q4_K": 12, "Q6_K": 4} and "fake_quantized_steps" not in result["epochs"][0]

    trained = tmp_path / "distill"
    on_policy = build_quant_aware(load_model(trained), trained, recipe.distill, recipe.export, first_epoch=0)
    result = on_policy_stage(recipe, tmp_path / "on_policy", distill=trained, teacher=teacher, generate=generate,
                             quant_aware=on_policy)
    assert result["quant_aware"]["epochs"] == [1] and result["samples"]["samples"] == 8

    final = tmp_path / "on_policy"
    gguf_file = export_gguf(final, tmp_path / "final-q4_k_m.gguf", GgufExportOptions(quant="Q4_K_M")).path
    model = load_model(final)
    check = build_quant_aware(model, final, recipe.distill, recipe.export, first_epoch=0)
    rounded = check.rounded(model, check.grids[0])
    held = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(gguf_file)).tensors}
    assert np.array_equal(held["blk.0.ffn_down.weight"].reshape(256, 512),
                          rounded["model.layers.0.mlp.down_proj.weight"].detach().numpy() + np.float32(0))


@pytest.mark.integration
def test_the_float_student_teaches_its_rounded_self(student, tmp_path):
    """quant_aware.soft_labels float_student: the float student as the fake-quantized epoch begins
    is saved in distill/float_student (a whole HF folder) and its soft labels, not the teacher's,
    are what that epoch learns: its rounded self is nearer them than the teacher's."""
    teacher = make_tiny_model(tmp_path / "teacher", seed=3, **SHAPE)
    (teacher / MANIFEST).write_text(json.dumps({"files": {"model.safetensors": "tiny"}}))
    generate = _train_set(tmp_path / "generate", 8)
    results = {}
    for soft_labels in ("teacher", "float_student"):
        recipe = tiny_recipe(quant_aware={"grids": ["Q4_K_M"], "soft_labels": soft_labels}, epochs=2, batch_size=4,
                             topk=8, max_seq_len=64)
        run = tmp_path / f"run-{soft_labels}"
        for stage in ("logits", "distill"):
            (run / stage).mkdir(parents=True)
        cache_teacher_logits(recipe, run / "logits", teacher=teacher, generate=generate)
        quant_aware = build_quant_aware(load_model(student), student, recipe.distill, recipe.export, first_epoch=1)
        results[soft_labels] = distill(recipe, run / "distill", student=student, generate=generate,
                                       logits=run / "logits", quant_aware=quant_aware)
    assert results["float_student"]["quant_aware"]["soft_labels"] == "float_student"
    assert not (tmp_path / "run-teacher" / "distill" / FLOAT_STUDENT).exists()
    # the first (float) epoch is the same run; the second learns another model's labels
    first, second = ([r["epochs"][i]["kl"] for r in results.values()] for i in (0, 1))
    # measured: 0.32 from the teacher (T=2), 0.023 from the float student (T=1), Q4_K of a random model
    assert first[0] == first[1] and second[1] < second[0] / 2, (first, second)

    folder = tmp_path / "run-float_student" / "distill" / FLOAT_STUDENT
    taught = load_model(folder)
    assert taught.config.use_cache and (folder / "tokenizer.json").exists()
    weights = {name: dict(load_model(path).named_parameters())["model.layers.0.mlp.down_proj.weight"]
               for name, path in (("start", student), ("end", folder.parent))}
    snapshot = dict(taught.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(snapshot, weights["start"]) and not torch.equal(snapshot, weights["end"])


@pytest.mark.integration
def test_the_fake_quantized_epochs_take_their_own_learning_rate(student, tmp_path):
    """quant_aware.learning_rate replaces the schedule's rate on the fake-quantized steps only: at
    1e-30 the first (float) epoch trains and the second leaves the weights where the float student
    stood, bit for bit."""
    teacher = make_tiny_model(tmp_path / "teacher", seed=3, **SHAPE)
    (teacher / MANIFEST).write_text(json.dumps({"files": {"model.safetensors": "tiny"}}))
    generate = _train_set(tmp_path / "generate", 8)
    recipe = tiny_recipe(quant_aware={"grids": ["Q4_K_M"], "soft_labels": "float_student", "learning_rate": 1e-30},
                         epochs=2, batch_size=4, topk=8, max_seq_len=64)
    for stage in ("logits", "distill"):
        (tmp_path / stage).mkdir()
    cache_teacher_logits(recipe, tmp_path / "logits", teacher=teacher, generate=generate)
    quant_aware = build_quant_aware(load_model(student), student, recipe.distill, recipe.export, first_epoch=1)
    distill(recipe, tmp_path / "distill", student=student, generate=generate, logits=tmp_path / "logits",
            quant_aware=quant_aware)
    start, snapshot, end = (dict(load_model(path).named_parameters()) for path in
                            (student, tmp_path / "distill" / FLOAT_STUDENT, tmp_path / "distill"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(start[name], snapshot[name])
    for name, weight in end.items():
        assert torch.equal(weight, snapshot[name]), name


@pytest.mark.unit
def test_a_resumed_run_reads_the_float_student_back(student, tmp_path):
    """Saved once, as the first fake-quantized epoch begins; a resumed run reads that one back."""
    from accelerate import Accelerator

    from edgedistill.distill.train import float_student

    first = load_model(student)
    float_student(Accelerator(cpu=True), first, tmp_path)
    other = make_tiny_model(tmp_path / "other", seed=9, **SHAPE)
    again = float_student(Accelerator(cpu=True), load_model(other), tmp_path)
    for (name, mine), theirs in zip(first.named_parameters(), again.parameters()):
        assert torch.equal(mine, theirs), name
    assert not any(p.requires_grad for p in again.parameters())


@pytest.mark.unit
@pytest.mark.parametrize("change, message", [
    ({"distill": {"quant_aware": {"grids": ["Q6_K"]}}}, r"grid Q6_K is not exported by this recipe \(export.quants"),
    ({"distill": {"quant_aware": {"grids": ["onnx-int8"]}}}, "grid onnx-int8 is not exported"),
    ({"distill": {"quant_aware": {"grids": ["Q3_K"]}}}, "unknown grid 'Q3_K'"),
    ({"distill": {"quant_aware": {"epochs": 3}}}, "quant_aware.epochs 3 is more than distill.epochs 2"),
    ({"distill": {"quant_aware": {"epochs": 2, "soft_labels": "float_student"}}},
     "float student that teaches its rounded self is trained by the epochs before"),
    ({"distill": {"on_policy": {"fraction": 1.0}, "quant_aware": {"soft_labels": "float_student"}}},
     "float_student with on_policy"),
    ({"distill": {"quant_aware": {}}, "export": {"imatrix": True}}, "with export.imatrix"),
    ({"distill": {"quant_aware": {}}}, "with export.onnx_options.calibrate"),  # the tiny recipe calibrates
    ({"distill": {"quant_aware": {}}, "export": {"quants": ["F16"], "onnx": []}}, "exports no quantized grid"),
])
def test_bad_recipes_are_refused(tmp_path, change, message):
    import yaml

    raw = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    for section, fields in change.items():
        raw[section] = {**raw[section], **fields}
    (tmp_path / "data").symlink_to(ROOT / "recipes" / "data")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(EdgedistillError, match=message):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.unit
def test_the_stage_keys():
    """Without quant_aware the keys are what they were; with it distill and on_policy read the exports."""
    def key(r: Recipe, name: str) -> str:
        stage = next(s for s in stages_for(r) if s.name == name)
        return Pipeline(stages_for(r), r, Path("unused")).key(stage, {i: i for i in stage.inputs})[0]

    plain = tiny_recipe(on_policy={"fraction": 1.0})
    assert "quant_aware" not in plain.distill.model_dump()
    qa = tiny_recipe(on_policy={"fraction": 1.0}, quant_aware={"grids": ["Q4_K_M"]})
    stages = {s.name: s for s in stages_for(qa)}
    assert {"export.quants", "export.onnx_options"} <= set(stages["distill"].sections) & set(stages[ON_POLICY].sections)
    assert "export.quants" not in {s.name: s for s in stages_for(plain)}["distill"].sections
    assert key(qa, "distill") != key(plain, "distill") and key(qa, ON_POLICY) != key(plain, ON_POLICY)
    assert key(qa, "export") == key(plain, "export")
    # soft_labels, added later, is left out of the key at its default: quant-aware runs made before stay cached
    assert "soft_labels" not in qa.distill.model_dump()["quant_aware"]
    taught = tiny_recipe(quant_aware={"grids": ["Q4_K_M"], "soft_labels": "float_student"})
    assert key(taught, "distill") != key(tiny_recipe(quant_aware={"grids": ["Q4_K_M"]}), "distill")
    # so is learning_rate
    assert "learning_rate" not in taught.distill.model_dump()["quant_aware"]
    slow = tiny_recipe(quant_aware={"grids": ["Q4_K_M"], "soft_labels": "float_student", "learning_rate": 1e-5})
    assert key(slow, "distill") != key(taught, "distill")
