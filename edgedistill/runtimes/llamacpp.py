"""llama.cpp runtime (llama-cpp-python): load a GGUF, chat with its own template, greedy decode.

    python -m edgedistill.runtimes.llamacpp runs/sentiment/export/student-q4_k_m.gguf "Hello!"

The prompt is rendered with the chat template stored in the GGUF and tokenized by llama.cpp, so
what is measured here is what a llama.cpp user of the file gets.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgedistill.errors import EdgedistillError
from edgedistill.sources.gguf import open_gguf


def check_gguf(path: Path) -> None:
    """Fails clearly on a file llama.cpp would abort on (missing, not GGUF, truncated)."""
    if not path.is_file():
        raise EdgedistillError(f"{path} does not exist", "pass the path of a .gguf file")
    open_gguf(path)


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
        answers = []
        for messages in conversations:
            self.llm.reset()
            result = self.llm.create_completion(prompt=self.prompt_ids(messages), max_tokens=max_new_tokens,
                                                temperature=0.0, top_k=1, stop=[self.eos_token])
            choice = result["choices"][0]
            answers.append((choice["text"].strip(), choice["finish_reason"] == "stop"))
        return answers


if __name__ == "__main__":
    model = LlamaCppChatModel(Path(sys.argv[1]))
    print(model.generate([[{"role": "user", "content": sys.argv[2]}]], max_new_tokens=128)[0][0])
