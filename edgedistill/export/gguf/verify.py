"""Check a GGUF file in llama.cpp against the PyTorch model it was exported from.

    edgedistill verify-export runs/tiny/export/student-q4_k_m.gguf --reference runs/tiny/distill
    python -c "from edgedistill.export.gguf.verify import verify_gguf; print(verify_gguf('m.gguf', 'runs/tiny/distill'))"

llama.cpp scores the reference folder's HF token ids (whether it tokenizes the texts the same way
is checked and reported) as a user of the file runs it, on CPU; the texts, the scoring, near ties
and the bounds are edgedistill.export.verify's. The file's type (general.file_type) picks its bound
in BOUNDS (edgedistill.formats.GGUF_TYPES); a file beyond its bound raises EdgedistillError.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgedistill.errors import EdgedistillError
from edgedistill.export import verify
from edgedistill.export.verify import GREEDY_TOKENS, Column, Reference, bound_failures, compare_greedy, score_texts
from edgedistill.formats import GGUF_TYPES, Bound

# by file type; verify_gguf's `bounds` overrides entries
BOUNDS: dict[str, Bound] = {name: kind.bound for name, kind in GGUF_TYPES.items()}


def file_type_name(value: int | str | None) -> str:
    """general.file_type as this project names quantizations: 15 → "Q4_K_M", 1 → "F16"."""
    import gguf

    if value is None:
        return "unknown"
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return f"file_type {value}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _load_llama(path: Path, n_ctx: int, threads: int | None, lora: Path | None = None):
    from llama_cpp import Llama

    if not path.is_file():
        raise EdgedistillError(f"{path} does not exist", "pass the path of a .gguf file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise EdgedistillError(f"{path} is not a GGUF file", "pass a .gguf file written by edgedistill export")
    threads = threads or os.cpu_count()
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads,
                     n_threads_batch=threads, n_gpu_layers=0, verbose=False,
                     lora_path=None if lora is None else str(lora))
    except ValueError as err:
        raise EdgedistillError(f"llama.cpp could not load {path}: {err}",
                               "export the file again; it may be truncated or from another llama.cpp") from None


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _score(path: Path, ref: Reference, threads: int | None, table: dict[str, Bound | None],
           lora: Path | None = None) -> dict:
    n_ctx = max(len(ids) for ids in [*ref.text_ids, *ref.prompts]) + GREEDY_TOKENS
    llm = _load_llama(path, max(n_ctx, 64), threads, lora)
    try:
        result = _score_loaded(llm, path, ref, table)
        return result if lora is None else {**result, "lora": str(lora)}
    finally:
        llm.close()


def _score_loaded(llm, path: Path, ref: Reference, table: dict[str, Bound | None]) -> dict:
    if llm.n_vocab() != ref.logprobs[0].shape[-1]:
        raise EdgedistillError(
            f"{path} has {llm.n_vocab()} tokens but {ref.folder} has {ref.logprobs[0].shape[-1]}",
            "pass the HF folder this GGUF was exported from as the reference")
    file_type = file_type_name(llm.metadata.get("general.file_type"))
    bound = table.get(file_type)
    tie_margin = (bound or Bound()).tie_margin

    differing = [text for text in ref.texts
                 if llm.tokenize(text.encode(), add_bos=False, special=True)
                 != ref.tokenizer(text, add_special_tokens=False).input_ids]

    def greedy(prompt: list[int]) -> list[int]:
        got = [int(_llama_logits(llm, prompt)[-1].argmax())]
        for _ in range(GREEDY_TOKENS - 1):
            llm.eval([got[-1]])
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return got

    return {
        "file": str(path),
        "file_type": file_type,
        "reference": str(ref.folder),
        "tokenization_identical": not differing,
        "texts_tokenized_differently": differing,
        **score_texts(ref, lambda ids: _llama_logits(llm, ids), tie_margin, "gguf", path),
        **compare_greedy(ref, greedy, tie_margin, "gguf"),
        "tie_margin": tie_margin,
        "bound": asdict(bound) if bound is not None else None,
    }


def _fix(result: dict) -> str:
    file_type = result["file_type"]
    if file_type in ("F32", "F16"):
        return ("a full-precision file should match PyTorch: the conversion is wrong (tensor map, rotary "
                "layout, tokenizer) or the reference is not the folder the file was exported from")
    if file_type in GGUF_TYPES:
        order = list(GGUF_TYPES)
        higher = order[order.index(file_type) - 1]
        return (f"export a higher-precision type, e.g. {higher} instead of {file_type} (export.quants or "
                "export.teacher_quants in a recipe, --quant for edgedistill export)")
    return "export a higher-precision type"


def verify_ggufs(gguf_paths: list[Path], reference_hf_dir: Path, *, texts: list[str] | None = None,
                 bounds: dict[str, Bound | None] | None = None, threads: int | None = None,
                 raise_on_failure: bool = True, lora: Path | None = None) -> list[dict]:
    """verify_gguf for several files against one reference, which PyTorch then scores only once."""
    reference_hf_dir = Path(reference_hf_dir)
    table = {**BOUNDS, **(bounds or {})}
    ref = verify.reference(reference_hf_dir, texts)
    results = []
    for path in gguf_paths:
        result = _score(Path(path), ref, threads, table, lora)
        failures = bound_failures(result)
        result.update(failures=failures, passed=not failures)
        results.append(result)
    if raise_on_failure:
        raise_if_failed(results)
    return results


def verify_gguf(gguf_path: Path, reference_hf_dir: Path, *, texts: list[str] | None = None,
                bounds: dict[str, Bound | None] | None = None, threads: int | None = None,
                raise_on_failure: bool = True, lora: Path | None = None) -> dict:
    """Compare the GGUF at `gguf_path` in llama.cpp with the HF folder `reference_hf_dir` in PyTorch.

    `texts` replace edgedistill.export.verify.EVAL_TEXTS (e.g. a task's held-out prompts); `bounds`
    override entries of BOUNDS by file type (None: report without a bound). A missed bound raises
    EdgedistillError unless `raise_on_failure` is False; the result's `passed` and `failures` say it
    either way.
    `lora`: a GGUF LoRA adapter llama.cpp applies to the file at load; the reference is then the
    merged model.
    """
    return verify_ggufs([gguf_path], reference_hf_dir, texts=texts, bounds=bounds, threads=threads,
                        raise_on_failure=raise_on_failure, lora=lora)[0]


def raise_if_failed(results: list[dict]) -> None:
    verify.raise_if_failed(results, _fix, separator=", ")


COLUMNS = [
    Column("file", "<28", lambda r: Path(r["file"]).name),
    Column("type", "<7", lambda r: r["file_type"]),
    Column("top-1", ">7.4f", lambda r: r["top1_agreement"]),
    Column("ties", ">5", lambda r: r["top1_near_ties"]),
    Column("mean KL", ">9.5f", lambda r: r["mean_kl"]),
    Column("PPL torch", ">10.5g", lambda r: r["perplexity_torch"]),
    Column("PPL gguf", ">9.5g", lambda r: r["perplexity_gguf"]),
    Column("ratio", ">7.4f", lambda r: r["perplexity_ratio"]),
    Column("greedy", ">9", lambda r: r["greedy_verdict"]),
]


def _tokenization_note(result: dict) -> list[str]:
    if result["tokenization_identical"]:
        return []
    return [f"  note: llama.cpp tokenizes {len(result['texts_tokenized_differently'])} text(s) differently "
            "from the HF tokenizer; both were scored on the HF token ids"]


def format_verification(results: list[dict]) -> str:
    """A table, one row per file, with the bound each figure is held to."""
    return verify.format_verification(results, COLUMNS, _tokenization_note)
