"""PyTorch runtime: an HF folder loaded with transformers: batched greedy chat generation,
streaming, and log-prob scoring, on the CPU or a CUDA GPU in fp32, fp16 or bf16.

    python -m edgedistill.runtimes.pytorch runs/sentiment/teacher "What is the capital of France?"
    python -m edgedistill.runtimes.pytorch runs/sentiment/teacher "Hi" --device cuda --dtype bf16

Weights load from safetensors only; remote code runs only when the caller asks for it.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from edgedistill.errors import EdgedistillError
from edgedistill.runtimes.common import (DEVICES, DTYPES, declared_stop_tokens, log_softmax, scored_positions,
                                         stream_pieces)
from edgedistill.sources.hf import check_hf_folder

TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.float16, torch.bfloat16)))


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        raise EdgedistillError(f"{folder} has a tokenizer without a chat template",
                               "add chat_template to tokenizer_config.json")
    return tokenizer


def load_model(folder: Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    # chat, eval and bench open folders users give, not only folders a stage wrote
    check_hf_folder(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def torch_device(device: str) -> torch.device:
    """`device` ("cpu" or "cuda"), refused with the reason when this torch cannot use it."""
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that finds no GPU"
        raise EdgedistillError(f"device 'cuda' asked for, but torch {torch.__version__} is {build}",
                               "run on device 'cpu', or install a CUDA build of torch on a machine with a GPU")
    if device not in DEVICES:
        raise EdgedistillError(f"unknown device {device!r}", f"use one of {', '.join(DEVICES)}")
    return torch.device(device)


class TorchChatModel:
    """Greedy chat generation over batches of conversations (padding on the left), streaming and
    scoring; the Runtime interface of edgedistill.runtimes. `dtype`: "fp32", "fp16" or "bf16"."""

    def __init__(self, folder: Path, *, trust_remote_code: bool = False, device: str = "cpu", dtype: str = "fp32"):
        if dtype not in TORCH_DTYPES:
            raise EdgedistillError(f"unknown dtype {dtype!r}", f"use one of {', '.join(TORCH_DTYPES)}")
        self.device = torch_device(device)
        # the model first: load_model checks the whole folder, the tokenizer's files included
        self.model = load_model(folder, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code).to(self.device)
        self.tokenizer = load_tokenizer(folder)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.bos_id, self.eos_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        # every id that ends a turn, the tokenizer's eos first (a folder may declare it only in code)
        self.stop_ids = [i for i in dict.fromkeys([self.eos_id, *declared_stop_tokens(folder)]) if i is not None]
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def prompt_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)

    def is_end(self, token: int) -> bool:
        return token in self.stop_ids

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def score(self, ids: list[int], *, last: int | None = None) -> np.ndarray:
        """float32 [positions, vocab_size] log-probs of the next token at each position of `ids`
        (the last `last` positions only: the output layer runs for those alone)."""
        keep = scored_positions(ids, last)
        # older architectures compute every position's logits; slicing then gives the same rows
        skip = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        logits = self.model(torch.tensor([ids], device=self.device), **skip).logits[0, -keep:]
        return log_softmax(logits.float().cpu().numpy())

    @torch.inference_mode()
    def greedy_ids(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        """The greedy continuation of `prompt`, one token id at a time, stopping after the end token."""
        out = self.model(torch.tensor([prompt], device=self.device), use_cache=True)
        for step in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            yield token
            if self.is_end(token) or step == max_new_tokens - 1:
                return
            out = self.model(torch.tensor([[token]], device=self.device), past_key_values=out.past_key_values,
                             use_cache=True)

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int) -> Iterator[str]:
        """The greedy answer's text, piece by piece as tokens come (pieces of a character wait for it)."""
        tokens = (t for t in self.greedy_ids(self.prompt_ids(messages), max_new_tokens) if not self.is_end(t))
        yield from stream_pieces(tokens, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int,
                 logits_processor=None) -> list[tuple[str, bool]]:
        """(answer, finished) per conversation; finished is False when max_new_tokens cut it off.

        Greedy, unless a `logits_processor` (a transformers LogitsProcessorList) picks the tokens.
        """
        prompts = [self.prompt_ids(messages) for messages in conversations]
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        output = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     logits_processor=logits_processor,
                                     eos_token_id=self.stop_ids or None,
                                     pad_token_id=self.tokenizer.pad_token_id)
        answers = []
        for row in output[:, batch["input_ids"].shape[1]:].tolist():
            end = next((i for i, token in enumerate(row) if token in self.stop_ids), None)
            finished = end is not None
            if finished:
                row = row[:end]
            answers.append((self.tokenizer.decode(row, skip_special_tokens=True).strip(), finished))
        return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--device", default="cpu", choices=list(DEVICES))
    parser.add_argument("--dtype", default="fp32", choices=list(TORCH_DTYPES))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    chat = TorchChatModel(args.folder, device=args.device, dtype=args.dtype)
    for piece in chat.stream([{"role": "user", "content": args.prompt}], max_new_tokens=args.max_new_tokens):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
