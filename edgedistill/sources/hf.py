"""Check an HF model folder before anything loads it: config.json, the safetensors weights and the
tokenizer, each alone and against each other.

    python -c "from edgedistill.sources.hf import check_hf_folder; print(check_hf_folder('runs/x/teacher').weight_files)"

Every path that opens a folder a user gave goes through `check_hf_folder`: `resolve_source` (so
run, export and the stages) and the PyTorch runtime's loader (chat, eval, bench). Without it a
config.json that lacks num_hidden_layers loads as transformers' 32-layer default with 28 randomly
initialized layers (transformers only warns), and a truncated weights file or a damaged
tokenizer.json ends in a traceback from deep inside a loader.

It is fast: it reads the safetensors headers (not the tensors), parses the tokenizer, and builds
the architecture on PyTorch's meta device (shapes only, no memory) to compare its tensor names and
shapes with the files'.
"""

from __future__ import annotations

import difflib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edgedistill.errors import EdgedistillError
from edgedistill.layout import HF_CONFIG, TOKENIZER_CONFIG, TOKENIZER_JSON

__all__ = ["HfFolder", "check_hf_folder", "text_decoder"]

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer.model", TOKENIZER_CONFIG)
# The config keys a tensor's shape follows, by fragments of its name, in the order a mismatch is
# blamed on them; a tensor no fragment names may follow any of them.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
SHAPE_KEYS_BY_NAME = (
    (("embed", "wte", "wpe", "lm_head"), ("vocab_size", "hidden_size")),
    (("k_proj", "v_proj"), ("num_key_value_heads", "num_attention_heads", "hidden_size")),
    (("attn", "attention", "q_proj", "o_proj"),
     ("num_attention_heads", "num_key_value_heads", "hidden_size")),
    (("mlp", "ffn", "feed_forward", "experts"), ("intermediate_size", "hidden_size")),
)
HEAD_KEYS = ("num_attention_heads", "num_key_value_heads")  # a dimension of count x head_dim
# "<list>.<index>." in a tensor name: a block of a layer list (model.layers.3.mlp..., transformer.h.3...).
LAYER_NAME = re.compile(r"^(.*?)\.(\d+)\.")


@dataclass(frozen=True)
class HfFolder:
    """What `check_hf_folder` learned about a folder."""

    path: Path
    config: dict  # config.json as written
    weight_files: tuple[Path, ...]  # the files transformers loads: model.safetensors or the index's shards
    tensor_shapes: dict[str, tuple[int, ...]]  # from the safetensors headers, as the files name them
    tokenizer_file: Path  # tokenizer.json, else tokenizer.model, else tokenizer_config.json
    tokenizer_vocab_size: int | None  # the largest token id of tokenizer.json plus one; None without one
    architecture_checked: bool  # False when the model needs remote code that was not allowed, or is quantized


def check_hf_folder(path: Path | str, *, trust_remote_code: bool = False) -> HfFolder:
    """Check the HF folder at `path` without loading its weights; EdgedistillError says what is wrong.

    A model whose config.json has auto_map is built (from its own code) only with trust_remote_code;
    without it every check but the architecture's runs.
    """
    path = Path(path)
    if not (path / HF_CONFIG).is_file():
        raise EdgedistillError(f"{path} is not an HF model folder: it has no config.json",
                               "give a folder written by save_pretrained, or a .gguf file")
    config = _read_json_object(path / HF_CONFIG)
    weight_files = _weight_files(path)
    tensor_shapes = _tensor_shapes(path, weight_files)
    tokenizer_file, tokenizer_vocab_size = _check_tokenizer(path)
    # Quantized checkpoints (GPTQ, AWQ, FP8, ...) store other tensors than the architecture declares.
    check_architecture = (trust_remote_code or not config.get("auto_map")) and "quantization_config" not in config
    embedding_rows = config.get("vocab_size")
    if check_architecture:
        model = _meta_model(path, config, trust_remote_code)
        _compare(model, config, tensor_shapes, _weights_name(path, weight_files))
        embedding_rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer_vocab_size is not None and isinstance(embedding_rows, int) and tokenizer_vocab_size > embedding_rows:
        raise EdgedistillError(
            f"{path / TOKENIZER_JSON} has token ids up to {tokenizer_vocab_size - 1}, but the model's embedding has "
            f"{embedding_rows} rows (vocab_size {embedding_rows}): ids {embedding_rows} and above would index past it",
            "the tokenizer belongs to another model: copy the tokenizer files that came with these weights")
    return HfFolder(path, config, weight_files, tensor_shapes, tokenizer_file, tokenizer_vocab_size, check_architecture)


def _read_json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EdgedistillError(f"{file} is not valid JSON: {error}", "copy it again") from error
    if not isinstance(value, dict):
        raise EdgedistillError(f"{file} holds a JSON {type(value).__name__}, not an object", "copy it again")
    return value


# --- weights ------------------------------------------------------------------------------------


def _weight_files(path: Path) -> tuple[Path, ...]:
    if (path / WEIGHTS_INDEX).is_file():
        index = _read_json_object(path / WEIGHTS_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise EdgedistillError(f"{path / WEIGHTS_INDEX} has no weight_map", "copy it again")
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (path / name).is_file()]
        if absent:
            raise EdgedistillError(f"{path / WEIGHTS_INDEX} lists {', '.join(absent)}, which {path} does not hold",
                                   "copy the missing weight files into the folder")
        return tuple(path / name for name in files)
    if (path / WEIGHTS).is_file():
        return (path / WEIGHTS,)
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise EdgedistillError(
            f"{path} holds {', '.join(others)} but neither {WEIGHTS} nor {WEIGHTS_INDEX}, the files transformers loads",
            f"if {others[0]} is the whole model saved by save_pretrained, rename it {WEIGHTS}; "
            "a LoRA adapter is not a model folder")
    has_bin = any(path.glob("pytorch_model*.bin"))
    raise EdgedistillError(
        f"{path} holds no *.safetensors weights"
        + (" (only pytorch_model.bin, which edgedistill does not load)" if has_bin else ""),
        # Pickled .bin files can run code when loaded; safetensors cannot.
        "we load safetensors only; convert once with "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)")


def _tensor_shapes(path: Path, weight_files: tuple[Path, ...]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files:
        shapes.update(_safetensors_header(file))
    if (path / WEIGHTS_INDEX).is_file():
        weight_map = _read_json_object(path / WEIGHTS_INDEX)["weight_map"]
        absent = [name for name in weight_map if name not in shapes]
        if absent:
            raise EdgedistillError(
                f"{path / WEIGHTS_INDEX} lists {len(absent)} tensors its files do not hold, e.g. {absent[0]} "
                f"in {weight_map[absent[0]]}", "copy the weight files and the index again, from the same save")
    return shapes


def _safetensors_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (u64 little-endian length N, then N bytes of JSON),
    after checking that the file is exactly as long as its tensors say."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        header_bytes = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_bytes is None or 8 + header_bytes > size:
            raise EdgedistillError(f"{file.name} is truncated: its {size} bytes end inside the header",
                                   f"copy {file} again")
        raw = f.read(header_bytes)
    try:
        header = json.loads(raw)
        tensors = {name: info for name, info in header.items() if name != "__metadata__"}
        shapes = {name: tuple(int(d) for d in info["shape"]) for name, info in tensors.items()}
        data_end = max((int(info["data_offsets"][1]) for info in tensors.values()), default=0)
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError) as error:
        raise EdgedistillError(f"{file} is not a safetensors file (its header does not parse: {error})",
                               f"copy {file} again") from error
    expected = 8 + header_bytes + data_end
    if size < expected:
        raise EdgedistillError(
            f"{file.name} is truncated: its tensors end at byte {expected} but the file has {size} bytes",
            f"copy {file} again")
    if size > expected:
        raise EdgedistillError(
            f"{file.name} has {size - expected} bytes after its last tensor (the tensors end at byte {expected}, "
            f"the file has {size} bytes); safetensors refuses such a file", f"copy {file} again")
    return shapes


def _weights_name(path: Path, weight_files: tuple[Path, ...]) -> str:
    return weight_files[0].name if len(weight_files) == 1 else f"the {len(weight_files)} files of {WEIGHTS_INDEX}"


# --- tokenizer ----------------------------------------------------------------------------------


def _check_tokenizer(path: Path) -> tuple[Path, int | None]:
    present = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        raise EdgedistillError(
            f"{path} has no tokenizer (no tokenizer.json, tokenizer.model or tokenizer_config.json)",
            "save the tokenizer into the folder with tokenizer.save_pretrained(folder)")
    if (path / TOKENIZER_CONFIG).is_file():
        _read_json_object(path / TOKENIZER_CONFIG)
    if not (path / TOKENIZER_JSON).is_file():
        return present[0], None
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER_JSON))
    except Exception as error:  # the Rust parser raises bare Exceptions
        raise EdgedistillError(f"{path / TOKENIZER_JSON} is not a valid tokenizer file ({error})",
                               "copy it again") from error
    return present[0], max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


# --- config against weights ---------------------------------------------------------------------


def _meta_model(path: Path, config: dict, trust_remote_code: bool):
    """The architecture config.json describes, every tensor on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not config.get("auto_map"):
        # the families a user most likely meant, and where the full list is
        common = [name for name in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "gpt2")
                  if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
        families = (f"{', '.join(common)} and {len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - len(common)} more (python -c "
                    "\"from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as m; "
                    "print(sorted(m))\")")
        if model_type not in CONFIG_MAPPING_NAMES:
            problem = ("has no model_type" if model_type is None
                       else f"has model_type {model_type!r}, which transformers {__version__} does not know")
            close = difflib.get_close_matches(str(model_type), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, n=1)
            if close:
                problem += f" (did you mean {close[0]!r}?)"
            raise EdgedistillError(f"{path / HF_CONFIG} {problem}",
                                   f"set model_type to the model's family; transformers {__version__} knows these "
                                   f"causal language models: {families}")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise EdgedistillError(f"{path / HF_CONFIG} has model_type {model_type!r}, which is not a causal "
                                   "language model", f"edgedistill distills text generators such as {families}")
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except Exception as error:  # a bad value can fail anywhere in a config class or a model's __init__
        raise EdgedistillError(f"transformers cannot build the model {path / HF_CONFIG} describes "
                               f"({type(error).__name__}: {error})", "fix the value it names in config.json") from error


def _compare(model, config: dict, files: dict[str, tuple[int, ...]], weights: str) -> None:
    """Refuse weights that would not fill `model` exactly: what transformers would initialize randomly,
    skip, or refuse with a size mismatch."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    files = _as_model_names(model, files)
    # Buffers are computed by the model; old checkpoints carry some (rotary inv_freq, GPT-2's attn.bias).
    ignored_unexpected = [*(model._keys_to_ignore_on_load_unexpected or []), r"rotary_emb\.inv_freq"]
    buffers = {name for name, _ in model.named_buffers()}
    unexpected = [n for n in files if n not in expected and n not in buffers
                  and not any(re.search(p, n) for p in ignored_unexpected)]
    loaded = {n: s for n, s in files.items() if n in expected or n in unexpected}
    _compare_layers(model, config, expected, loaded, weights)
    tied = _tied_names(model)
    missing = [n for n in expected if n not in files and n not in buffers and not tied.get(n, set()) & files.keys()
               and not any(re.search(p, n) for p in model._keys_to_ignore_on_load_missing or [])]
    mismatched = [n for n in expected if n in files and files[n] != expected[n]]
    if mismatched:
        name = mismatched[0]
        key, value, fix = _suspect_key(model, config, name, expected[name], files[name])
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        blame = f"; {key} is {value}{_absent(model, config, key)}" if key else ""
        raise EdgedistillError(
            f"{weights} does not match config.json: {name} is {list(files[name])} in the weights but config.json "
            f"makes it {list(expected[name])}{more}{blame}",
            f"set {key}: {fix} in config.json" if key else "copy the config.json that came with these weights")
    if missing:
        output = model.get_output_embeddings()
        head = {n for n, p in model.named_parameters(remove_duplicate=False) if output is not None and p is output.weight}
        untied = (f"; tie_word_embeddings is false{_absent(model, config, 'tie_word_embeddings')}"
                  if set(missing) <= head and not model.config.tie_word_embeddings else "")
        raise EdgedistillError(
            f"{weights} lacks {_tensors(len(missing))} the {type(model).__name__} of config.json needs "
            f"(transformers would initialize them randomly): {', '.join(missing[:3])}{untied}",
            "set tie_word_embeddings: true in config.json if the model reuses its embedding as output layer"
            if untied else "copy the weights again, or the config.json that came with them")
    if unexpected:
        raise EdgedistillError(
            f"{weights} holds {_tensors(len(unexpected))} the {type(model).__name__} of config.json does not use: "
            f"{', '.join(unexpected[:3])}", "copy the config.json that came with these weights")


def _as_model_names(model, files: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The file's tensor names as the model names them: transformers renames a class's older
    checkpoint layout (its _checkpoint_conversion_mapping: Gemma 3's language_model.model. ->
    model.language_model.) and adds or strips the base model's prefix ("model.", GPT-2's
    "transformer.") when a checkpoint was saved from the other class."""
    for pattern, replacement in (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items():
        files = {re.sub(pattern, replacement, n): s for n, s in files.items()}
    prefix = model.base_model_prefix
    if not prefix:
        return files
    has_prefix, expects_prefix = any(n.startswith(prefix) for n in files), hasattr(model, prefix)
    if expects_prefix and not has_prefix:
        return {f"{prefix}.{n}": s for n, s in files.items()}
    if has_prefix and not expects_prefix:
        return {n[len(prefix) + 1:]: s for n, s in files.items() if n.startswith(f"{prefix}.")}
    return files


def _tied_names(model) -> dict[str, set[str]]:
    """Each parameter name -> the other names of the same parameter (a tied output layer's embedding)."""
    names: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    return {name: group - {name} for group in names.values() for name in group}


def _compare_layers(model, config: dict, expected: dict, loaded: dict, weights: str) -> None:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    model_lists = _layer_indices(expected)
    layer_list = next((prefix for prefix, indices in model_lists.items() if len(indices) == n_layers), None)
    if layer_list is None:
        return
    held = _layer_indices(loaded).get(layer_list, set())
    if held == model_lists[layer_list] or not held:
        return
    key = _config_key(model, "num_hidden_layers")
    layers = f"layers 0-{max(held)}" if held == set(range(len(held))) else f"layers {_ranges(sorted(held))}"
    absent = f" ({key} is missing, so transformers' default for {model.config.model_type})" if key not in config else ""
    problem = f"config.json says {n_layers} layer{'s' * (n_layers != 1)}{absent} but {weights} holds {layers}"
    if held == set(range(len(held))):
        raise EdgedistillError(problem, f"set {key}: {len(held)} in config.json")
    raise EdgedistillError(problem, "copy the weights again: some layers are missing")


def _layer_indices(names) -> dict[str, set[int]]:
    indices: dict[str, set[int]] = {}
    for name in names:
        match = LAYER_NAME.match(name)
        if match:
            indices.setdefault(match[1], set()).add(int(match[2]))
    return indices


def _ranges(indices: list[int]) -> str:
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _suspect_key(model, config: dict, name: str, model_shape: tuple,
                 file_shape: tuple) -> tuple[str | None, object, object]:
    """(config key, its value, the value the weights imply) most likely behind the shape mismatch of
    tensor `name`; a key missing from config.json is suspected first."""
    hf_config = model.config
    keys = next((keys for fragments, keys in SHAPE_KEYS_BY_NAME if any(f in name for f in fragments)), SHAPE_KEYS)
    hidden, heads = getattr(hf_config, "hidden_size", None), getattr(hf_config, "num_attention_heads", None)
    head_dim = getattr(hf_config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    candidates = []
    for ours, theirs in zip(model_shape, file_shape):
        for key in keys if ours != theirs else ():
            value = getattr(hf_config, key, None)
            if key in HEAD_KEYS and value and head_dim and value * head_dim == ours and theirs % head_dim == 0:
                candidates.append((key, value, theirs // head_dim))
            elif key not in HEAD_KEYS and value == ours:
                candidates.append((key, value, theirs))
    if not candidates:
        return None, None, None
    key, value, fix = min(candidates, key=lambda c: (_config_key(model, c[0]) in config, keys.index(c[0])))
    return _config_key(model, key), value, fix


def _tensors(count: int) -> str:
    return f"{count} tensor{'s' * (count != 1)}"


def _config_key(model, name: str) -> str:
    """How config.json spells `name` for this family (GPT-2: n_layer, n_embd, ...)."""
    return type(model.config).attribute_map.get(name, name)


def _absent(model, config: dict, key: str) -> str:
    if key in config:
        return ""
    return f" (missing from config.json, so transformers' default for {model.config.model_type})"


# --- multimodal checkpoints -----------------------------------------------------------------------

# Classes that wrap a text decoder with a vision tower, and the causal LM class of the decoder alone:
# (the wrapper's attribute path to its decoder body, the text-only class). Gemma 3 4B and up ship
# as Gemma3ForConditionalGeneration (config model_type "gemma3", text_config + vision_config).
TEXT_DECODERS = {"Gemma3ForConditionalGeneration": ("model.language_model", "Gemma3ForCausalLM")}


def text_decoder(model):
    """The text-only causal LM inside a multimodal model (TEXT_DECODERS), sharing its weights, with
    the vision tower and projector left out; any other model as it is.

    Every later stage reads text-only folders: pruning walks model.model.layers and the exporters
    map a decoder's tensors, so a teacher is written as its text decoder (Gemma3ForCausalLM, model
    type gemma3_text). The generation settings (eos ids) come along.
    """
    import torch
    import transformers

    entry = TEXT_DECODERS.get(type(model).__name__)
    if entry is None:
        return model
    body_path, text_class = entry
    body = model.get_submodule(body_path)
    text_config = model.config.get_text_config()
    text_config.architectures = [text_class]
    # the wrapper's config holds what the decoder's lacks: the eos ids, the dtype
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text_config, key, None) is None and getattr(model.config, key, None) is not None:
            setattr(text_config, key, getattr(model.config, key))
    with torch.device("meta"):  # no second copy of the weights: the wrapper's modules are moved in
        text_model = getattr(transformers, text_class)(text_config)
    text_model.model = body
    text_model.lm_head = model.get_output_embeddings()
    text_model.generation_config = model.generation_config
    return text_model.to(model.dtype).eval()
