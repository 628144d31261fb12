"""HF folder → ONNX export folder for ONNX Runtime, verified against PyTorch before it is kept.

    python -c "from edgedistill.export.onnx import OnnxExportOptions as O, export_onnx; \
export_onnx('runs/sentiment/distill', 'student-int4', O('int4'))"

The folder holds model.onnx (the graph) and model.onnx.data (every weight, so models over 2 GB
load), the source folder's own tokenizer files, genai_config.json for onnxruntime-genai (builder
path) or config.json (optimum path), and onnx_export.json: the path, precision and every
quantization option used, tool versions, file hashes, timings and the verification against
PyTorch. The export is made in a temporary folder beside `out_dir` and renamed into place only
when it is complete and verified, so nothing half-made or failing is ever found under the name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

from edgedistill import layout
from edgedistill.data.calibration import CHUNK_TOKENS, calibration_texts, token_chunks
from edgedistill.errors import EdgedistillError
from edgedistill.export.onnx.calibrate import activation_importance
from edgedistill.export.onnx.options import DATA_FILE, MANIFEST, MODEL_FILE, OnnxExportOptions
from edgedistill.export.onnx.paths import check_path_precision, choose_path, run_builder, run_optimum
from edgedistill.export.onnx.quantize import quantize_onnx
from edgedistill.export.source import hf_source
from edgedistill.layout import CHAT_TEMPLATE, HF_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_JSON
from edgedistill.runtimes.common import declared_stop_tokens

# Written by exporters from a re-saved tokenizer; replaced by the source folder's own files, so the
# export tokenizes exactly as the model that was trained and verified.
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE,
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
TOOLS = ("onnx", "onnxruntime", "onnxruntime-genai", "optimum", "optimum-onnx", "transformers")


def _read_source(hf_dir: Path) -> dict:
    config_file = hf_dir / HF_CONFIG
    if not config_file.is_file():
        raise EdgedistillError(f"{hf_dir} is not an HF model folder (no config.json)",
                               "pass a folder written by save_pretrained, e.g. runs/sentiment/distill")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EdgedistillError(f"{config_file} is not valid JSON: {err}") from None
    if not any(hf_dir.glob("*.safetensors")):
        raise EdgedistillError(f"{hf_dir} holds no *.safetensors weights",
                               "save the model with save_pretrained(..., safe_serialization=True)")
    if not (hf_dir / TOKENIZER_JSON).is_file():
        # onnxruntime-genai's tokenizer and this project's ONNX runtime read tokenizer.json only
        raise EdgedistillError(f"{hf_dir} has no tokenizer.json",
                               "save a fast tokenizer into the folder: AutoTokenizer.from_pretrained(...)"
                               ".save_pretrained(folder)")
    return config


def _use_source_tokenizer(hf_dir: Path, work: Path) -> list[str]:
    for name in TOKENIZER_FILES:
        (work / name).unlink(missing_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, work / name)
            copied.append(name)
    return copied


def _declare_stop_ids(genai_config: Path, hf_dir: Path) -> None:
    """Make genai_config.json's eos_token_id list every id that ends the model's turn: the builder
    writes generation_config.json's alone, without the chat template's end-of-turn token, and
    onnxruntime-genai stops at these ids only. A file that already names them all is left as written."""
    config = json.loads(genai_config.read_text(encoding="utf-8"))
    written = config["model"].get("eos_token_id")
    written = written if isinstance(written, list) else [written] if written is not None else []
    stop_ids = list(dict.fromkeys([*written, *declared_stop_tokens(hf_dir)]))
    if stop_ids != written:
        config["model"]["eos_token_id"] = stop_ids
        genai_config.write_text(json.dumps(config, indent=4), encoding="utf-8")


def _resave_external(model_file: Path) -> None:
    """Rewrite a graph so its weights live in DATA_FILE beside it (optimum inlines small models)."""
    import onnx

    model = onnx.load(str(model_file))
    for stale in model_file.parent.glob(model_file.name + "*"):
        stale.unlink()
    onnx.save_model(model, str(model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def _files(folder: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return files


def _tool_versions() -> dict[str, str]:
    return {tool: version(tool) for tool in TOOLS}


def export_onnx(model: Path | str, out_dir: Path, options: OnnxExportOptions) -> dict:
    """Export the model source `model` (built-in name, HF folder, GGUF file) as the ONNX folder
    `out_dir`, as `options` say; returns its manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not options.overwrite:
        raise EdgedistillError(f"{out_dir} already exists", "choose another folder or pass overwrite=True (--overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with hf_source(model, out_dir) as source:
        return _export(source.folder, out_dir, options)


def _export(hf_dir: Path, out_dir: Path, options: OnnxExportOptions) -> dict:
    from edgedistill.export.onnx.verify import format_verification, raise_if_failed, verify_onnx

    precision, progress, quant = options.precision, options.progress, options.quant
    config = _read_source(hf_dir)
    chosen = choose_path(config, options.path, hf_dir)
    calibration = options.calibration
    chunks = (_calibration_chunks(hf_dir, calibration, options.calibration_tokens,
                                  config.get("max_position_embeddings")) if calibration is not None else None)
    check_path_precision(chosen, precision)

    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    bar = _progress_bar(out_dir.name, ["export", "quantize", "verify"]) if progress else None
    seconds = {}
    try:
        quantized = precision in ("int8", "int4")
        work = tmp / ".float" if quantized else tmp
        work.mkdir(exist_ok=True)
        started = time.perf_counter()
        log_file = tmp / ".export.log"
        if chosen == "builder":
            run_builder(hf_dir, work, "fp16" if precision == "fp16" else "fp32", log_file=log_file,
                        timeout_s=options.timeout_s)
            shutil.rmtree(work / ".cache", ignore_errors=True)
            _declare_stop_ids(work / layout.GENAI_CONFIG, hf_dir)
        else:
            run_optimum(hf_dir, work, log_file=log_file, timeout_s=options.timeout_s)
            if not quantized:
                _resave_external(work / MODEL_FILE)
        seconds["export"] = round(time.perf_counter() - started, 2)
        _step(bar, "quantize")

        quantization = None
        if quantized:
            started = time.perf_counter()
            bits = 8 if precision == "int8" else 4
            importance = None
            # only 4-bit weights are rounded by importance: int8 with an int8 lm_head has none
            if chunks is not None and 4 in (bits, quant.lm_head_bits):
                importance = activation_importance(work, chunks)
                seconds["calibrate"] = round(time.perf_counter() - started, 2)
            done = quantize_onnx(work / MODEL_FILE, tmp / MODEL_FILE, bits, quant,
                                 tied=bool(config.get("tie_word_embeddings", False)),
                                 hidden_size=config.get("hidden_size"), importance=importance)
            quantization = {**quant.record(precision), **done, "calibration": None if importance is None else {
                "file": str(calibration), "tokens": sum(map(len, chunks)), "chunks": len(chunks)}}
            for item in work.iterdir():
                if not item.name.startswith(MODEL_FILE):
                    shutil.move(str(item), str(tmp / item.name))
            shutil.rmtree(work)
            seconds["quantize"] = round(time.perf_counter() - started - seconds.get("calibrate", 0), 2)
        tokenizer_files = _use_source_tokenizer(hf_dir, tmp)
        _step(bar, "verify")

        verification = None
        if options.verify:
            started = time.perf_counter()
            verification = verify_onnx(tmp, hf_dir, precision=precision, reference=options.reference,
                                       threads=options.threads, raise_on_failure=False)
            seconds["verify"] = round(time.perf_counter() - started, 2)
            if progress:
                print(format_verification([{**verification, "file": str(out_dir)}]))
            raise_if_failed([{**verification, "file": str(out_dir)}])
        _step(bar, None)

        log_file.unlink(missing_ok=True)
        manifest = {
            "format": "onnx",
            "precision": precision,
            "path": chosen,
            "runtime": "onnxruntime-genai" if chosen == "builder" else "onnxruntime",
            "source": str(hf_dir),
            "architecture": (config.get("architectures") or [None])[0],
            "model_type": config.get("model_type"),
            "quantization": quantization,
            "tokenizer_files": tokenizer_files,
            "tools": _tool_versions(),
            "seconds": seconds,
            "files": _files(tmp),
            # without paths: the folder is renamed into place after this
            "verification": ({k: v for k, v in verification.items() if k not in ("file", "reference")}
                             if verification else None),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(tmp, out_dir)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bar is not None:
            bar.close()


def _calibration_chunks(hf_dir: Path, calibration: Path, max_tokens: int, context: int | None) -> list[list[int]]:
    """The calibration file's text as token chunks no longer than the model's context, read before
    any export work so that a bad file fails first."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return token_chunks(tokenizer, calibration_texts(Path(calibration), tokenizer), max_tokens,
                        min(CHUNK_TOKENS, context or CHUNK_TOKENS))


def _replace(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` (overwrite) is moved aside first, removed after."""
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _progress_bar(label: str, steps: list[str]):
    from tqdm import tqdm

    bar = tqdm(total=len(steps), unit="step", desc=f"onnx {label}")
    bar.set_postfix_str(steps[0])
    return bar


def _step(bar, next_step: str | None) -> None:
    if bar is not None:
        bar.update()
        if next_step:
            bar.set_postfix_str(next_step)


def export_onnx_set(model: Path, out: Path, role: str, options: OnnxExportOptions,
                    precisions: list[str]) -> dict:
    """The export stage's ONNX part: `<role>-<precision>/` folders in the stage folder `out`, one
    PyTorch reference for all of them; returns each one's manifest by precision."""
    from edgedistill.export.onnx.verify import reference_for

    options = replace(options, reference=reference_for(model))
    return {precision: export_onnx(model, Path(out) / layout.onnx_folder_name(role, precision),
                                   replace(options, precision=precision))
            for precision in precisions}
