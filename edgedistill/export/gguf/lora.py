"""Write a PEFT LoRA adapter as a GGUF LoRA file that llama.cpp applies to its base model at load time.

One base GGUF (written by `write_gguf` from the same HF folder) then serves several task adapters:
llama.cpp adds scale * B·A to each adapted weight, scale = adapter.lora.alpha / rank. Tensor names
come from arch.py's tables, as in the writer, each module's `lora_A`/`lora_B` becoming
`<gguf tensor>.weight.lora_a`/`.lora_b` in HF (PyTorch) order: lora_a (rank, in), lora_b
(out, rank). Where the writer permutes a q/k weight's rows for llama.cpp's rope, lora_b's rows get
the same permutation (B·A's rows are W's rows); lora_a, acting on the input, is left as it is.
Both are stored as float32: they are small, and rounding them would add to the base's error.

    write_lora_gguf(Path("runs/tiny-lora/lora"), Path("runs/tiny-lora/distill"), Path("task-lora.gguf"))
    python -c "from edgedistill.export.gguf.lora import write_lora_gguf as w; w('run/lora', 'run/distill', 'a.gguf')"
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
from gguf import Keys

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import arch
from edgedistill.export.gguf.writer import QUANTIZED_BY, _read_config, gguf_writer_into, open_safetensors
from edgedistill.export.refusal import ConfigRefusal

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# adapter_config.json options whose update llama.cpp's `W + alpha/rank * B·A` cannot express
_UNSUPPORTED = {"use_dora": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                "lora_bias": (False, None), "modules_to_save": (None, [])}


def _read_adapter_config(adapter_dir: Path) -> tuple[dict, Path]:
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file() or not (adapter_dir / ADAPTER_FILE).is_file():
        raise EdgedistillError(f"{adapter_dir}: expected {ADAPTER_CONFIG} and {ADAPTER_FILE}",
                               "pass the `lora` stage folder (PEFT save_pretrained with safe_serialization)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise EdgedistillError(f"{config_file}: `peft_type` = {config['peft_type']!r} is not LORA")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise EdgedistillError(f"{config_file}: `{key}` = {config[key]!r} is not supported by the GGUF LoRA "
                                   "exporter: llama.cpp applies alpha/rank * B·A only", "merge the adapter instead")
    return config, config_file


def _rules_by_module(spec: arch.ArchSpec, dims: arch.Dims, tied: bool) -> dict[str, tuple[arch.TensorRule, int | None]]:
    """HF module name → (its rule, block index), for every 2-D weight llama.cpp can adapt."""
    rules = {}
    for rule in spec.tensors:
        # token_embd takes a differently laid out adapter in llama.cpp; norms (1-D) take none
        if len(rule.shape) != 2 or rule.tensor is gguf.MODEL_TENSOR.TOKEN_EMBD or (rule.dropped_when_tied and tied):
            continue
        for bid in range(dims["n_layer"]) if rule.per_block else [None]:
            rules[rule.hf_name.format(bid=bid)] = (rule, bid)
    return rules


def check_lora_targets(target_modules: list[str], spec: arch.ArchSpec, dims: arch.Dims, tied: bool,
                       where: Path | str) -> None:
    """Refuse target module names (PEFT's: a module name or its last parts) that adapt no weight a
    GGUF LoRA can carry; read from the adapter's config here, and from the recipe's lora section by
    edgedistill.export.check before any training."""
    modules = _rules_by_module(spec, dims, tied)
    refused = [t for t in target_modules if not any(m == t or m.endswith("." + t) for m in modules)]
    if refused:
        adaptable = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise ConfigRefusal(f"{where}: target modules {refused} adapt no {spec.hf_architecture} weight a GGUF LoRA "
                            "can carry (llama.cpp adapts 2-D weights other than the token embedding)",
                            f"adapt only {', '.join(adaptable)}", keys=("target_modules",))


def write_lora_gguf(adapter_dir: Path, base_hf_dir: Path, out_file: Path, *, overwrite: bool = False) -> Path:
    """Write the PEFT adapter in `adapter_dir`, trained on the HF model `base_hf_dir`, as a GGUF LoRA.

    Fails if the adapter names a module the architecture's table has no 2-D weight for, a shape
    differs from what the base's config.json implies, or a module has only one of lora_A/lora_B.
    An existing `out_file` is an error unless `overwrite`.
    """
    adapter_dir, base_hf_dir, out_file = Path(adapter_dir), Path(base_hf_dir), Path(out_file)
    if out_file.exists() and not overwrite:
        raise EdgedistillError(f"{out_file} already exists", "choose another path or pass overwrite=True")
    if not out_file.parent.is_dir():
        raise EdgedistillError(f"{out_file.parent} is not a folder", "create the output folder first")
    adapter_config, adapter_config_file = _read_adapter_config(adapter_dir)
    config, config_file = _read_config(base_hf_dir)
    spec, dims = arch.gguf_layout(config, config_file)
    tied = bool(config.get("tie_word_embeddings", spec.tied_default))
    if isinstance(adapter_config.get("target_modules"), list):  # PEFT also takes one regex, checked per tensor below
        check_lora_targets(adapter_config["target_modules"], spec, dims, tied, adapter_config_file)
    rules = _rules_by_module(spec, dims, tied)

    with open_safetensors(adapter_dir / ADAPTER_FILE, framework="numpy") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key, value in tensors.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None or match["module"] not in rules:
            problems.append(f"{key} (no 2-D {spec.hf_architecture} weight llama.cpp can adapt)")
            continue
        pairs.setdefault(match["module"], {})[match["part"]] = value
    ranks = set()
    for module, pair in pairs.items():
        rule, _ = rules[module]
        out_dim, in_dim = (dims[d] for d in rule.shape)
        if set(pair) != {"A", "B"}:
            problems.append(f"{module} has only lora_{''.join(pair)}")
            continue
        rank = pair["A"].shape[0]
        ranks.add(rank)
        if pair["A"].shape != (rank, in_dim) or pair["B"].shape != (out_dim, rank):
            problems.append(f"{module}: lora_A {list(pair['A'].shape)}, lora_B {list(pair['B'].shape)} "
                            f"(base config implies [r, {in_dim}], [{out_dim}, r])")
    if len(ranks) > 1:
        problems.append(f"ranks differ between modules: {sorted(ranks)}")
    if not pairs and not problems:
        problems.append("no lora_A/lora_B tensors")
    if problems:
        raise EdgedistillError(f"{adapter_dir / ADAPTER_FILE} does not fit {base_hf_dir} as a GGUF LoRA: "
                               + " | ".join(problems), "export the adapter with the base model it was trained on")
    rank = ranks.pop()
    if rank != adapter_config.get("r", rank):
        raise EdgedistillError(f"{adapter_config_file}: `r` = {adapter_config['r']} but the tensors have rank {rank}")
    # PEFT scales B·A by lora_alpha / r (rsLoRA: / sqrt(r)); llama.cpp by alpha / rank, so alpha is chosen to match
    peft_scale = adapter_config.get("lora_alpha", 8) / (math.sqrt(rank) if adapter_config.get("use_rslora") else rank)

    planned = []
    for module, pair in sorted(pairs.items()):
        rule, bid = rules[module]
        lora_b = pair["B"].astype(np.float32)
        heads = spec.permuted_heads(rule, dims)
        if heads is not None:
            lora_b = arch.permute_rotary_rows(lora_b, heads)
        base = rule.gguf_name(bid) + ".weight"
        planned.append((base + ".lora_a", np.ascontiguousarray(pair["A"].astype(np.float32))))
        planned.append((base + ".lora_b", np.ascontiguousarray(lora_b)))

    with gguf_writer_into(out_file, spec.gguf_arch_name) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(adapter_dir.resolve().name)
        writer.add_quantized_by(QUANTIZED_BY)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, float(peft_scale * rank))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for name, data in planned:
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out_file
