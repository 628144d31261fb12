"""llama.cpp runtime (llama-cpp-python): load a GGUF, chat with its own template, greedy decode.

    python -m edgedistill.runtimes.llamacpp runs/sentiment/export/student-q4_k_m.gguf "Hello!"

The prompt is rendered with the chat template stored in the GGUF and tokenized by llama.cpp, so
what is measured here is what a llama.cpp user of the file gets. Decoding is greedy (argmax of the
last logits until an end-of-generation token) and the answer is decoded by llama.cpp's own
llama_detokenize: llama-cpp-python's Llama.detokenize, which its create_completion uses, drops
every token longer than its fixed 32-byte buffer (0.3.36), as merged CJK tokens are.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

from edgedistill.errors import EdgedistillError
from edgedistill.sources.gguf import open_gguf


def check_gguf(path: Path) -> None:
    """Fails clearly on a file llama.cpp would abort on (missing, not GGUF, truncated)."""
    if not path.is_file():
        raise EdgedistillError(f"{path} does not exist", "pass the path of a .gguf file")
    open_gguf(path)


def detokenize(llm, ids: list[int]) -> str:
    """Text of token ids (special tokens left out) by llama.cpp's llama_detokenize, any token length."""
    import llama_cpp

    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    size = 16 * len(ids) + 64
    for _ in range(2):  # a negative result is the size needed
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buffer, size, False, False)
        if n >= 0:
            return buffer.raw[:n].decode("utf-8", errors="replace")
        size = -n
    raise EdgedistillError(f"llama.cpp could not decode {len(ids)} tokens", "report this as a bug")


class LlamaCppChatModel:
    """Greedy chat generation with a GGUF in llama.cpp; same interface as TorchChatModel."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, threads: int | None = None):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        check_gguf(path)
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                         n_gpu_layers=0, verbose=False)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template is None:
            raise EdgedistillError(f"{path} has no tokenizer.chat_template", "export it again with edgedistill")
        eos_id, bos_id = self.llm.token_eos(), self.llm.token_bos()
        self.eos_token = self.llm.detokenize([eos_id], special=True).decode()
        bos_token = self.llm.detokenize([bos_id], special=True).decode() if bos_id >= 0 else ""
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=self.eos_token, bos_token=bos_token,
                                             add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        prompt = self.formatter(messages=messages).prompt
        return self.llm.tokenize(prompt.encode(), add_bos=self.llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                                 special=True)

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[tuple[str, bool]]:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        n_vocab = self.llm.n_vocab()
        answers = []
        for messages in conversations:
            self.llm.reset()
            self.llm.eval(self.prompt_ids(messages))
            new, finished = [], False
            for _ in range(max_new_tokens):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(n_vocab,))
                token = int(logits.argmax())
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finished = True
                    break
                new.append(token)
                self.llm.eval([token])
            answers.append((detokenize(self.llm, new).strip(), finished))
        return answers


if __name__ == "__main__":
    model = LlamaCppChatModel(Path(sys.argv[1]))
    print(model.generate([[{"role": "user", "content": sys.argv[2]}]], max_new_tokens=128)[0][0])
