"""The two ways a float ONNX decoder is made: onnxruntime-genai's model builder, or optimum's exporter.

    python -c "from edgedistill.export.onnx.paths import run_builder; run_builder('runs/sentiment/distill', 'out', 'fp32')"

The builder writes a graph made for decoding (fused GroupQueryAttention with a shared KV buffer,
rotary embedding, SkipSimplifiedLayerNormalization) plus a genai_config.json for
onnxruntime-genai, in seconds, for the architectures in BUILDER_ARCHITECTURES. optimum traces the
PyTorch model (text-generation-with-past: input_ids, attention_mask, position_ids and the past KV
in, logits and the present KV out) and covers many more architectures, but its graph is a plain one.

Both run in a child process: the builder prints a line per tensor and keeps the whole model in
memory, and a crash or a hang in either must not take the caller with it. Which path takes a
config.json, and which precisions it makes (choose_path, check_path_precision), are read from the
config alone, so `edgedistill run` also asks them before any training (edgedistill.export.check).

Some configs of architectures the builder takes it exports wrong (measured on tiny models: log-prob
differences of 4 to 10 against PyTorch): rope scaling of type linear (ignored) or llama3 (its
original_max_position_embeddings read from the wrong place), and Gemma 3 layers that do not slide
in the builder's fixed five-sliding-one-full pattern (a pruned student's layer_types). `builder_problem`
names them; "auto" takes the optimum path for them, which traces the PyTorch model itself.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from edgedistill.errors import EdgedistillError
from edgedistill.export.onnx.options import BUILDER_ARCHITECTURES, BUILDER_PRECISIONS, OPTIMUM_PRECISIONS
from edgedistill.export.refusal import ConfigRefusal

OPTIMUM_TASK = "text-generation-with-past"


@functools.lru_cache(maxsize=1)
def optimum_model_types() -> tuple[str, ...]:
    """The model_type values optimum can export as text-generation-with-past."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return tuple(sorted(TasksManager.get_supported_model_type_for_task(OPTIMUM_TASK, exporter="onnx")))


def _supported() -> str:
    return (f"the builder path takes {', '.join(BUILDER_ARCHITECTURES)}; the optimum path takes model types "
            f"{', '.join(optimum_model_types())}")


# rope_scaling types the builder exports wrong: it ignores linear scaling, and reads llama3's
# original_max_position_embeddings as an attribute of the rope_scaling dict, so always takes
# max_position_embeddings instead
BUILDER_WRONG_ROPE_TYPES = ("linear", "llama3")
# the builder's Gemma 3 makes layer i slide unless (i + 1) % 6 == 0, whatever layer_types says
GEMMA3_BUILDER_PATTERN = 6


def builder_problem(config: dict) -> tuple[str, tuple[str, ...]] | None:
    """Why the builder would export this config.json wrong, and the config keys that say so; None
    when nothing measured says so."""
    rope = config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type"))
    if kind in BUILDER_WRONG_ROPE_TYPES:
        return (f"rope_scaling type {kind!r}, which the onnxruntime-genai builder does not reproduce "
                "(it ignores linear scaling and misreads llama3's original_max_position_embeddings)",
                ("rope_scaling",))
    if (config.get("architectures") or ["?"])[0] == "Gemma3ForCausalLM":
        n_layers = config.get("num_hidden_layers")
        pattern = config.get("sliding_window_pattern") or GEMMA3_BUILDER_PATTERN
        layer_types = config.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers or 0)]
        builder_types = ["full_attention" if (i + 1) % GEMMA3_BUILDER_PATTERN == 0 else "sliding_attention"
                         for i in range(len(layer_types))]
        if layer_types != builder_types:
            return (f"layer_types {layer_types}, where the onnxruntime-genai builder's Gemma 3 slides every layer "
                    f"but each {GEMMA3_BUILDER_PATTERN}th", ("layer_types", "num_hidden_layers"))
    return None


def choose_path(config: dict, requested: str, where: Path) -> str:
    """"builder" or "optimum" for this config.json; `requested` "auto" prefers the builder when it
    takes the architecture and exports the config right (builder_problem)."""
    keys = ("architectures", "model_type")
    architecture = (config.get("architectures") or ["?"])[0]
    model_type = config.get("model_type", "?")
    in_builder = architecture in BUILDER_ARCHITECTURES
    problem = builder_problem(config) if in_builder else None
    if requested in ("auto", "builder") and in_builder and problem is None:
        return "builder"  # without importing optimum (seconds)
    in_optimum = model_type in optimum_model_types()
    if requested == "builder" and problem is not None:
        raise ConfigRefusal(f"{where}: the onnxruntime-genai builder would export {architecture} wrong: {problem[0]}",
                            "use path='optimum' (--onnx-path optimum)" if in_optimum else "export to GGUF instead",
                            keys=problem[1])
    if requested == "builder":
        raise ConfigRefusal(f"{where}: the onnxruntime-genai builder cannot export {architecture}; {_supported()}",
                            "use path='optimum' (--onnx-path optimum)" if in_optimum else
                            "export to GGUF instead, or convert the model to a supported architecture", keys=keys)
    if in_optimum:
        return "optimum"
    if problem is not None:
        raise ConfigRefusal(f"{where}: the onnxruntime-genai builder would export {architecture} wrong ({problem[0]}) "
                            f"and optimum does not take model type {model_type!r}", "export to GGUF instead",
                            keys=problem[1])
    if requested == "optimum":
        raise ConfigRefusal(f"{where}: optimum cannot export model type {model_type!r} for text generation; "
                            f"{_supported()}", "use path='builder'" if in_builder else "export to GGUF instead",
                            keys=keys)
    raise ConfigRefusal(f"{where}: no ONNX export path supports {architecture} (model type {model_type!r}); "
                        f"{_supported()}", "export to GGUF instead, or use a supported architecture", keys=keys)


def check_path_precision(path: str, precision: str) -> None:
    """Refuse a precision the chosen path ("builder" or "optimum") does not make."""
    allowed = BUILDER_PRECISIONS if path == "builder" else OPTIMUM_PRECISIONS
    if precision not in allowed:
        raise ConfigRefusal(f"the {path} path does not make {precision} exports (it makes {', '.join(allowed)})",
                            "use path='builder' for fp16" if path == "optimum" else "choose another precision",
                            keys=("architectures", "model_type"))


def _run(command: list[str], what: str, log_file: Path, timeout_s: float | None) -> None:
    # HF_HUB_OFFLINE: the builder and optimum look models up on the Hub when a path is not a folder;
    # nothing is downloaded at run time in this project.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with log_file.open("w") as log:
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise EdgedistillError(f"{what} did not finish in {timeout_s:.0f} s (log: {log_file})",
                                   "export a smaller model, or give it more time") from None
    if done.returncode != 0:
        tail = "\n    ".join(log_file.read_text(errors="replace").strip().splitlines()[-8:])
        raise EdgedistillError(f"{what} failed (exit {done.returncode}); its log ends:\n    {tail}",
                               "check that the folder loads in transformers (edgedistill chat FOLDER)")


def run_builder(hf_dir: Path, out_dir: Path, precision: str, *, log_file: Path,
                timeout_s: float | None = None) -> None:
    """A float model (precision fp32 or fp16) with genai_config.json from the builder, into `out_dir`."""
    out_dir = Path(out_dir)
    # fp16 is for GPUs: the builder's CPU fp16 graph fails in onnxruntime-genai's decoding loop
    # (a buffer shape mismatch in repeat_kv), while its CUDA graph also runs, and is verified, on CPU
    provider = "cuda" if precision == "fp16" else "cpu"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(hf_dir).resolve()),
               "-o", str(out_dir.resolve()), "-p", precision, "-e", provider, "-c", str((out_dir / ".cache").resolve()),
               # never run a model's own Python code (config.json's auto_map)
               "--extra_options", "hf_remote=false", "hf_token=false"]
    _run(command, "the onnxruntime-genai model builder", log_file, timeout_s)


_OPTIMUM_SCRIPT = """
import json, sys
from optimum.exporters.onnx import main_export
args = json.loads(sys.argv[1])
main_export(args["hf_dir"], args["out_dir"], task=args["task"], device="cpu", local_files_only=True,
            trust_remote_code=False, do_validation=False)
"""


def run_optimum(hf_dir: Path, out_dir: Path, *, log_file: Path, timeout_s: float | None = None) -> None:
    """A float32 model from optimum's exporter (one graph with past: model.onnx) into `out_dir`."""
    args = {"hf_dir": str(Path(hf_dir).resolve()), "out_dir": str(Path(out_dir).resolve()), "task": OPTIMUM_TASK}
    _run([sys.executable, "-c", _OPTIMUM_SCRIPT, json.dumps(args)], "optimum's ONNX exporter", log_file, timeout_s)
