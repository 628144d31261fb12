"""Fast greedy batch-1 decoding of an HF causal LM in PyTorch: a static KV cache and, on CUDA, the
one-token step captured once as a CUDA graph and replayed.

    python -m edgedistill.runtimes.torch_decode runs/sentiment/teacher --new-tokens 16
    python -m edgedistill.runtimes.torch_decode runs/sentiment/teacher --device cuda --dtype bf16

Why: transformers' `generate` at batch 1 is bound by kernel launches on a GPU, not by the GPU
(the teacher's shape decodes at about 40 tokens/s on an H200 whose memory bound is above 15,000).
A static cache (transformers' StaticCache) gives every step the same shapes and buffer addresses,
which is what lets one CUDA graph replay the whole step (every layer, the argmax, feeding the
token back) with one launch. The sequence lives in a device buffer: the step reads its input
token and position from it and writes the next token into it, so nothing returns to the host
until the caller asks for the tokens. On the CPU the same step runs eagerly, token for token the
same as greedy `generate`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from edgedistill.errors import EdgedistillError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def require_device(device: str) -> None:
    """Fails clearly when `device` ("cpu" or "cuda") cannot run here."""
    if device not in ("cpu", "cuda"):
        raise EdgedistillError(f"unknown device {device!r}", "use --device cpu or --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        build = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                 else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
        raise EdgedistillError(f"--device cuda was asked for, but {build}",
                               "run with --device cpu, or on a machine with an NVIDIA GPU and a CUDA build of "
                               "torch (pip install torch --index-url https://download.pytorch.org/whl/cu128)")


def device_name(device: str) -> str:
    """"cpu", or "cuda:<the GPU's name>", as bench results record it."""
    return f"cuda:{torch.cuda.get_device_name(0)}" if device == "cuda" else "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StaticDecoder:
    """Greedy decoding of one sequence of at most `max_length` tokens (prompt and answer together).

    `prefill(prompt)` fills the cache and picks the first new token; `decode(n)` adds n more;
    `tokens()` is the sequence so far. `cuda_graph` (default: on CUDA) captures the step on the first
    `decode` and replays it after; if the capture fails, decoding goes on eagerly and
    `graph_error` says why. The cache is reused: `prefill` starts a new sequence in place.
    """

    def __init__(self, model, max_length: int, *, cuda_graph: bool | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.max_length = max_length
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        # the sequence: the step at position p reads ids[p] and writes ids[p + 1]
        self.ids = torch.zeros(max_length + 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.length = 0  # the host's count of the tokens in ids, so no step needs to ask the device
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = None
        self.graph_error: str | None = None

    @property
    def mode(self) -> str:
        return "cuda_graph" if self.graph is not None else "eager"

    def _forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=cache_position[None], cache_position=cache_position,
                         past_key_values=self.cache, use_cache=True)
        return out.logits[0, -1].argmax(-1, keepdim=True)

    def _step(self) -> None:
        # Only device tensors and fixed shapes: the same launches every time, capturable as a graph.
        token = self.ids.index_select(0, self.position)[None]
        self.ids.index_copy_(0, self.position + 1, self._forward(token, self.position))
        self.position.add_(1)

    @torch.no_grad()
    def prefill(self, prompt: list[int] | torch.Tensor) -> None:
        prompt = torch.as_tensor(prompt, dtype=torch.long, device=self.device).flatten()
        if not 0 < len(prompt) < self.max_length:
            raise EdgedistillError(f"a prompt of {len(prompt)} tokens does not fit a decoder of {self.max_length}",
                                   "make the StaticDecoder longer")
        self.cache.reset()
        self.ids[: len(prompt)] = prompt
        positions = torch.arange(len(prompt), device=self.device)
        self.ids[len(prompt)] = self._forward(prompt[None], positions)[0]
        self.position.fill_(len(prompt))
        self.length = len(prompt) + 1

    def _capture(self) -> None:
        # Warm-up on a side stream, as CUDA graph capture requires; the warm-up steps write the
        # position's cache slot and the next token, which the replayed step writes again.
        saved_position, saved_ids = self.position.clone(), self.ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
                self.position.copy_(saved_position)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except Exception as error:  # decoding still works eagerly; the caller reports graph_error
            self.graph_error = f"{type(error).__name__}: {error}"[:500]
            self.use_graph = False
        else:
            self.graph = graph
        self.position.copy_(saved_position)
        self.ids.copy_(saved_ids)

    @torch.no_grad()
    def decode(self, new_tokens: int) -> None:
        if self.length == 0:
            raise EdgedistillError("decode before prefill", "call prefill(prompt) first")
        if self.length + new_tokens > self.max_length + 1:
            raise EdgedistillError(f"{self.length} + {new_tokens} tokens do not fit a decoder of {self.max_length}",
                                   "make the StaticDecoder longer")
        if self.use_graph and self.graph is None and new_tokens > 0:
            self._capture()
        for _ in range(new_tokens):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        self.length += new_tokens

    def tokens(self) -> list[int]:
        return self.ids[: self.length].tolist()

    def generate(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """The `max_new_tokens` greedy tokens after `prompt` (no stop at an end token)."""
        self.prefill(prompt)
        self.decode(max_new_tokens - 1)
        return self.tokens()[len(prompt):]


@torch.no_grad()
def time_generate(model, prompt: list[int], new_tokens: int, device: str) -> dict:
    """Plain greedy `model.generate` at batch 1, the baseline StaticDecoder is measured against:
    one call for the prefill and first token ("first_token_s"), one for `new_tokens` more; "decode_s" is the
    difference, "tokens" the longer call's new tokens."""
    ids = torch.tensor([prompt], device=model.device)
    seconds = []
    for count in (1, new_tokens + 1):
        synchronize(device)
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                             do_sample=False, pad_token_id=model.generation_config.pad_token_id or 0)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return {"first_token_s": seconds[0], "decode_s": max(seconds[1] - seconds[0], 1e-9),
            "tokens": out[0, len(prompt):].tolist()}


def main() -> None:
    from transformers import AutoTokenizer

    from edgedistill.runtimes.pytorch import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    require_device(args.device)
    model = load_model(Path(args.folder), dtype=DTYPES[args.dtype]).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    prompt = tokenizer(args.prompt)["input_ids"]
    decoder = StaticDecoder(model, len(prompt) + args.new_tokens)
    print(tokenizer.decode(decoder.generate(prompt, args.new_tokens)))


if __name__ == "__main__":
    main()
