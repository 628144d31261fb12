"""HF → ONNX export (builder and optimum paths), checked in ONNX Runtime against PyTorch.

Tiny random models (tests/conftest.py: 2 layers, width 64, the byte-level BPE tokenizer trained there);
every export is verified on the way (edgedistill.export.onnx.verify) and reloaded here in the
runtime a user runs: onnxruntime-genai for builder exports, a plain onnxruntime session otherwise.

    .venv/bin/python -m pytest -q tests/test_export_onnx.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from edgedistill.errors import EdgedistillError
from edgedistill.export.onnx import BOUNDS, MANIFEST, OnnxExportOptions, export_onnx, reference_for
from edgedistill.export.onnx.verify import TOKENIZER_TEXTS, check_tokenizer
from edgedistill.runtimes.onnx import OnnxChatModel, OnnxDecoder

pytestmark = pytest.mark.integration

# make_tiny_model overrides of the conftest shape (2 layers, width 64, 4 heads in 2 KV groups, tied)
MODELS = {
    "llama": {},
    # what width pruning leaves: fewer query heads (head_dim no longer hidden/heads), one KV group,
    # a narrower MLP; untied, so the lm_head and the embeddings are quantized apart
    "pruned": dict(num_attention_heads=2, num_key_value_heads=1, intermediate_size=96, head_dim=16,
                   tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    # not a builder architecture: exported by optimum
    "gpt2": dict(model_type="gpt2", pad_token_id=None),
}
CHAT = [{"role": "user", "content": "ka lo mi ne tu"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"llama": tiny_llama_dir,
            **{name: make_tiny_model(root / name, **MODELS[name]) for name in MODELS if name != "llama"}}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory) -> dict[str, Path]:
    """Verified exports: the llama in every CPU precision (builder), and one export of each other model."""
    root = tmp_path_factory.mktemp("onnx")
    reference = reference_for(models["llama"])
    out = {}
    for precision in ("fp32", "int8", "int4"):
        out[f"llama-{precision}"] = root / f"llama-{precision}"
        export_onnx(models["llama"], out[f"llama-{precision}"], OnnxExportOptions(precision, reference=reference))
    out["pruned-int4"] = root / "pruned-int4"
    export_onnx(models["pruned"], out["pruned-int4"], OnnxExportOptions("int4", quantize_embeddings=True))
    out["qwen3-fp32"] = root / "qwen3-fp32"
    out["qwen3-fp32"].mkdir()
    (out["qwen3-fp32"] / "stale.txt").write_text("from an earlier export")
    export_onnx(models["qwen3"], out["qwen3-fp32"], OnnxExportOptions("fp32", overwrite=True))
    out["gpt2-int8"] = root / "gpt2-int8"
    export_onnx(models["gpt2"], out["gpt2-int8"], OnnxExportOptions("int8"))
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_builder_export_files_and_manifest(exports):
    folder = exports["llama-int4"]
    assert {p.name for p in folder.iterdir()} == {
        "model.onnx", "model.onnx.data", "genai_config.json", MANIFEST,
        # the source folder's own tokenizer files, as they are
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    manifest = _manifest(folder)
    assert (manifest["path"], manifest["precision"], manifest["runtime"]) == ("builder", "int4", "onnxruntime-genai")
    assert manifest["quantization"] == {
        "block_size": 32, "symmetric": True, "accuracy_level": 4, "lm_head_bits": 8, "quantize_embeddings": None,
        "bits": 4, "algorithm": "rtn", "op": "MatMulNBits", "embeddings": "int8, shared with the lm_head",
        "importance_rounded_weights": 0, "calibration": None}
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {MANIFEST}
    assert manifest["verification"]["passed"] and manifest["verification"]["tokenization_identical"]
    # every weight in the external data file: the graph file stays small whatever the model's size
    assert (folder / "model.onnx").stat().st_size < (folder / "model.onnx.data").stat().st_size
    sizes = {p: (exports[f"llama-{p}"] / "model.onnx.data").stat().st_size for p in ("fp32", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


def test_fp32_matches_torch_logits_and_greedy(exports, models):
    checks = _manifest(exports["llama-fp32"])["verification"]
    assert checks["max_abs_logprob_diff"] < 2e-3 and checks["top1_agreement"] == 1.0
    assert checks["greedy_verdict"] == "identical"
    model = LlamaForCausalLM.from_pretrained(models["llama"]).eval()
    prompt = [1, 40, 41, 42, 5, 17]
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].numpy()
    got = OnnxDecoder(exports["llama-fp32"]).logits(prompt)
    assert np.abs(got - expected).max() < 1e-3
    # onnxruntime-genai with its KV cache, and the plain session's KV loop, against transformers
    torch_greedy = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                  eos_token_id=None)[0, len(prompt):].tolist()
    assert list(OnnxChatModel(exports["llama-fp32"]).greedy_ids(prompt, 10)) == torch_greedy


def test_quantized_exports_within_bounds(exports):
    for name, precision in (("llama-int8", "int8"), ("llama-int4", "int4"), ("pruned-int4", "int4"),
                            ("gpt2-int8", "int8")):
        checks = _manifest(exports[name])["verification"]
        bound = BOUNDS[precision]
        assert checks["perplexity_ratio"] <= bound.max_ppl_ratio and checks["mean_kl"] <= bound.max_mean_kl, name
    int8, int4 = (_manifest(exports[f"llama-{p}"])["verification"] for p in ("int8", "int4"))
    assert int8["mean_kl"] < int4["mean_kl"]


def test_accuracy_level_that_flips_the_argmax_fails_the_export(exports):
    from edgedistill.export.onnx.verify import ACCURACY_LEVEL_MIN_AGREEMENT, _check

    # the CPU default, level 4 (int8 activations), checked against the same weights at level 0
    check = _manifest(exports["llama-int4"])["verification"]
    level = check["accuracy_level_check"]
    assert level["accuracy_levels"] == [4] and level["top1_agreement_vs_level_0"] >= ACCURACY_LEVEL_MIN_AGREEMENT
    assert _manifest(exports["llama-fp32"])["verification"]["accuracy_level_check"] is None
    assert not list(exports["llama-int4"].glob(".verify-*"))
    # a level whose arithmetic moves the argmax at 5% of the positions is refused, with the fix named
    flipped = {**check, "accuracy_level_check": {**level, "top1_agreement_vs_level_0": 0.95}}
    [failure] = _check(flipped)
    assert "accuracy level [4]" in failure and "--accuracy-level 0" in failure


def test_pruned_student_and_other_architectures(exports):
    pruned = _manifest(exports["pruned-int4"])
    assert pruned["path"] == "builder" and pruned["quantization"]["embeddings"] == "int4"
    assert _manifest(exports["qwen3-fp32"])["verification"]["greedy_verdict"] == "identical"
    assert not (exports["qwen3-fp32"] / "stale.txt").exists()  # overwrite=True replaced the folder
    gpt2 = _manifest(exports["gpt2-int8"])
    assert (gpt2["path"], gpt2["runtime"]) == ("optimum", "onnxruntime")
    assert "config.json" in gpt2["files"] and "genai_config.json" not in gpt2["files"]


def test_tokenizer_round_trip_in_onnxruntime_genai(exports, models):
    hf = PreTrainedTokenizerFast.from_pretrained(models["llama"])
    chat = OnnxChatModel(exports["llama-fp32"])
    assert chat.genai
    for text in TOKENIZER_TEXTS:
        ids = hf(text).input_ids
        assert chat.encode(text) == ids, text
        assert chat.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def _misconfigure_tokenizer(folder: Path) -> None:
    """What transformers writes for a GGUF's byte-level BPE (FACTS.md): a SentencePiece class, and a
    decoder that mixes SentencePiece steps with ByteLevel; onnxruntime-genai then splits text wrongly."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer",
                                                              "legacy": True}))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


def test_misconfigured_tokenizer_is_caught(exports, models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exports["llama-fp32"], broken)
    _misconfigure_tokenizer(broken)
    problems = check_tokenizer(OnnxChatModel(broken), reference_for(models["llama"]))
    assert problems and problems[0]["onnx_ids"] != problems[0]["hf_ids"]


def test_chat_streams_what_generate_returns(exports):
    for name in ("llama-int4", "gpt2-int8"):
        chat = OnnxChatModel(exports[name])
        [(answer, finished)] = chat.generate([CHAT], max_new_tokens=12)
        assert "".join(chat.stream(CHAT, max_new_tokens=12)).strip() == answer
        assert isinstance(finished, bool)


def test_bad_input_is_refused_before_work(models, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(models["llama"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(EdgedistillError, match="has model_type 'foo', which transformers .* does not know"):
        export_onnx(odd, tmp_path / "out", OnnxExportOptions("int4"))  # the HF folder check, before the exporter
    with pytest.raises(EdgedistillError, match="builder cannot export GPT2LMHeadModel"):
        export_onnx(models["gpt2"], tmp_path / "out", OnnxExportOptions("int4", path="builder"))
    with pytest.raises(EdgedistillError, match="does not make fp16"):
        export_onnx(models["gpt2"], tmp_path / "out", OnnxExportOptions("fp16"))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(models["llama"], no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(EdgedistillError, match="no tokenizer.json"):
        export_onnx(no_tokenizer, tmp_path / "out", OnnxExportOptions("int4"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(EdgedistillError, match="already exists"):
        export_onnx(models["llama"], tmp_path / "exists", OnnxExportOptions("int4"))
    with pytest.raises(EdgedistillError, match="block_size"):
        export_onnx(models["llama"], tmp_path / "out", OnnxExportOptions("int4", block_size=48))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "no_tokenizer", "odd"]


def test_failing_export_leaves_nothing_and_overwrite_replaces(models, tmp_path):
    """A tokenizer onnxruntime-genai reads differently fails the verification: nothing is kept."""
    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    _misconfigure_tokenizer(broken)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    with pytest.raises(EdgedistillError, match="the export's tokenizer gives"):
        export_onnx(broken, out, OnnxExportOptions("fp32", overwrite=True))
    assert [p.name for p in out.iterdir()] == ["stale.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_bench_measure_and_artifact_listing(exports):
    from edgedistill.bench.onnx_worker import measure
    from edgedistill.runtimes.onnx import onnx_artifacts

    root = exports["llama-fp32"].parent
    found = onnx_artifacts(root)
    sizes = [sum(p.stat().st_size for p in f.glob("model.onnx*")) for f in found]
    assert set(found) == set(exports.values()) and sizes == sorted(sizes, reverse=True)  # largest first
    for name in ("llama-int4", "gpt2-int8"):
        result = measure(exports[name], prompt_tokens=8, gen_tokens=4, repetitions=1, threads=1)
        assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0 and result["peak_rss_mb"] > 0


def test_cli_export_verify_bench_and_chat(models, exports, tmp_path, capsys):
    from edgedistill.cli import main
    from edgedistill.runtimes import artifact_kind, open_chat_model

    out = tmp_path / "student-int8"
    assert main(["export", str(models["llama"]), "--format", "onnx", "--precision", "int8", "--out", str(out)]) == 0
    assert _manifest(out)["precision"] == "int8" and artifact_kind(out) == "onnx"
    assert main(["export", str(models["llama"]), "--format", "onnx", "--quant", "q4_k_m", "--out", str(tmp_path / "x")]) == 2
    assert "--quant only apply to --format gguf" in capsys.readouterr().err
    assert main(["export", str(models["llama"]), "--format", "onnx", "--imatrix", "m.gguf", "--out", str(tmp_path / "x")]) == 2
    assert "--imatrix only apply to --format gguf" in capsys.readouterr().err
    assert main(["verify-export", str(exports["llama-int4"]), "--reference", str(models["llama"])]) == 0
    assert main(["bench", str(out), "--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions", "1",
                 "--json", str(tmp_path / "bench.json")]) == 0
    [row] = json.loads((tmp_path / "bench.json").read_text())
    assert row["artifact"] == "student-int8/" and row["decode_tokens_per_s"] > 0 and row["file_mb"] > 0
    # an optimum export holds a config.json too, and is still an ONNX artifact
    assert artifact_kind(exports["gpt2-int8"]) == "onnx"
    [(answer, _)] = open_chat_model(out).generate([[{"role": "user", "content": "hi"}]], max_new_tokens=4)
    assert isinstance(answer, str)


def test_fp16_for_gpus_is_verified_on_the_cpu(models, tmp_path):
    # the builder's CUDA fp16 graph (its CPU fp16 graph fails in onnxruntime-genai's decode loop),
    # run and checked here on the CPU
    manifest = export_onnx(models["llama"], tmp_path / "llama-fp16", OnnxExportOptions("fp16"))
    check = manifest["verification"]
    assert manifest["precision"] == "fp16" and check["passed"] and check["greedy_verdict"] in ("identical", "tie")
    assert check["top1_agreement_with_ties"] >= BOUNDS["fp16"].min_top1_agreement


def test_int4_rounded_by_importance_on_calibration_text(models, exports, tmp_path):
    import onnx
    from onnx import numpy_helper

    text = tmp_path / "task.txt"
    text.write_text("ka lo mi ne tu. " * 400)
    manifest = export_onnx(models["llama"], tmp_path / "llama-int4-calibrated",
                           OnnxExportOptions("int4", calibration=text, calibration_tokens=1024))
    quantization = manifest["quantization"]
    # chunks no longer than the model's 256 positions
    assert quantization["calibration"]["tokens"] == 1024 and quantization["calibration"]["chunks"] == 4
    assert quantization["algorithm"].startswith("importance-weighted")
    assert manifest["verification"]["passed"] and "calibrate" in manifest["seconds"]
    graph = onnx.load(str(tmp_path / "llama-int4-calibrated" / "model.onnx"))
    four_bit = [n for n in graph.graph.node if n.op_type == "MatMulNBits"
                and onnx.helper.get_node_attr_value(n, "bits") == 4]
    assert quantization["importance_rounded_weights"] == len(four_bit) > 0
    # the same graph as the round-to-nearest export, other integers in it
    nearest = onnx.load(str(exports["llama-int4"] / "model.onnx"))
    assert [n.op_type for n in graph.graph.node] == [n.op_type for n in nearest.graph.node]
    name = four_bit[0].input[1]
    [ours] = [numpy_helper.to_array(i) for i in graph.graph.initializer if i.name == name]
    [theirs] = [numpy_helper.to_array(i) for i in nearest.graph.initializer if i.name == name]
    assert ours.shape == theirs.shape and not np.array_equal(ours, theirs)
    assert _manifest(exports["llama-int4"])["quantization"]["calibration"] is None

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EdgedistillError, match="calibration texts are empty"):
        export_onnx(models["llama"], tmp_path / "never", OnnxExportOptions("int4", calibration=tmp_path / "empty.txt"))
    with pytest.raises(EdgedistillError, match="calibration file .* not found"):
        export_onnx(models["llama"], tmp_path / "never", OnnxExportOptions("int4", calibration=tmp_path / "missing.txt"))
    assert not (tmp_path / "never").exists()
