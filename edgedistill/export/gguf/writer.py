"""Write an HF model folder (config.json + safetensors + tokenizer) as an F16 GGUF file for llama.cpp.

Tensors are streamed: the plan (names, shapes, types) comes from the safetensors headers alone,
GGUFWriter writes header, metadata and tensor infos from it, and then each tensor is read,
converted and written one at a time, so memory holds one tensor, not the model. 2-D weights are
stored as float16, norms and biases (1-D) as float32. The file is written beside `out_file` under
a temporary name and renamed into place only when complete.

Besides the hyperparameters llama.cpp needs, general.* records what a user of the file asks: its
name, parameter count (size_label), who wrote it (quantized_by), and, only when the folder says
so, where it comes from (config.json's `_name_or_path` naming a Hugging Face repo) and its terms
(the license, languages and tags of a README.md model card's YAML front matter). Nothing is
guessed: a folder without a card gets no license key.

    write_gguf(Path("runs/tiny/merged"), Path("tiny-f16.gguf"))
    python -c "from edgedistill.export.gguf import write_gguf; write_gguf('runs/tiny/merged', 'm.gguf')"
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import yaml
from gguf import Keys
from safetensors import SafetensorError, safe_open

from edgedistill.errors import EdgedistillError, no_room, no_room_error
from edgedistill.export.gguf import arch
from edgedistill.export.gguf.tokenizer import add_tokenizer_metadata, read_tokenizer
from edgedistill.layout import HF_CONFIG


QUANTIZED_BY = "edgedistill"
HUB_URL = "https://huggingface.co/"
# The GGUF spec's key (ggml docs/gguf.md) for the Hugging Face repo a model comes from; gguf-py,
# which has constants for the rest of general.*, lacks this one, and model viewers read it.
SOURCE_HF_REPO = "general.source.huggingface.repository"
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

# model card field → (GGUF key, written as one comma-joined string rather than an array)
CARD_KEYS: dict[str, tuple[str, bool]] = {
    "license": (Keys.General.LICENSE, True),
    "license_name": (Keys.General.LICENSE_NAME, True),
    "license_link": (Keys.General.LICENSE_LINK, True),
    "language": (Keys.General.LANGUAGES, False),
    "tags": (Keys.General.TAGS, False),
}


@dataclass(frozen=True)
class Provenance:
    """Where the model comes from and under which terms, as its folder states them."""

    hub_repo: str | None  # "org/name"
    card: dict[str, list[str]]  # CARD_KEYS fields present in README.md's front matter


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor and where its data comes from."""

    source: str
    gguf_name: str
    shape: tuple[int, ...]
    dtype: type[np.floating]
    rope_heads: int | None  # permute rows for llama.cpp's NORM rope by this many heads
    offset: float = 0.0  # added to every value (TensorRule.weight_offset)
    values: np.ndarray | None = None  # a tensor computed from config.json (arch.computed_tensors), not read

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _read_config(hf_dir: Path) -> tuple[dict, Path]:
    config_file = hf_dir / HF_CONFIG
    if not config_file.is_file():
        raise EdgedistillError(f"{config_file} not found", "pass an HF model folder written by save_pretrained")
    try:
        return json.loads(config_file.read_text(encoding="utf-8")), config_file
    except json.JSONDecodeError as err:
        raise EdgedistillError(f"{config_file} is not valid JSON: {err}") from None


def read_model_card(hf_dir: Path) -> dict[str, list[str]]:
    """The CARD_KEYS fields of `hf_dir`/README.md's YAML front matter, each as a list of strings.

    {} when there is no README.md or it has no front matter. YAML's BaseLoader keeps every value
    a string, so `language: no` (Norwegian) stays "no" rather than becoming False.
    """
    readme = Path(hf_dir) / "README.md"
    if not readme.is_file():
        return {}
    lines = readme.read_text(encoding="utf-8-sig").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        raise EdgedistillError(f"{readme}: the YAML front matter opened by its first line `---` is never closed",
                               "end the front matter with a line `---`, or remove README.md")
    try:
        front = yaml.load("\n".join(lines[1:end]), Loader=yaml.BaseLoader) or {}
    except yaml.YAMLError as err:
        raise EdgedistillError(f"{readme}: the YAML front matter is not valid: {err}",
                               "fix the model card's front matter, or remove README.md") from None
    if not isinstance(front, dict):
        raise EdgedistillError(f"{readme}: the YAML front matter is a {type(front).__name__}, not a mapping")
    card = {}
    for field in CARD_KEYS:
        value = front.get(field)
        values = [value] if isinstance(value, str) else value if value is not None else []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise EdgedistillError(f"{readme}: front matter `{field}` = {value!r} is not a string or a list of strings",
                                   "fix the model card's front matter, or remove README.md")
        if any(v.strip() for v in values):
            card[field] = [v.strip() for v in values if v.strip()]
    return card


def hub_repo_id(config: dict, hf_dir: Path) -> str | None:
    """The Hugging Face repo ("org/name") config.json's `_name_or_path` names, else None.

    Older transformers saved the argument of from_pretrained there: a repo id or a local path.
    A relative path can look like a repo id, so a value that exists on disk, or that the folder's
    own path ends with, is taken as a path.
    """
    value = config.get("_name_or_path")
    if not isinstance(value, str) or not _HUB_REPO_ID.fullmatch(value):
        return None
    if Path(value).exists() or Path(hf_dir).resolve().as_posix().endswith("/" + value):
        return None
    return value


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise EdgedistillError(
            f"{hf_dir}: no *.safetensors files", "save the model with save_pretrained(safe_serialization=True)"
        )
    return files


def open_safetensors(path: Path, framework: str = "pt"):
    """safe_open, with a damaged or truncated file reported as such instead of a parser error."""
    try:
        return safe_open(path, framework=framework)
    except (SafetensorError, OSError) as err:
        raise EdgedistillError(f"{path} is damaged or truncated ({err})",
                               "copy or save the model again (save_pretrained(..., safe_serialization=True))") from None


# the smallest magnitude that float16 rounds to infinity (its largest finite value is 65504)
FLOAT16_OVERFLOW = 65520.0


def check_room(out_file: Path, needed_bytes: int) -> None:
    """Fail before writing anything when the disk of `out_file` has less than `needed_bytes` free."""
    free = shutil.disk_usage(out_file.parent).free
    if free < needed_bytes:
        raise EdgedistillError(
            f"{out_file.parent} has {free / 1e6:.1f} MB free, {out_file.name} needs about {needed_bytes / 1e6:.1f} MB",
            "free some space on that disk or write the file elsewhere")


def plan_tensors(spec: arch.ArchSpec, dims: arch.Dims, tied: bool, shapes: dict[str, tuple[int, ...]],
                 where: Path) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its GGUF tensor, checking names and shapes.

    Fails if a required tensor is missing, a shape differs from what config.json implies, or a
    checkpoint tensor is neither mapped nor listed as ignorable (it would be silently lost).
    """
    plan: list[PlannedTensor] = []
    used: set[str] = set()
    missing: list[str] = []
    wrong_shape: list[str] = []

    def take(source: str, expected: tuple[int, ...]) -> None:
        used.add(source)
        if shapes[source] != expected:
            wrong_shape.append(f"{source} {list(shapes[source])} (config implies {list(expected)})")

    for rule in spec.tensors:
        for bid in range(dims["n_layer"]) if rule.per_block else [None]:
            module = rule.hf_name.format(bid=bid)
            shape = tuple(dims[d] for d in rule.shape)
            weight = module + ".weight"
            if rule.dropped_when_tied and tied:
                if weight in shapes:
                    take(weight, shape)
                continue
            if weight not in shapes:
                missing.append(weight)
                continue
            take(weight, shape)
            heads = spec.permuted_heads(rule, dims)
            dtype = np.float16 if len(shape) == 2 else np.float32
            plan.append(PlannedTensor(weight, rule.gguf_name(bid) + ".weight", shape, dtype, heads,
                                      rule.weight_offset))
            if rule.bias and module + ".bias" in shapes:
                take(module + ".bias", shape[:1])
                plan.append(PlannedTensor(module + ".bias", rule.gguf_name(bid) + ".bias", shape[:1],
                                          np.float32, heads))

    unused = sorted(
        name for name in shapes
        if name not in used and not any(re.fullmatch(p, name) for p in spec.ignored)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if wrong_shape:
        problems.append(f"unexpected shapes: {'; '.join(wrong_shape)}")
    if unused:
        problems.append(f"tensors the {spec.hf_architecture} map does not cover: {', '.join(unused)}")
    if problems:
        raise EdgedistillError(
            f"{where}: checkpoint does not match config.json for {spec.hf_architecture}: " + " | ".join(problems),
            "re-save the model with save_pretrained, or extend the tensor map in edgedistill/export/gguf/arch.py",
        )
    return plan


def _read_converted(path: Path, planned: PlannedTensor) -> np.ndarray:
    # safetensors memory-maps the file, and every page read stays resident while it is mapped:
    # opening the file per tensor unmaps each tensor once converted, so memory holds one tensor
    with open_safetensors(path) as f:
        tensor = f.get_tensor(planned.source)
    return _convert(tensor, planned)


def _convert(tensor: torch.Tensor, planned: PlannedTensor) -> np.ndarray:
    # in torch: numpy has no bfloat16 (a common checkpoint type), and torch's float16 cast is
    # several times faster than numpy's
    data = tensor
    if planned.rope_heads is not None:
        data = arch.permute_rotary_rows(data, planned.rope_heads)
    if planned.offset:
        data = data.float() + planned.offset
    if planned.dtype == np.float16:
        # one min/max pass over the source (isfinite over the float16 result is ~5x slower);
        # 65520 and beyond round to infinity, a source already non-finite is not an overflow
        low, high = torch.aminmax(data)
        peak = max(-low.item(), high.item())
        if math.isfinite(peak) and peak >= FLOAT16_OVERFLOW:
            raise EdgedistillError(f"{planned.source} has values beyond float16's range (max |x| {peak:.3g})",
                                   "rescale the weights, or export to a format that keeps bfloat16/float32")
    out = data.to(torch.float16 if planned.dtype == np.float16 else torch.float32)
    return np.ascontiguousarray(out.numpy())


def _add_metadata(writer: gguf.GGUFWriter, spec: arch.ArchSpec, dims: arch.Dims, name: str, n_params: int,
                  provenance: Provenance) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(n_params, n_params, 0, 0))
    # llama.cpp's quantizer copies every key, so quantized files made from this one keep it too
    writer.add_quantized_by(QUANTIZED_BY)
    if provenance.hub_repo:
        writer.add_source_url(HUB_URL + provenance.hub_repo)
        writer.add_string(SOURCE_HF_REPO, provenance.hub_repo)
    for field, values in provenance.card.items():
        key, joined = CARD_KEYS[field]
        if joined:
            writer.add_string(key, ",".join(values))
        else:
            writer.add_array(key, values)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for hparam in spec.hparams:
        writer.add_key_value(hparam.key.format(arch=spec.gguf_arch_name), dims[hparam.dim], hparam.vtype)
    # always explicit: without the key llama.cpp assumes "linear" (with factor 1)
    writer.add_rope_scaling_type(gguf.RopeScalingType(dims["rope_scaling_type"]))
    if "rope_scaling_factor" in dims:
        writer.add_rope_scaling_factor(dims["rope_scaling_factor"])


def write_gguf(hf_dir: Path, out_file: Path, *, name: str | None = None, overwrite: bool = False,
               progress: bool = False) -> Path:
    """Write the HF model folder `hf_dir` as an F16 GGUF at `out_file` and return `out_file`.

    `name` becomes general.name (default: the repo's model name when config.json names a Hugging
    Face repo, else the folder's name). An existing `out_file` is an error unless `overwrite`.
    `progress` shows a tqdm bar over the tensor bytes written.
    """
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if out_file.exists() and not overwrite:
        raise EdgedistillError(f"{out_file} already exists", "choose another path or pass overwrite=True")
    if not out_file.parent.is_dir():
        raise EdgedistillError(f"{out_file.parent} is not a folder", "create the output folder first")
    config, config_file = _read_config(hf_dir)
    spec, dims = arch.gguf_layout(config, config_file)
    vocab = read_tokenizer(hf_dir, vocab_size=dims["vocab"])
    tied = bool(config.get("tie_word_embeddings", spec.tied_default))
    provenance = Provenance(hub_repo_id(config, hf_dir), read_model_card(hf_dir))
    if name is None:
        name = provenance.hub_repo.split("/")[1] if provenance.hub_repo else hf_dir.resolve().name

    source_file: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _safetensors_files(hf_dir):
        with open_safetensors(path) as f:
            for key in f.keys():
                source_file[key], shapes[key] = path, tuple(f.get_slice(key).get_shape())
    plan = plan_tensors(spec, dims, tied, shapes, hf_dir)
    plan += [PlannedTensor(f"{HF_CONFIG} (computed)", name, values.shape, np.float32, None, values=values)
             for name, values in arch.computed_tensors(dims).items()]
    check_room(out_file, sum(p.nbytes for p in plan))

    with gguf_writer_into(out_file, spec.gguf_arch_name) as writer:
        _add_metadata(writer, spec, dims, name, sum(int(np.prod(p.shape)) for p in plan), provenance)
        add_tokenizer_metadata(writer, vocab)
        for planned in plan:
            writer.add_tensor_info(planned.gguf_name, planned.shape, np.dtype(planned.dtype), planned.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = _progress_bar(sum(p.nbytes for p in plan), out_file.name) if progress else None
        # write_tensor_data takes tensors in the order their infos were added
        for planned in plan:
            writer.write_tensor_data(planned.values if planned.values is not None
                                     else _read_converted(source_file[planned.source], planned))
            if bar is not None:
                bar.update(planned.nbytes)
        if bar is not None:
            bar.close()
    return out_file


@contextmanager
def gguf_writer_into(out_file: Path, arch_name: str):
    """A GGUFWriter on a temporary name beside `out_file`, renamed to it only when the block
    finishes; on an error the partial file is removed, so nothing half-written has the final name."""
    # a plain name (not mkstemp's 0600 file) so the result gets the usual permissions
    tmp_file = out_file.with_name(f".{out_file.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(tmp_file, arch_name)
    try:
        yield writer
        writer.close()
        os.replace(tmp_file, out_file)
    except OSError as err:
        if no_room(err) is None:
            raise
        raise no_room_error(out_file, err, "or write the file elsewhere; the partial file was removed") from None
    finally:
        writer.close()
        tmp_file.unlink(missing_ok=True)


def _progress_bar(total_bytes: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"writing {label}")
