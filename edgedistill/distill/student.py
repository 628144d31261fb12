"""The student stage: the initial student, by depth and width pruning of the teacher, from a
config, or a given smaller model.

    edgedistill run recipes/default.yaml --from student

Depth pruning keeps a subset of the teacher's transformer blocks: a count spread evenly from the
first block to the last, a count chosen by importance (ShortGPT's block influence on the training
prompts, edgedistill.distill.importance), or explicit indices. Width pruning then keeps, in every
remaining block, the most important MLP channels and attention heads (Minitron), whole GQA groups
at a time, and optionally the most important hidden (residual-stream) channels in every tensor that
reads or writes the stream: embeddings, norms, lm_head, the blocks' input and output projections.
The vocabulary is kept, so the student shares the teacher's tokenizer. A config student is a fresh random model of
the teacher's family with some config keys overridden; a given student is an existing model
(`student.source`) whose tokenizer must equal the teacher's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgedistill.distill.importance import Importance, calibration_sequences, compute_importance
from edgedistill.errors import EdgedistillError
from edgedistill.layout import (CHAT_TEMPLATE, GENERATION_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_JSON,
                                TRAIN_JSONL)
from edgedistill.pipeline import clear_folder
from edgedistill.recipe import Recipe, WidthConfig
from edgedistill.runtimes.compute import Compute, stored_dtype
from edgedistill.runtimes.pytorch import load_model, load_tokenizer
from edgedistill.sources import materialize, resolve_source, tokenizer_source
from edgedistill.sources.endpoint import is_endpoint_teacher

# Row lengths the exporters' quantization grids want (llama.cpp's K-quant super-block; the ONNX
# MatMulNBits block_size the recipes use): other hidden sizes export, at a cost hidden_size_notes names.
K_QUANT_ROW = 256
ONNX_INT4_BLOCK = 32
# Parameter name (its end) -> the dimension indexed by hidden channel, or None: no hidden dimension.
# Tied lm_head.weight is embed_tokens.weight and is not listed by named_parameters.
HIDDEN_DIMS = {
    "embed_tokens.weight": 1, "lm_head.weight": 1, "norm.weight": 0,
    "input_layernorm.weight": 0, "post_attention_layernorm.weight": 0,
    "pre_feedforward_layernorm.weight": 0, "post_feedforward_layernorm.weight": 0,
    "q_proj.weight": 1, "k_proj.weight": 1, "v_proj.weight": 1, "o_proj.weight": 0, "o_proj.bias": 0,
    "gate_proj.weight": 1, "up_proj.weight": 1, "down_proj.weight": 0, "down_proj.bias": 0,
    "q_proj.bias": None, "k_proj.bias": None, "v_proj.bias": None, "q_norm.weight": None, "k_norm.weight": None,
}
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE, GENERATION_CONFIG)
# Texts both tokenizers of a given student and its teacher must split identically.
TOKENIZER_PROBES = ("Hello, world! How are you?", "  spaces   and\n\ttabs\n\n", "digits 12345 and 3.14159",
                    "café naïve Zürich 🚀", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


def evenly_spaced_layers(n_layers: int, keep: int) -> list[int]:
    """`keep` block indices from 0 to n_layers - 1, first and last always kept."""
    _check_layer_count(n_layers, keep)
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def important_layers(block_importance: list[float], keep: int) -> list[int]:
    """The `keep` blocks with the highest importance, the first and the last always among them.

    Both ends are pinned: the first block turns token embeddings into the residual stream and the
    last one feeds the final norm and lm_head. On SmolLM2 they score highest anyway (influence
    0.99 and 0.33 against 0.03-0.19 for the rest), but a score from a few calibration prompts is
    noisy and dropping either end costs far more than a middle block. With keep == 1 only block 0
    is kept, as with even spacing.
    """
    n_layers = len(block_importance)
    _check_layer_count(n_layers, keep)
    if keep == 1:
        return [0]
    middle = sorted(range(1, n_layers - 1), key=lambda i: block_importance[i], reverse=True)
    return sorted({0, n_layers - 1, *middle[: keep - 2]})


def _check_layer_count(n_layers: int, keep: int) -> None:
    if not 1 <= keep <= n_layers:
        raise EdgedistillError(f"student.keep_layers is {keep}, but the teacher has {n_layers} layers",
                               f"choose a count between 1 and {n_layers}")


def prune_depth(model, keep: list[int]):
    """The same model with only the blocks in `keep`, in order; layer indices renumbered."""
    n_layers = model.config.num_hidden_layers
    if sorted(set(keep)) != sorted(keep) or any(not 0 <= i < n_layers for i in keep):
        raise EdgedistillError(f"student.keep_layers {keep} must be distinct indices in 0..{n_layers - 1}")
    blocks = model.model.layers
    model.model.layers = torch.nn.ModuleList(blocks[i] for i in sorted(keep))
    for new_index, block in enumerate(model.model.layers):
        # The KV cache is addressed by this index.
        block.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in sorted(keep)]
    return model


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_width(config, width: WidthConfig) -> None:
    """EdgedistillError, naming the field, the value and the valid choices, for impossible sizes."""
    if width.intermediate_size is not None and width.intermediate_size > config.intermediate_size:
        raise EdgedistillError(
            f"student.width.intermediate_size is {width.intermediate_size}, but the teacher's MLP has "
            f"{config.intermediate_size} channels",
            f"choose 1..{config.intermediate_size}; multiples of 256 quantize best with K-quants")
    if width.num_attention_heads is not None:
        group = config.num_attention_heads // config.num_key_value_heads
        choices = list(range(group, config.num_attention_heads + 1, group))
        if width.num_attention_heads not in choices:
            raise EdgedistillError(
                f"student.width.num_attention_heads is {width.num_attention_heads}, but the teacher has "
                f"{config.num_attention_heads} query heads in {config.num_key_value_heads} KV groups of {group}, "
                "and heads are pruned a whole group at a time",
                f"choose one of {', '.join(map(str, choices))}")
    if width.hidden_size is not None and width.hidden_size > config.hidden_size:
        raise EdgedistillError(
            f"student.width.hidden_size is {width.hidden_size}, but the teacher's hidden size is {config.hidden_size}",
            f"choose 1..{config.hidden_size}; multiples of 256 quantize best with K-quants")


def hidden_size_notes(hidden_size: int) -> list[str]:
    """What a hidden size does to the exports, when it is not what they work best with (never a refusal:
    llama.cpp and the ONNX int4 quantizer both take any width, with these costs)."""
    notes = []
    if hidden_size % K_QUANT_ROW:
        notes.append(f"hidden_size {hidden_size} is not a multiple of {K_QUANT_ROW}: llama.cpp's K-quants "
                     "(Q4_K_M, ...) store the matrices that read the hidden stream (and the embeddings) in a "
                     "fallback type (q5_0/q8_0, larger)")
    if hidden_size % ONNX_INT4_BLOCK:
        notes.append(f"hidden_size {hidden_size} is not a multiple of {ONNX_INT4_BLOCK}: the ONNX int4 export pads "
                     "the last block of each row and cannot share the embedding table with the lm_head (a second copy)")
    return notes


def _slice_linear(linear: torch.nn.Linear, *, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> None:
    """Keeps output `rows` and input `cols` of `linear`, in place."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.detach()[rows].clone())
    if cols is not None:
        weight = weight[:, cols]
    linear.weight = torch.nn.Parameter(weight.clone())
    linear.out_features, linear.in_features = weight.shape


def _span_rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of whole units (heads) of `size` rows each."""
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


@torch.no_grad()
def prune_width(model, channel_scores: list[torch.Tensor], head_scores: list[torch.Tensor], *,
                intermediate_size: int | None = None, num_attention_heads: int | None = None) -> dict:
    """Narrows every block of `model` in place to its top channels and top KV groups of heads.

    `channel_scores[i]` / `head_scores[i]` score block i's MLP channels and query heads. A KV group
    (one key/value head and the query heads that share it) is kept or dropped whole, scored by the
    sum of its heads, so the pruned model is still valid GQA. Kept channels and heads stay in
    their original order. The hidden size is unchanged, so config.head_dim is set explicitly: it
    no longer equals hidden_size / num_attention_heads.
    """
    config = model.config
    check_width(config, WidthConfig(intermediate_size=intermediate_size, num_attention_heads=num_attention_heads))
    head_dim = _head_dim(config)
    group = config.num_attention_heads // config.num_key_value_heads
    n_groups = (num_attention_heads or config.num_attention_heads) // group
    kept_groups = []
    for index, layer in enumerate(model.model.layers):
        if intermediate_size is not None:
            channels = channel_scores[index].topk(intermediate_size).indices.sort().values
            _slice_linear(layer.mlp.gate_proj, rows=channels)
            _slice_linear(layer.mlp.up_proj, rows=channels)
            _slice_linear(layer.mlp.down_proj, cols=channels)
            layer.mlp.intermediate_size = intermediate_size
        if num_attention_heads is not None:
            # Query head h reads KV head h // group (transformers' repeat_kv, llama.cpp alike).
            group_scores = head_scores[index].reshape(config.num_key_value_heads, group).sum(dim=1)
            groups = group_scores.topk(n_groups).indices.sort().values.tolist()
            heads = [g * group + i for g in groups for i in range(group)]
            attention = layer.self_attn
            _slice_linear(attention.q_proj, rows=_span_rows(heads, head_dim))
            _slice_linear(attention.k_proj, rows=_span_rows(groups, head_dim))
            _slice_linear(attention.v_proj, rows=_span_rows(groups, head_dim))
            _slice_linear(attention.o_proj, cols=_span_rows(heads, head_dim))
            kept_groups.append(groups)
    config.head_dim = head_dim
    if intermediate_size is not None:
        config.intermediate_size = intermediate_size
    if num_attention_heads is not None:
        config.num_attention_heads = num_attention_heads
        config.num_key_value_heads = n_groups
    return {"intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "head_dim": head_dim,
            **({"kept_kv_groups": kept_groups} if kept_groups else {})}


def _hidden_dim(name: str, model_type: str) -> int | None:
    for suffix, dim in HIDDEN_DIMS.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    raise EdgedistillError(
        f"student.width.hidden_size: the {model_type} tensor {name} is not one hidden-size pruning knows "
        f"(llama-family names: {', '.join(HIDDEN_DIMS)})",
        "drop student.width.hidden_size for this teacher, or prune depth, heads and MLP channels only")


@torch.no_grad()
def prune_hidden(model, hidden_scores: torch.Tensor, hidden_size: int,
                 norm_energy: dict[str, torch.Tensor] | None = None) -> dict:
    """Narrows the residual stream of `model` in place to its `hidden_size` top-scoring channels.

    Every parameter is looked up in HIDDEN_DIMS (an unknown one is an error: pruning it wrong would
    be silent); those with a hidden dimension keep the same channels, in their original order.
    RMSNorm divides by the root mean square over the channels it sees: without the dropped ones it
    divides by sqrt(H * kept_share / H') times what it did, kept_share being the kept channels'
    share of the input's energy. `norm_energy` (norm module name -> mean square input per channel,
    edgedistill.distill.importance) gives that share on the calibration text; each norm's weight is
    multiplied by the square root of it, so the kept channels start at the teacher's scale on
    average. config.head_dim is set explicitly (hidden_size / num_attention_heads no longer gives it).
    """
    config = model.config
    check_width(config, WidthConfig(hidden_size=hidden_size))
    if hasattr(model.get_input_embeddings(), "embed_scale"):
        # Gemma scales embeddings by sqrt(hidden_size): a narrower stream would change that scale too
        raise EdgedistillError(
            f"student.width.hidden_size: {config.model_type} scales its embeddings by sqrt(hidden_size), which "
            "hidden-size pruning does not carry over",
            "drop student.width.hidden_size for this teacher, or prune depth, heads and MLP channels only")
    head_dim = _head_dim(config)
    channels = hidden_scores.topk(hidden_size).indices.sort().values
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    modules = dict(model.named_modules())
    rescaled: dict[str, float] = {}
    for name, param in list(model.named_parameters()):
        dim = _hidden_dim(name, config.model_type)
        if dim is None:
            continue
        module_name, _, attribute = name.rpartition(".")
        module = modules[module_name]
        kept = param.detach().index_select(dim, channels).clone()
        if norm_energy is not None and module_name in norm_energy:
            energy = norm_energy[module_name].double()
            share = energy[channels].sum() / energy.sum()
            kept = kept * torch.sqrt(share * energy.numel() / hidden_size).to(kept.dtype)
            rescaled[module_name] = round(float(share), 4)
        setattr(module, attribute, torch.nn.Parameter(kept, requires_grad=param.requires_grad))
        if isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, torch.nn.Embedding):
            module.embedding_dim = hidden_size
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    config.head_dim = head_dim
    config.hidden_size = hidden_size
    return {"hidden_size": hidden_size, "head_dim": head_dim,
            **({"kept_energy_share_by_norm": rescaled} if rescaled else {}),
            **({"hidden_size_notes": notes} if (notes := hidden_size_notes(hidden_size)) else {})}


def count_parameters(model) -> int:
    # Tied input/output embeddings are one tensor and counted once.
    return sum(p.numel() for p in model.parameters())


def _teacher_importance(recipe: Recipe, model, teacher: Path, generate: Path | None) -> Importance:
    cfg = recipe.student
    if generate is None:
        raise EdgedistillError(
            "the student stage needs the generate stage's train.jsonl to score blocks, channels and heads "
            "(student.layer_selection: importance or student.width), but was given no generate folder",
            "pass generate=<generate stage folder> to build_student, or use layer_selection: even without width")
    tokenizer = load_tokenizer(teacher)
    sequences = calibration_sequences(tokenizer, generate / TRAIN_JSONL, cfg.calibration_examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return compute_importance(model, sequences, pad_id=pad_id)


def _teacher_name(student_module: str, renamed: dict[str, str]) -> str:
    for student_prefix, teacher_prefix in renamed.items():
        if student_module.startswith(student_prefix):
            return teacher_prefix + student_module[len(student_prefix):]
    return student_module


def _pruned_student(recipe: Recipe, model, teacher: Path, generate: Path | None):
    cfg = recipe.student
    n_layers = model.config.num_hidden_layers
    by_importance = cfg.layer_selection == "importance"
    if by_importance and not isinstance(cfg.keep_layers, int):
        raise EdgedistillError(
            f"student.layer_selection is 'importance', but keep_layers lists the blocks: {cfg.keep_layers}",
            "give keep_layers as a count to choose blocks by importance, or drop layer_selection")
    if isinstance(cfg.keep_layers, int):
        _check_layer_count(n_layers, cfg.keep_layers)
    if cfg.width is not None:
        # Before the calibration pass, so an impossible size fails in a second, not minutes.
        check_width(model.config, cfg.width)
    detail: dict = {"layer_selection": cfg.layer_selection if isinstance(cfg.keep_layers, int) else "explicit"}
    importance = None
    if by_importance or cfg.width is not None:
        # One pass over the unpruned teacher scores everything: channel and head scores of a kept
        # block are measured on the teacher's own inputs to that block, as Minitron does.
        importance = _teacher_importance(recipe, model, teacher, generate)
        detail["calibration"] = {"sequences": importance.sequences, "tokens": importance.tokens}
        detail["block_importance"] = [round(score, 6) for score in importance.blocks]
    if isinstance(cfg.keep_layers, int):
        keep = (important_layers(importance.blocks, cfg.keep_layers) if by_importance
                else evenly_spaced_layers(n_layers, cfg.keep_layers))
    else:
        keep = list(cfg.keep_layers)
    student = prune_depth(model, keep)
    detail["kept_layers"] = sorted(keep)
    if cfg.width is not None:
        kept = sorted(keep)
        detail["width"] = prune_width(student, [importance.channels[i] for i in kept],
                                      [importance.heads[i] for i in kept],
                                      intermediate_size=cfg.width.intermediate_size,
                                      num_attention_heads=cfg.width.num_attention_heads)
        if cfg.width.hidden_size is not None:
            # the kept blocks' norms and the final norm: what the student's matrices will read
            scores = torch.stack([importance.hidden[i] for i in kept] + [importance.hidden_final]).sum(dim=0)
            # the teacher's block kept[j] is the student's block j
            renamed = {f"model.layers.{j}.": f"model.layers.{old}." for j, old in enumerate(kept)}
            energy = {name: importance.norm_energy[_teacher_name(name, renamed)]
                      for name, _ in student.named_modules() if _teacher_name(name, renamed) in importance.norm_energy}
            detail["width"].update(prune_hidden(student, scores, cfg.width.hidden_size, energy))
            for note in detail["width"].get("hidden_size_notes", []):
                print(f"[student] note: {note}")
    return student, detail


def tokenizer_difference(teacher_tokenizer, student_tokenizer) -> str | None:
    """How two tokenizers differ (vocabulary or the ids of a probe text), or None if they agree."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sum(student_vocab.get(token) != token_id for token, token_id in teacher_vocab.items())
        return (f"the vocabularies differ ({len(teacher_vocab)} tokens in the teacher's, {len(student_vocab)} in "
                f"the student's; {differing} of the teacher's tokens have another id or none)")
    for text in TOKENIZER_PROBES:
        if teacher_tokenizer.encode(text, add_special_tokens=False) != student_tokenizer.encode(
                text, add_special_tokens=False):
            return f"they split {text!r} differently"
    return None


def _given_student(recipe: Recipe, out: Path, teacher: Path) -> dict:
    spec = recipe.student.source
    source = resolve_source(recipe.source(spec))
    difference = tokenizer_difference(load_tokenizer(teacher), tokenizer_source(str(source.path)))
    if difference is not None and recipe.distill.kl_weight > 0:
        raise EdgedistillError(
            f"student.source {spec}: its tokenizer is not the teacher's: {difference}; logit distillation "
            "compares the two distributions token by token, so it needs identical tokenizers",
            "set distill.kl_weight: 0 to train it on the teacher's answers tokenized with its own tokenizer "
            "(response distillation), or use a student that shares the teacher's tokenizer (or prune the teacher)")
    # A resumed stage may hold a killed attempt's files; materialize wants an empty folder.
    clear_folder(out)
    materialize(source, out)
    if difference is None:
        # Equal tokenizers, but the files may be written differently (a GGUF source's are rebuilt
        # from metadata): the teacher's own files make the logits cache's tokenizer check exact.
        for name in TOKENIZER_FILES:
            if name != GENERATION_CONFIG and (teacher / name).exists():
                shutil.copy2(teacher / name, out / name)
    return {"source": spec, "source_kind": source.kind, "tokenizer_matches_teacher": difference is None,
            **({"tokenizer_difference": difference} if difference else {})}


def build_student(recipe: Recipe, out: Path, *, teacher: Path, generate: Path | None = None,
                  root_teacher: Path | None = None) -> dict:
    """Writes the initial student into `out` as an HF folder; returns what goes into the manifest.

    build_student(recipe, Path("runs/x/.partial/student"), teacher=Path("runs/x/teacher"),
                  generate=Path("runs/x/generate"))
    `generate` (its train.jsonl) is needed only to score importance. `teacher` is the model pruned
    from; in a progressive chain that is the step before, and `root_teacher` the run's teacher,
    against which the parameter ratio is given.
    """
    cfg = recipe.student
    if is_endpoint_teacher(teacher):
        # no weights here (the recipe cannot prune then): the served model's size from its config
        with torch.device("meta"):
            teacher_model, teacher_params = None, count_parameters(
                AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher)))
    else:
        # in the dtype it is stored in: a bfloat16 teacher widened to float32 would be a second, larger
        # copy; the pruned student is widened when distill loads it, at a fraction of the size
        teacher_model = load_model(teacher, dtype=Compute("cpu", stored_dtype(teacher)).torch_dtype,
                                   trust_remote_code=recipe.teacher.trust_remote_code)
        teacher_params = count_parameters(teacher_model)
    if cfg.method == "given":
        del teacher_model
        detail = _given_student(recipe, out, teacher)
        student = load_model(out)
    elif cfg.method == "prune":
        student, detail = _pruned_student(recipe, teacher_model, teacher, generate)
    else:
        config = AutoConfig.from_pretrained(teacher)
        for key, value in cfg.config.items():
            if not hasattr(config, key):
                raise EdgedistillError(f"student.config.{key}: the teacher's config has no such key",
                                       f"use keys of {type(config).__name__}, e.g. num_hidden_layers, hidden_size")
            setattr(config, key, value)
        torch.manual_seed(recipe.seed)
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        detail = {"config_overrides": cfg.config}
    if cfg.method != "given":
        student.save_pretrained(out, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (teacher / name).exists() and not (out / name).exists():
                shutil.copy2(teacher / name, out / name)
    student_params = count_parameters(student)
    if root_teacher is not None and root_teacher != teacher:
        detail["pruned_from_parameters"] = teacher_params
        with torch.device("meta"):  # its size only: no weights read
            teacher_params = count_parameters(AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(root_teacher, trust_remote_code=recipe.teacher.trust_remote_code),
                trust_remote_code=recipe.teacher.trust_remote_code))
    return {"method": cfg.method, **detail, "teacher_parameters": teacher_params,
            "student_parameters": student_params, "parameter_ratio": round(student_params / teacher_params, 4)}
