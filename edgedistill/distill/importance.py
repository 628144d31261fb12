"""Importance of a teacher's blocks, MLP channels and attention heads on calibration text.

    python -m edgedistill.distill.importance runs/tiny/teacher runs/tiny/generate/train.jsonl

One pass of the teacher over the calibration sequences, with forward hooks, measures
- per block, ShortGPT's block influence: the mean over tokens of 1 - cos(hidden in, hidden out);
  a block that barely turns the residual stream is cheap to drop;
- per MLP channel, the mean |act(gate) * up| (the input of down_proj), as in Minitron;
- per attention head, the mean L2 norm of the head's output before o_proj (Minitron);
- per hidden (embedding) channel, per block, the mean |x| of the outputs of the block's RMSNorms
  (and of the final norm), Minitron's embedding-channel score: what each later matrix reads of
  that residual-stream channel; and per norm, the mean square of its input per channel, which says
  how much of the stream's energy a channel subset holds (edgedistill.distill.student.prune_hidden
  rescales each pruned norm by it).
Padding positions are excluded from every mean. The student stage uses these scores to choose
which blocks, channels and heads to keep (edgedistill.distill.student). The pass runs wherever the
model is, in its dtype (the command runs the teacher as a recipe's compute: auto would); the sums are
float64 on the CPU.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from edgedistill.errors import EdgedistillError

# Long conversations add little signal per token and cost quadratic attention time.
CALIBRATION_MAX_TOKENS = 512
# The norms of a block whose outputs are hidden-sized (llama-family names; Gemma's pre/post
# feed-forward norms too); q_norm/k_norm work on head_dim and say nothing of hidden channels.
HIDDEN_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


@dataclass(frozen=True)
class Importance:
    """Scores of one model; lists are indexed by the model's block index."""

    blocks: list[float]
    channels: list[torch.Tensor]  # (intermediate_size,) per block
    heads: list[torch.Tensor]  # (num_attention_heads,) per block
    sequences: int
    tokens: int
    hidden: list[torch.Tensor] | None = None  # (hidden_size,) per block: its norms' mean |output|
    hidden_final: torch.Tensor | None = None  # (hidden_size,): the final norm's mean |output|
    # norm module name ("model.layers.3.input_layernorm", "model.norm") -> (hidden_size,) mean square input
    norm_energy: dict[str, torch.Tensor] | None = None


def calibration_sequences(tokenizer, train_jsonl: Path, limit: int) -> list[list[int]]:
    """Token ids of the first `limit` conversations of a generate stage's train.jsonl.

    Whole conversations (prompt and the teacher's answer) in the teacher's chat template: the same
    text the student is later trained on.
    """
    if not train_jsonl.is_file():
        raise EdgedistillError(f"{train_jsonl} does not exist", "run the generate stage first")
    sequences = []
    with train_jsonl.open() as lines:
        for line in lines:
            if len(sequences) == limit:
                break
            if line.strip():
                ids = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True)
                sequences.append(list(ids)[:CALIBRATION_MAX_TOKENS])
    if not sequences:
        raise EdgedistillError(f"{train_jsonl} holds no conversations to calibrate on",
                               "check data.prompts and the generate stage's output")
    return sequences


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    # Decoder layers return a tensor in transformers >= 4.56 and a tuple before.
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def compute_importance(model, sequences: list[list[int]], *, batch_size: int = 8, pad_id: int = 0) -> Importance:
    """Block, channel and head importance of a llama-family `model` over `sequences` of token ids."""
    if not sequences:
        raise EdgedistillError("no calibration sequences to compute importance on")
    layers = model.model.layers
    n_heads = model.config.num_attention_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // n_heads
    # float64 sums: thousands of tokens of float32 terms lose digits that rank close channels.
    device = model.device
    block_sum = torch.zeros(len(layers), dtype=torch.float64)
    channel_sum = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    head_sum = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    hidden_size = model.config.hidden_size
    # the last entry: the final norm, read by lm_head
    hidden_sum = [torch.zeros(hidden_size, dtype=torch.float64) for _ in range(len(layers) + 1)]
    energy_sum: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}

    def block_hook(index: int):
        def hook(module, args, kwargs, output):
            before, after = _hidden_in(args, kwargs), _hidden_out(output)
            cosine = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
            block_sum[index] += ((1 - cosine) * state["mask"]).sum().cpu()
        return hook

    def channel_hook(index: int):
        def hook(module, args):
            channel_sum[index] += (args[0].double().abs() * state["mask"][..., None]).sum(dim=(0, 1)).cpu()
        return hook

    def head_hook(index: int):
        def hook(module, args):
            per_head = args[0].double().unflatten(-1, (n_heads, head_dim)).norm(dim=-1)
            head_sum[index] += (per_head * state["mask"][..., None]).sum(dim=(0, 1)).cpu()
        return hook

    def hidden_hook(index: int, norm: str):
        energy_sum[norm] = torch.zeros(hidden_size, dtype=torch.float64)

        def hook(module, args, output):
            mask = state["mask"][..., None]
            hidden_sum[index] += (output.double().abs() * mask).sum(dim=(0, 1)).cpu()
            energy_sum[norm] += (args[0].double().square() * mask).sum(dim=(0, 1)).cpu()
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(block_hook(index), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(channel_hook(index)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(index)))
        for name in HIDDEN_NORMS:
            if hasattr(layer, name):
                handles.append(getattr(layer, name).register_forward_hook(
                    hidden_hook(index, f"model.layers.{index}.{name}")))
    handles.append(model.model.norm.register_forward_hook(hidden_hook(len(layers), "model.norm")))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            # Right padding: causal attention keeps real tokens from seeing the pads after them, and
            # their positions stay 0..len-1 as without padding; the mask drops pads from the sums.
            input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
            state["mask"] = mask.double().to(device)
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = sum(len(ids) for ids in sequences)
    return Importance(
        blocks=(block_sum / tokens).tolist(),
        channels=[(s / tokens).float() for s in channel_sum],
        heads=[(s / tokens).float() for s in head_sum],
        sequences=len(sequences),
        tokens=tokens,
        hidden=[(s / tokens).float() for s in hidden_sum[:-1]],
        hidden_final=(hidden_sum[-1] / tokens).float(),
        norm_energy={name: (s / tokens).float() for name, s in energy_sum.items()},
    )


if __name__ == "__main__":
    from edgedistill.runtimes.compute import load_on, resolve_compute
    from edgedistill.runtimes.pytorch import load_tokenizer

    teacher = Path(sys.argv[1])
    tokenizer = load_tokenizer(teacher)
    model = load_on(teacher, resolve_compute(None, teacher))
    scores = compute_importance(model, calibration_sequences(tokenizer, Path(sys.argv[2]), 64),
                                pad_id=tokenizer.pad_token_id or 0)
    for index, block in enumerate(scores.blocks):
        print(f"block {index:3d}  influence {block:.4f}  heads {[round(h, 2) for h in scores.heads[index].tolist()]}")
