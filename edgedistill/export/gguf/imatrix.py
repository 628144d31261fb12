"""Importance matrices for llama.cpp's quantizer, computed in PyTorch from the task's own text.

llama.cpp's quantizers weigh each weight column's rounding error by how large that column's input
activations are (the mean of x² over calibration tokens, per linear layer): an "imatrix". llama.cpp
computes it with its `llama-imatrix` tool on generic text; here it is computed on the distillation
data (prompts and teacher answers, in the chat template the student was trained on), so the bits go
where this task's activations are, on the exact weights being exported: in the dtype the folder
stores them in (float32 for a student), batches of chunks at a time; `compute` (a recipe's compute:
section) runs it elsewhere, on a GPU say, for a large teacher.

The file is written in llama.cpp's GGUF imatrix format (`<tensor>.in_sum2` / `<tensor>.counts`
tensors, `imatrix.datasets` / `imatrix.chunk_count` / `imatrix.chunk_size` keys), so it also works
with `llama-quantize --imatrix`; `quantize_gguf(..., imatrix=path)` reads it back.

    edgedistill export runs/sentiment/distill --quant q4_k_m \\
        --calibration runs/sentiment/generate/train.jsonl --out student-q4_k_m.gguf
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from edgedistill.data.calibration import calibration_texts, token_chunks
from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import arch
from edgedistill.export.gguf.writer import _read_config, gguf_writer_into
from edgedistill.recipe import ComputeConfig
from edgedistill.runtimes.compute import load_on, resolve_compute
from edgedistill.sources.gguf import read_gguf

# chunks of edgedistill.data.calibration.CHUNK_TOKENS tokens per forward pass
BATCH_CHUNKS = 4

@dataclass(frozen=True)
class Imatrix:
    """Mean squared input activation per column, by GGUF weight name, and where it came from."""

    values: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int
    chunk_size: int


def linear_tensor_names(hf_dir: Path) -> dict[str, str]:
    """HF module name → GGUF weight name, for every matrix llama.cpp multiplies activations by."""
    config, config_file = _read_config(Path(hf_dir))
    spec, dims = arch.gguf_layout(config, config_file)
    tied = bool(config.get("tie_word_embeddings", spec.tied_default))
    names = {}
    for rule in spec.tensors:
        # the embedding is a lookup, not a product; a tied lm_head is the embedding in GGUF
        if len(rule.shape) != 2 or rule.tensor == gguf.MODEL_TENSOR.TOKEN_EMBD or (rule.dropped_when_tied and tied):
            continue
        for bid in range(dims["n_layer"]) if rule.per_block else [None]:
            names[rule.hf_name.format(bid=bid)] = rule.gguf_name(bid) + ".weight"
    if tied:
        # llama.cpp multiplies by token_embd for the logits, and llama-imatrix records it so
        lm_head = next(r for r in spec.tensors if r.dropped_when_tied)
        names[lm_head.hf_name] = "token_embd.weight"
    return names


@torch.inference_mode()
def compute_imatrix(hf_dir: Path, texts: list[str], out_file: Path, *, dataset: str,
                    max_tokens: int = 65536, overwrite: bool = False, compute: ComputeConfig | None = None) -> Path:
    """Run the HF model over `texts` (packed into edgedistill.data.calibration.CHUNK_TOKENS-token
    chunks, at most `max_tokens` tokens) and write the imatrix of every linear layer's input to `out_file`.
    `compute`: where and in what dtype the model runs (default: the CPU, in the folder's stored dtype)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if out_file.exists() and not overwrite:
        raise EdgedistillError(f"{out_file} already exists", "choose another path or pass overwrite=True")
    names = linear_tensor_names(hf_dir)
    chunks = token_chunks(AutoTokenizer.from_pretrained(hf_dir), texts, max_tokens)

    model = load_on(hf_dir, resolve_compute(compute or ComputeConfig(device="cpu"), hf_dir))
    modules = dict(model.named_modules())
    missing = sorted(set(names) - set(modules))
    if missing:
        raise EdgedistillError(f"{hf_dir}: modules {', '.join(missing[:3])} not in the loaded model",
                               "the folder's weights do not match its config.json")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(gguf_name: str):
        def hook(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[gguf_name] = sums.get(gguf_name, 0) + (x * x).sum(0).cpu()
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]
        return hook

    handles = [modules[hf].register_forward_pre_hook(collect(g)) for hf, g in names.items()]
    try:
        # chunks are all one length (or there is one), so a batch needs no padding
        for start in tqdm(range(0, len(chunks), BATCH_CHUNKS), desc=f"imatrix {hf_dir.name}", unit="batch"):
            model(torch.tensor(chunks[start:start + BATCH_CHUNKS], device=model.device))
    finally:
        for handle in handles:
            handle.remove()

    with gguf_writer_into(out_file, "imatrix") as writer:
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", [dataset])
        writer.add_uint32("imatrix.chunk_count", len(chunks))
        writer.add_uint32("imatrix.chunk_size", len(chunks[0]))
        for gguf_name in names.values():
            # llama.cpp's layout: sums (n_expert, n_in) and counts (n_expert, 1), one expert here
            writer.add_tensor(gguf_name + ".in_sum2", sums[gguf_name].float().numpy()[None, :])
            writer.add_tensor(gguf_name + ".counts", np.array([[counts[gguf_name]]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out_file


def imatrix_from_file(hf_dir: Path, calibration: Path, out_file: Path, *, dataset: str) -> Path:
    """compute_imatrix on the texts of a calibration file (edgedistill.data.calibration.calibration_texts)."""
    from transformers import AutoTokenizer

    texts = calibration_texts(calibration, AutoTokenizer.from_pretrained(hf_dir))
    return compute_imatrix(hf_dir, texts, out_file, dataset=dataset)


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix GGUF file (ours or llama-imatrix's) as mean squared activations per weight."""
    path = Path(path)
    if not path.is_file():
        raise EdgedistillError(f"imatrix file {path} not found",
                               "compute one with `edgedistill export ... --calibration FILE`")
    try:
        reader = read_gguf(path)
    except EdgedistillError as err:
        raise EdgedistillError(f"not a GGUF imatrix file: {err.problem}",
                               "pass a file written by edgedistill or by llama-imatrix (GGUF format)") from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    values = {}
    for name, in_sum2 in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        weight = name[: -len(".in_sum2")]
        count = tensors.get(weight + ".counts")
        if count is None:
            raise EdgedistillError(f"{path}: {name} has no matching {weight}.counts tensor",
                                   "the file is damaged; compute the imatrix again")
        per_expert = in_sum2.reshape(count.size, -1)
        # a weight that saw no calibration token gets neutral weights, as llama.cpp's loader does
        mean = np.where(count.reshape(-1, 1) > 0, per_expert / np.maximum(count.reshape(-1, 1), 1), 1.0)
        values[weight] = mean.reshape(-1).astype(np.float32)
    if not values:
        raise EdgedistillError(f"{path} holds no <tensor>.in_sum2 entries", "it is not an imatrix file")

    def field(key: str):
        item = reader.get_field(key)
        return None if item is None else item.contents()

    return Imatrix(values, list(field("imatrix.datasets") or []), int(field("imatrix.chunk_count") or 0),
                   int(field("imatrix.chunk_size") or 0))
