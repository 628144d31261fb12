"""GGUF and ONNX artifacts on a CUDA GPU: llama.cpp with every layer offloaded, ONNX Runtime (GenAI)
with its CUDA provider, through open_runtime, `edgedistill bench` and `edgedistill eval`.

On a machine with the CPU builds (this project's pins) device "cuda" is refused with the install
command of the GPU build; those tests skip where the GPU build is installed. The GPU tests skip,
with the reason, unless the GPU build is there, and then compare the GPU against the CPU: log-probs
within a tolerance, the same greedy answers, bench rows that name the GPU and the provider.

    .venv/bin/python -m pytest -q tests/test_gpu_runtimes.py
    python3 -m pytest -q -rs tests/test_gpu_runtimes.py     # on a GPU machine (tools/gpu/check_cuda.sh runtimes)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tokenizer_corpus

from edgedistill.bench.latency import _command, bench_artifact, bench_many
from edgedistill.cli import main
from edgedistill.errors import EdgedistillError
from edgedistill.recipe import BenchConfig
from edgedistill.runtimes import open_runtime

CHATS = [[{"role": "user", "content": line}] for line in tokenizer_corpus()[:3]]
CFG = BenchConfig(prompt_tokens=8, gen_tokens=4, repetitions=1, threads=1)
FAKE_BANDWIDTH = {"bandwidth_gb_s": 10.0, "bandwidth_method": "given by the test"}


def _llama_offload() -> str | None:
    """Why llama.cpp cannot offload here, or None when it can."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed"
    if not llama_cpp.llama_supports_gpu_offload():
        return f"llama-cpp-python {llama_cpp.__version__} has no GPU offload (a CPU build, or no GPU)"
    return None


def _onnx_cuda(genai: bool) -> str | None:
    """Why ONNX Runtime (GenAI when `genai`) has no CUDA provider here, or None when it has."""
    try:
        import onnxruntime as ort
        import onnxruntime_genai as og  # the builder that makes the test's exports
    except ImportError as exc:
        return f"{exc.name} is not installed"
    if genai and not og.is_cuda_available():
        return f"onnxruntime-genai {og.__version__} is a build without CUDA"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider"
    return None


NO_OFFLOAD, NO_GENAI_CUDA, NO_ORT_CUDA = _llama_offload(), _onnx_cuda(True), _onnx_cuda(False)
needs_offload = pytest.mark.skipif(NO_OFFLOAD is not None, reason=f"needs a CUDA llama-cpp-python: {NO_OFFLOAD}")
needs_genai_cuda = pytest.mark.skipif(NO_GENAI_CUDA is not None, reason=f"needs onnxruntime-genai-cuda: {NO_GENAI_CUDA}")
needs_ort_cuda = pytest.mark.skipif(NO_ORT_CUDA is not None, reason=f"needs onnxruntime-gpu: {NO_ORT_CUDA}")
cpu_llama_build = pytest.mark.skipif(NO_OFFLOAD is None or "not installed" in NO_OFFLOAD,
                                     reason="llama-cpp-python can offload here (or is missing): no refusal to see")


def _cpu_onnx_build(genai: bool):
    why = NO_GENAI_CUDA if genai else NO_ORT_CUDA
    return pytest.mark.skipif(why is None or "not installed" in why,
                              reason="ONNX Runtime has its CUDA provider here (or is missing): no refusal to see")


@pytest.fixture(scope="module")
def gguf_file(tiny_llama_dir, tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    from edgedistill.export.gguf import write_gguf

    return write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf")


@pytest.fixture(scope="module")
def onnx_folders(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny llama's fp32 builder export (onnxruntime-genai), and the same graph without
    genai_config.json, which runs in a plain onnxruntime session as optimum's exports do."""
    pytest.importorskip("onnxruntime_genai")
    from edgedistill.export.onnx import OnnxExportOptions, export_onnx

    root = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny_llama_dir, root / "genai", OnnxExportOptions("fp32"))
    shutil.copytree(root / "genai", root / "plain")
    (root / "plain" / "genai_config.json").unlink()
    return {"genai": root / "genai", "plain": root / "plain"}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    rows = [{"messages": chat, "label": "positive", "choices": ["positive", "negative"]} for chat in CHATS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- a CPU build: device "cuda" is refused with the install command --------------------------------------------


@cpu_llama_build
@pytest.mark.integration
def test_gguf_on_cuda_without_offload_names_the_cuda_build(gguf_file, heldout, capsys):
    import llama_cpp

    with pytest.raises(EdgedistillError, match="no GPU offload") as err:
        open_runtime(gguf_file, device="cuda")
    assert f'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir --no-deps ' \
           f"llama-cpp-python=={llama_cpp.__version__}" in err.value.hint
    # bench and eval refuse it the same way, before any measurement or answer
    with pytest.raises(EdgedistillError, match="no GPU offload"):
        bench_many([gguf_file], CFG, device="cuda")
    assert main(["bench", str(gguf_file), "--device", "cuda"]) == 2
    assert main(["eval", str(gguf_file), "--data", str(heldout), "--device", "cuda"]) == 2
    messages = capsys.readouterr().err
    assert messages.count("no GPU offload") == 2 and messages.count("-DGGML_CUDA=on") == 2


@_cpu_onnx_build(genai=True)
@pytest.mark.integration
def test_builder_export_on_cuda_without_genai_cuda_names_the_cuda_packages(onnx_folders, heldout, capsys):
    import onnxruntime_genai as og

    with pytest.raises(EdgedistillError, match="onnxruntime-genai .* without CUDA") as err:
        open_runtime(onnx_folders["genai"], device="cuda")
    assert "pip uninstall -y onnxruntime onnxruntime-genai && pip install onnxruntime-gpu==" in err.value.hint
    assert f"onnxruntime-genai-cuda=={og.__version__}" in err.value.hint
    assert main(["bench", str(onnx_folders["genai"]), "--device", "cuda"]) == 2
    assert main(["eval", str(onnx_folders["genai"]), "--data", str(heldout), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.count("onnxruntime-genai-cuda==") == 2


@_cpu_onnx_build(genai=False)
@pytest.mark.integration
def test_plain_onnx_on_cuda_without_cuda_provider_names_onnxruntime_gpu(onnx_folders):
    with pytest.raises(EdgedistillError, match="has no CUDAExecutionProvider") as err:
        open_runtime(onnx_folders["plain"], device="cuda")
    assert "pip uninstall -y onnxruntime && pip install onnxruntime-gpu==" in err.value.hint
    assert "genai" not in err.value.hint


@pytest.mark.integration
def test_dtype_stays_refused_for_files_that_run_as_stored(gguf_file, onnx_folders):
    for path in (gguf_file, onnx_folders["genai"]):
        with pytest.raises(EdgedistillError, match="runs in the precision it stores"):
            open_runtime(path, dtype="fp16")


@pytest.mark.unit
def test_cpu_worker_commands_are_as_before():
    for kind, worker in (("gguf", "edgedistill.bench.worker"), ("onnx", "edgedistill.bench.onnx_worker")):
        cpu = _command(Path("m"), kind, CFG, 1, "cpu", "fp32")
        assert worker in cpu and "--device" not in cpu
        assert _command(Path("m"), kind, CFG, 1, "cuda", "fp32")[-2:] == ["--device", "cuda"]


# --- a GPU build: the GPU against the CPU ----------------------------------------------------------------------


def _agree(gpu, cpu, atol: float) -> None:
    """Log-probs within `atol` of the CPU's (same argmax everywhere) and the same greedy answers."""
    for chat in CHATS:
        ids = cpu.prompt_ids(chat)
        gpu_scores, cpu_scores = gpu.score(ids), cpu.score(ids)
        np.testing.assert_allclose(gpu_scores, cpu_scores, atol=atol)
        assert (gpu_scores.argmax(-1) == cpu_scores.argmax(-1)).all()
    assert gpu.generate(CHATS, max_new_tokens=16) == cpu.generate(CHATS, max_new_tokens=16)


@needs_offload
@pytest.mark.integration
def test_offloaded_llama_cpp_matches_the_cpu(gguf_file):
    # the F16 weights run in CUDA kernels whose sums are ordered otherwise than the CPU's
    _agree(open_runtime(gguf_file, device="cuda"), open_runtime(gguf_file), atol=2e-2)


@needs_offload
@pytest.mark.integration
def test_bench_and_eval_run_a_gguf_on_the_gpu(gguf_file, heldout):
    row = bench_artifact(gguf_file, CFG, device="cuda", bandwidth=FAKE_BANDWIDTH).to_dict()
    assert row["device"].startswith("cuda") and "n_gpu_layers=-1" in row["provider"]
    assert row["decode_tokens_per_s"] > 0
    cpu_row = bench_artifact(gguf_file, CFG, bandwidth=FAKE_BANDWIDTH).to_dict()
    assert cpu_row["device"] == "cpu" and "provider" not in cpu_row
    from edgedistill.evaluate.task import evaluate  # here: the rest of the module runs without eval's imports
    on_gpu = evaluate([gguf_file], heldout, None, max_new_tokens=8, device="cuda").to_dict()
    on_cpu = evaluate([gguf_file], heldout, None, max_new_tokens=8).to_dict()
    assert on_gpu["device"] == "cuda"
    assert on_gpu["artifacts"][0]["answers"] == on_cpu["artifacts"][0]["answers"]


@needs_genai_cuda
@pytest.mark.integration
def test_builder_export_on_the_cuda_provider_matches_the_cpu(onnx_folders):
    gpu = open_runtime(onnx_folders["genai"], device="cuda")
    assert gpu.model.device_type != "CPU"
    _agree(gpu, open_runtime(onnx_folders["genai"]), atol=1e-3)
    row = bench_artifact(onnx_folders["genai"], CFG, device="cuda", bandwidth=FAKE_BANDWIDTH).to_dict()
    assert row["device"].startswith("cuda") and row["provider"] == "CUDAExecutionProvider"
    assert row["runtime"] == "onnxruntime-genai"


@needs_ort_cuda
@pytest.mark.integration
def test_plain_onnx_on_the_cuda_provider_matches_the_cpu(onnx_folders):
    gpu = open_runtime(onnx_folders["plain"], device="cuda")
    assert gpu.decoder.session.get_providers()[0] == "CUDAExecutionProvider"
    _agree(gpu, open_runtime(onnx_folders["plain"]), atol=1e-3)
    row = bench_artifact(onnx_folders["plain"], CFG, device="cuda", bandwidth=FAKE_BANDWIDTH).to_dict()
    assert row["device"].startswith("cuda") and row["provider"] == "CUDAExecutionProvider"
    assert row["runtime"] == "onnxruntime"
