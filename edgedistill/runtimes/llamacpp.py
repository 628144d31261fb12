"""llama.cpp runtime (llama-cpp-python): load a GGUF, chat with its own template, greedy decode,
stream, and score token ids.

    python -m edgedistill.runtimes.llamacpp runs/sentiment/export/student-q4_k_m.gguf "Hello!"
    python -m edgedistill.runtimes.llamacpp runs/sentiment/export/student-q4_k_m.gguf "Hello!" --device cuda

The prompt is rendered with the chat template stored in the GGUF and tokenized by llama.cpp, so
what is measured here is what a llama.cpp user of the file gets. Decoding is greedy (argmax of the
last logits until an end-of-generation token) and the answer is decoded by llama.cpp's own
llama_detokenize: llama-cpp-python's Llama.detokenize, which its create_completion uses, drops
every token longer than its fixed 32-byte buffer (0.3.36), as merged CJK tokens are.

Scoring decodes its own llama_batch that asks for logits at the scored positions only: Llama's
`logits_all` would compute the output layer at every position of every prompt and keep an
[n_ctx, vocab] array (400 MB for a 49k vocabulary at 2048 tokens).

On device "cuda" every layer is offloaded to the GPU (n_gpu_layers=-1), which needs a llama-cpp-python
built with a GPU backend: PyPI has its source only, and pip builds it for the CPU unless CMAKE_ARGS
asks for CUDA (`cuda_install_command` says how; a build without offload is refused, not run on the CPU).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgedistill.errors import EdgedistillError
from edgedistill.runtimes.common import log_softmax, scored_positions, stream_pieces
from edgedistill.sources.gguf import open_gguf


def cuda_install_command() -> str:
    """The command that rebuilds this llama-cpp-python version with CUDA (llama-cpp-python's README:
    GGML_CUDA through CMAKE_ARGS); --no-cache-dir so pip does not reuse its cached CPU wheel, --no-deps
    so nothing else is reinstalled."""
    from importlib.metadata import version

    return ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir --no-deps '
            f"llama-cpp-python=={version('llama-cpp-python')}")


def gpu_layers(device: str) -> int:
    """llama.cpp's n_gpu_layers for `device`: none on "cpu", all (-1) on "cuda", refused with the fix
    when this llama-cpp-python has no GPU offload (a CPU build, or no GPU that its backend finds)."""
    import llama_cpp

    if device == "cpu":
        return 0
    if device != "cuda":
        raise EdgedistillError(f"unknown device {device!r}", "use device 'cpu' or 'cuda'")
    if not llama_cpp.llama_supports_gpu_offload():
        raise EdgedistillError(
            f"device 'cuda' asked for, but this llama-cpp-python ({llama_cpp.__version__}) has no GPU offload: "
            "it was built for the CPU, or its GPU backend finds no GPU",
            f"on a machine with an NVIDIA GPU and the CUDA toolkit, rebuild it: {cuda_install_command()}; "
            "or run GGUF files on device 'cpu'")
    return -1


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
    """Greedy chat generation, streaming and scoring with a GGUF in llama.cpp; the Runtime interface
    of edgedistill.runtimes. `device` "cuda" offloads every layer to the GPU (gpu_layers)."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, threads: int | None = None, device: str = "cpu"):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        n_gpu_layers = gpu_layers(device)  # before the load: a CPU build is refused, not run on the CPU
        check_gguf(path)
        self.device = device
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                         n_gpu_layers=n_gpu_layers, verbose=False)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template is None:
            raise EdgedistillError(f"{path} has no tokenizer.chat_template", "export it again with edgedistill")
        eos_id, bos_id = self.llm.token_eos(), self.llm.token_bos()
        self.eos_token = self.llm.detokenize([eos_id], special=True).decode()
        bos_token = self.llm.detokenize([bos_id], special=True).decode() if bos_id >= 0 else ""
        self.formatters = {add: Jinja2ChatFormatter(template=template, eos_token=self.eos_token, bos_token=bos_token,
                                                    add_generation_prompt=add) for add in (True, False)}
        self.bos_id, self.eos_id = (bos_id if bos_id >= 0 else None), eos_id
        self.vocab_size = self.llm.n_vocab()
        self.context_length = self.llm.n_ctx()  # past it llama_decode fails

    def prompt_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        prompt = self.formatters[add_generation_prompt](messages=messages).prompt
        ids = self.llm.tokenize(prompt.encode(), add_bos=self.llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                                special=True)
        # a template that writes the BOS itself (Llama 3, Gemma, Mistral) would get a second one from
        # add_bos; llama.cpp's own chat code drops it too, and transformers never adds it
        return ids[1:] if len(ids) > 1 and ids[0] == ids[1] == self.llm.token_bos() else ids

    def is_end(self, token: int) -> bool:
        import llama_cpp

        return llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self.llm.model), token)

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        # llama_tokenize adds the BOS only where the GGUF's tokenizer.ggml.add_bos_token says so
        return self.llm.tokenize(text.encode(), add_bos=add_special, special=True)

    def decode(self, ids: list[int]) -> str:
        return detokenize(self.llm, ids)

    def greedy_ids(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        """The greedy continuation of `prompt`, one token id at a time, stopping after an end token."""
        import llama_cpp

        self.llm.reset()
        self.llm.eval(prompt)
        for step in range(max_new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab_size,))
            token = int(logits.argmax())
            yield token
            if self.is_end(token) or step == max_new_tokens - 1:
                return
            self.llm.eval([token])

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[tuple[str, bool]]:
        answers = []
        for messages in conversations:
            new = list(self.greedy_ids(self.prompt_ids(messages), max_new_tokens))
            finished = bool(new) and self.is_end(new[-1])
            answers.append((detokenize(self.llm, new[:-1] if finished else new).strip(), finished))
        return answers

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int) -> Iterator[str]:
        """The greedy answer's text, piece by piece as tokens come (pieces of a character wait for it)."""
        tokens = (t for t in self.greedy_ids(self.prompt_ids(messages), max_new_tokens) if not self.is_end(t))
        yield from stream_pieces(tokens, lambda ids: detokenize(self.llm, ids))

    def score(self, ids: list[int], *, last: int | None = None) -> np.ndarray:
        """float32 [positions, vocab_size] log-probs of the next token at each position of `ids`
        (the last `last` positions only), from an empty KV cache."""
        import llama_cpp

        keep = scored_positions(ids, last)
        if len(ids) > self.llm.n_ctx():
            raise EdgedistillError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.llm.n_ctx()}",
                                   "score shorter texts")
        self.llm.reset()
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), -1, 0, -1)
        first_scored, rows = len(ids) - keep, []
        batch = llama_cpp.llama_batch_init(self.llm.n_batch, 0, 1)
        try:
            for start in range(0, len(ids), self.llm.n_batch):
                chunk = ids[start:start + self.llm.n_batch]
                batch.n_tokens = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = start + i >= first_scored
                if llama_cpp.llama_decode(self.llm.ctx, batch) != 0:
                    raise EdgedistillError(f"llama.cpp could not decode {len(ids)} tokens", "report this as a bug")
                rows += [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, i),
                                               shape=(self.vocab_size,)).copy()
                         for i in range(len(chunk)) if start + i >= first_scored]
        finally:
            llama_cpp.llama_batch_free(batch)
            # the cache now holds these ids, which generate's own bookkeeping does not know of
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), -1, 0, -1)
        return log_softmax(np.stack(rows))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    model = LlamaCppChatModel(args.gguf, device=args.device)
    print(model.generate([[{"role": "user", "content": args.prompt}]], max_new_tokens=128)[0][0])


if __name__ == "__main__":
    main()
