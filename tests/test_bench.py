"""`edgedistill bench`'s parts: the bandwidth bound, bytes read per token, the PyTorch worker and the
static-cache decoder, on the tiny random models of tests/conftest.py; the CUDA tests skip without a GPU.

    .venv/bin/python -m pytest -q tests/test_bench.py
    python3 -m pytest -q tests/test_bench.py -k cuda          # on a GPU machine
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_SHAPE, build_tiny_model
from transformers import LlamaForCausalLM

from edgedistill.bench.bandwidth import cpu_bandwidth
from edgedistill.bench.latency import bench_artifact, with_bound
from edgedistill.bench.model_bytes import torch_bytes_per_token
from edgedistill.cli import main
from edgedistill.recipe import BenchConfig
from edgedistill.runtimes.torch_decode import StaticDecoder

PROMPT = [5, 17, 42, 100, 7, 30, 8, 9]
FAKE_BANDWIDTH = {"bandwidth_gb_s": 10.0, "bandwidth_method": "given by the test"}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")


def _model(tied: bool) -> LlamaForCausalLM:
    model = build_tiny_model(tie_word_embeddings=tied)
    model.generation_config.eos_token_id = None  # fixed-length greedy, as StaticDecoder decodes
    return model


@pytest.fixture(scope="module", params=["tied", "untied"])
def hf_folder(request) -> Path:
    """The session's tiny HF folder with an output matrix tied to the embedding, then one with its own."""
    return request.getfixturevalue("tiny_llama_dir" if request.param == "tied" else "tiny_llama_untied_dir")


@pytest.fixture(scope="module")
def untied_folder(tiny_llama_untied_dir) -> Path:
    return tiny_llama_untied_dir


def _expected_weight_bytes(folder: Path, bytes_2d: int, bytes_1d: int) -> int:
    """Weight bytes read per token, counted from the HF checkpoint: matrices at `bytes_2d` per value,
    vectors at `bytes_1d`, one row of the embedding when an lm_head of its own exists."""
    state = LlamaForCausalLM.from_pretrained(folder).state_dict()
    tied = state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    total = 0
    for name, tensor in state.items():
        if name == "lm_head.weight" and tied:
            continue
        rows = 1 if name == "model.embed_tokens.weight" and not tied else tensor.shape[0]
        total += rows * (tensor[0].numel() if tensor.ndim == 2 else 1) * (bytes_2d if tensor.ndim == 2 else bytes_1d)
    return total


@pytest.mark.unit
def test_cpu_bandwidth_is_a_positive_rate_and_says_how():
    result = cpu_bandwidth(threads=2, size_bytes=16 << 20, passes=2)
    assert 0.1 < result["bandwidth_gb_s"] < 100_000
    assert "16 MiB" in result["bandwidth_method"] and "2 threads" in result["bandwidth_method"]


@pytest.mark.unit
def test_bound_and_efficiency_follow_from_bandwidth_and_bytes():
    row = with_bound({"decode_tokens_per_s": 50.0}, FAKE_BANDWIDTH, 100_000_000)
    assert row["bandwidth_bound_tokens_per_s"] == 100.0 and row["bandwidth_efficiency"] == 0.5
    assert row["bytes_per_token"] == 100_000_000 and row["bandwidth_method"] == "given by the test"


@pytest.mark.integration
def test_gguf_bytes_per_token_is_the_tensor_bytes(hf_folder, tmp_path):
    pytest.importorskip("gguf")
    from edgedistill.bench.model_bytes import gguf_bytes_per_token
    from edgedistill.export.gguf import write_gguf

    gguf_file = write_gguf(hf_folder, tmp_path / "model-f16.gguf")
    # the F16 writer stores matrices as float16 and norms as float32
    assert gguf_bytes_per_token(gguf_file) == _expected_weight_bytes(hf_folder, 2, 4)


@pytest.mark.integration
def test_onnx_bytes_per_token_is_the_initializer_bytes(hf_folder, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from edgedistill.bench.model_bytes import onnx_bytes_per_token
    from edgedistill.export.onnx import OnnxExportOptions, export_onnx

    export_onnx(hf_folder, tmp_path / "fp32", OnnxExportOptions("fp32", verify=False))
    # plus one row each of the rotary cos/sin caches GroupQueryAttention looks positions up in
    rotary_rows = 2 * (TINY_SHAPE["hidden_size"] // TINY_SHAPE["num_attention_heads"] // 2) * 4
    assert onnx_bytes_per_token(tmp_path / "fp32") == _expected_weight_bytes(hf_folder, 4, 4) + rotary_rows


@pytest.mark.integration
def test_torch_bytes_per_token_counts_a_tied_matrix_once(hf_folder):
    model = LlamaForCausalLM.from_pretrained(hf_folder)
    assert torch_bytes_per_token(model) == _expected_weight_bytes(hf_folder, 4, 4)
    assert torch_bytes_per_token(model.to(torch.bfloat16)) == _expected_weight_bytes(hf_folder, 2, 2)


@pytest.mark.unit
def test_static_decoder_gives_greedy_generate_tokens():
    for tied in (True, False):
        model = _model(tied)
        reference = model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False)[0, len(PROMPT):]
        decoder = StaticDecoder(model, len(PROMPT) + 24)
        assert decoder.generate(PROMPT, 24) == reference.tolist()
        assert decoder.mode == "eager"
        # the cache is reused in place for the next sequence
        reference = model.generate(torch.tensor([PROMPT[:3]]), max_new_tokens=5, do_sample=False)[0, 3:]
        assert decoder.generate(PROMPT[:3], 5) == reference.tolist()


@pytest.mark.integration
def test_torch_worker_measures_an_hf_folder_on_the_cpu(untied_folder):
    cfg = BenchConfig(prompt_tokens=8, gen_tokens=4, repetitions=1, threads=1)
    row = bench_artifact(untied_folder, cfg, bandwidth=FAKE_BANDWIDTH).to_dict()
    assert row["artifact"] == untied_folder.name + "/" and row["runtime"] == "PyTorch fp32"
    assert (row["device"], row["dtype"], row["decode_mode"], row["threads"]) == ("cpu", "fp32", "eager", 1)
    assert row["bytes_per_token"] == _expected_weight_bytes(untied_folder, 4, 4)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "peak_rss_mb", "bandwidth_bound_tokens_per_s",
                "bandwidth_efficiency"):
        assert row[key] > 0, key
    assert row["prefill_tokens_per_s_spread"] >= 0 and row["decode_tokens_per_s_spread"] >= 0
    assert "peak_gpu_mb" not in row


@pytest.mark.integration
def test_cuda_without_a_gpu_is_a_clear_error(untied_folder, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", str(untied_folder), "--device", "cuda", "--gen-tokens", "2"]) == 2
    message = capsys.readouterr().err
    assert "--device cuda was asked for" in message and "--device cpu" in message


@CUDA
@pytest.mark.integration
def test_cuda_graph_decoder_gives_greedy_generate_tokens():
    model = _model(tied=False).cuda()
    reference = model.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=16, do_sample=False)
    decoder = StaticDecoder(model, len(PROMPT) + 16)
    tokens = decoder.generate(PROMPT, 16)
    assert decoder.graph_error is None and decoder.mode == "cuda_graph"
    assert tokens == reference[0, len(PROMPT):].tolist()
    # a second sequence replays the same graph
    reference = model.generate(torch.tensor([PROMPT[:4]], device="cuda"), max_new_tokens=6, do_sample=False)
    assert decoder.generate(PROMPT[:4], 6) == reference[0, 4:].tolist()


@CUDA
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.integration
def test_torch_worker_on_cuda_reports_gpu_memory(untied_folder, dtype):
    cfg = BenchConfig(prompt_tokens=8, gen_tokens=8, repetitions=2)
    row = bench_artifact(untied_folder, cfg, device="cuda", dtype=dtype, bandwidth=FAKE_BANDWIDTH).to_dict()
    assert row["device"].startswith("cuda:") and row["dtype"] == dtype
    assert row["decode_mode"] == "cuda_graph", row.get("cuda_graph_error")
    assert row["peak_gpu_mb"] > 0
    assert row["bytes_per_token"] == _expected_weight_bytes(untied_folder, 2, 2)
