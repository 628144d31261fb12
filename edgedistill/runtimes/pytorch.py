"""PyTorch runtime: an HF folder loaded with transformers, batched greedy chat generation.

    python -m edgedistill.runtimes.pytorch runs/sentiment/teacher "What is the capital of France?"

Weights load from safetensors only; remote code runs only when the caller asks for it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from edgedistill.errors import EdgedistillError


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        raise EdgedistillError(f"{folder} has a tokenizer without a chat template",
                               "add chat_template to tokenizer_config.json")
    return tokenizer


def load_model(folder: Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    if not any(folder.glob("*.safetensors")):
        raise EdgedistillError(f"{folder} holds no .safetensors weights",
                               "save the model with save_pretrained(..., safe_serialization=True)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


class TorchChatModel:
    """Greedy chat generation over batches of conversations, padding on the left."""

    def __init__(self, folder: Path, *, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(folder)
        self.model = load_model(folder, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int,
                 logits_processor=None) -> list[tuple[str, bool]]:
        """(answer, finished) per conversation; finished is False when max_new_tokens cut it off.

        Greedy, unless a `logits_processor` (a transformers LogitsProcessorList) picks the tokens.
        """
        prompts = [self.prompt_ids(messages) for messages in conversations]
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        output = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     logits_processor=logits_processor,
                                     eos_token_id=self.tokenizer.eos_token_id,
                                     pad_token_id=self.tokenizer.pad_token_id)
        answers = []
        for row in output[:, batch["input_ids"].shape[1]:].tolist():
            finished = self.tokenizer.eos_token_id in row
            if finished:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            answers.append((self.tokenizer.decode(row, skip_special_tokens=True).strip(), finished))
        return answers


if __name__ == "__main__":
    chat = TorchChatModel(Path(sys.argv[1]))
    print(chat.generate([[{"role": "user", "content": sys.argv[2]}]], max_new_tokens=64)[0][0])
