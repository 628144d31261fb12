"""ONNX Runtime: an export folder from edgedistill.export.onnx, greedy chat with a KV cache, streamed.

    python -m edgedistill.runtimes.onnx runs/sentiment/export_onnx/student-int4 "What is the capital of France?"
    python -m edgedistill.runtimes.onnx runs/sentiment/export_onnx/student-int4 "Hi" --device cuda

Builder exports (with genai_config.json) run in onnxruntime-genai: its fused attention keeps the KV
cache in one preallocated buffer, and its tokenizer is what a user of the export gets, so what is
measured here is what they run. Other exports (optimum's graph) run in a plain onnxruntime session
that feeds each step's present KV back as the next step's past (`OnnxDecoder`), tokenized by the
export's tokenizer.json. Chat prompts are rendered from the export's own chat template.

On device "cuda" both run with ONNX Runtime's CUDA provider: the GenAI model with its "cuda" provider,
the plain session with CUDAExecutionProvider. The PyPI packages this project pins are CPU builds;
`require_cuda` refuses a folder whose runtime has no CUDA provider and names the packages to install
instead (`cuda_install_command`), and a session that fell back to the CPU is refused too.

This module imports neither torch nor transformers, so the peak RSS that edgedistill.bench.onnx_worker
measures in a process of its own is the model's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from itertools import takewhile
from pathlib import Path

import numpy as np

from edgedistill.errors import EdgedistillError
from edgedistill.layout import GENAI_CONFIG, HF_CONFIG, ONNX_MANIFEST, ONNX_MODEL, SPECIAL_TOKENS_MAP, TOKENIZER_JSON
from edgedistill.runtimes.common import (declared_stop_tokens, log_softmax, read_chat_template, render_chat,
                                         scored_positions, stream_pieces)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
CUDA_PROVIDER = "CUDAExecutionProvider"
# onnxruntime-gpu is the same `onnxruntime` module with the CUDA provider; it has no 1.32.0 on PyPI
# (newest: 1.31.1, 2026-10), so the pinned onnxruntime 1.32.0 is replaced by 1.31.1, which runs
# onnxruntime-genai 0.12 as well. Only one of onnxruntime and onnxruntime-gpu may be installed.
ONNXRUNTIME_GPU_VERSION = "1.31.1"


def onnx_artifacts(*folders: Path) -> list[Path]:
    """The ONNX export folders inside stage folders, folder by folder, largest (least quantized) first."""
    def size(export: Path) -> int:
        return sum(p.stat().st_size for p in export.glob(f"{ONNX_MODEL}*"))

    return [export for folder in folders
            for export in sorted((p.parent for p in folder.glob(f"*/{ONNX_MANIFEST}")), key=lambda e: (-size(e), e.name))]


def check_onnx_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not (folder / ONNX_MODEL).is_file():
        raise EdgedistillError(f"{folder} is not an ONNX export (no {ONNX_MODEL})",
                               "export one with `edgedistill export MODEL --format onnx --out FOLDER`")
    return folder


def cuda_install_command(genai: bool) -> str:
    """The packages that give this project's ONNX runtime (GenAI when `genai`) its CUDA provider."""
    if not genai:
        return f"pip uninstall -y onnxruntime && pip install onnxruntime-gpu=={ONNXRUNTIME_GPU_VERSION}"
    import onnxruntime_genai as og  # the same version, whichever of its two packages is installed

    return ("pip uninstall -y onnxruntime onnxruntime-genai && pip install "
            f"onnxruntime-gpu=={ONNXRUNTIME_GPU_VERSION} onnxruntime-genai-cuda=={og.__version__}")


def _no_cuda(what: str, genai: bool) -> EdgedistillError:
    return EdgedistillError(f"device 'cuda' asked for, but {what}",
                            "on a machine with an NVIDIA GPU and the CUDA and cuDNN libraries onnxruntime-gpu needs, "
                            f"install the CUDA builds: {cuda_install_command(genai)}; or run ONNX exports on "
                            "device 'cpu'")


def require_cuda(folder: Path) -> None:
    """Refuses device "cuda" for the export `folder` when its runtime (onnxruntime-genai for a builder
    export, which scores in plain onnxruntime too) has no CUDA provider here, with the packages to install."""
    import onnxruntime as ort

    genai = (Path(folder) / GENAI_CONFIG).is_file()
    if genai:
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            raise _no_cuda(f"onnxruntime-genai {og.__version__} is a build without CUDA (the onnxruntime-genai "
                           "package; onnxruntime-genai-cuda has it)", genai)
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise _no_cuda(f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (providers: "
                       f"{', '.join(ort.get_available_providers())})", genai)


def session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    return options


class OnnxDecoder:
    """A decoder graph with past/present KV in a plain onnxruntime session: full-sequence logits and
    KV-cached steps, for any export (the builder's GroupQueryAttention graph or optimum's). On device
    "cuda" the session runs with CUDAExecutionProvider (the CPU's takes only what CUDA has no kernel for)."""

    def __init__(self, folder: Path, *, threads: int | None = None, model_file: str = ONNX_MODEL,
                 device: str = "cpu"):
        import onnxruntime as ort

        folder = check_onnx_folder(folder)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            require_cuda(folder)
            providers.insert(0, CUDA_PROVIDER)
        self.session = ort.InferenceSession(str(folder / model_file), session_options(threads), providers=providers)
        if self.session.get_providers()[0] != providers[0]:
            # onnxruntime falls back to the CPU with a warning when the CUDA libraries do not load
            raise _no_cuda(f"onnxruntime could not start {CUDA_PROVIDER} (CUDA or cuDNN libraries missing?): the "
                           f"session runs on {', '.join(self.session.get_providers())}", False)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in self.inputs if name.startswith("past_key_values.")]
        outputs = [o.name for o in self.session.get_outputs()]
        # past_key_values.N.key ↔ present.N.key, the naming both exporters use
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        missing = [name for name in ["logits", *self.present_names] if name not in outputs]
        if "input_ids" not in self.inputs or missing:
            raise EdgedistillError(f"{folder}/model.onnx is not a decoder with a KV cache (missing "
                                   f"{'input_ids' if 'input_ids' not in self.inputs else ', '.join(missing)})",
                                   "export it again with edgedistill export --format onnx")
        vocab = self.session.get_outputs()[outputs.index("logits")].shape[-1]
        if not isinstance(vocab, int):  # a symbolic width: the export's config says it
            vocab = json.loads((folder / HF_CONFIG).read_text())["vocab_size"]
        self.vocab_size: int = vocab

    def empty_past(self) -> dict[str, np.ndarray]:
        """The past KV inputs of a sequence with nothing cached yet."""
        past = {}
        for name in self.past_names:
            info = self.inputs[name]
            # [batch, kv heads, past length, head size]: batch 1, nothing cached yet
            shape = [d if isinstance(d, int) else 0 for d in info.shape]
            shape[0] = 1
            past[name] = np.zeros(shape, _DTYPES[info.type])
        return past

    def feed(self, ids: list[int], past: dict[str, np.ndarray], past_length: int) -> dict[str, np.ndarray]:
        """The session inputs that run `ids` after `past_length` cached tokens (any extra outputs
        asked of session.run come with them: edgedistill.export.onnx.calibrate reads activations so)."""
        total = past_length + len(ids)
        feed = {"input_ids": np.array([ids], np.int64), **past}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, total), np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_length, total, dtype=np.int64)[None]
        return feed

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float32 logits of one sequence, from an empty cache."""
        out = self.session.run(["logits"], self.feed(list(ids), self.empty_past(), 0))[0]
        return out[0].astype(np.float32)

    def steps(self, prompt: list[int]) -> Iterator[np.ndarray]:
        """Greedy decoding one token at a time: yields the logits of each next token (the caller
        sends nothing; the argmax is fed back), the prompt's KV computed once and then extended."""
        past, length, ids = self.empty_past(), 0, list(prompt)
        names = ["logits", *self.present_names]
        while True:
            out = self.session.run(names, self.feed(ids, past, length))
            logits = out[0][0, -1].astype(np.float32)
            yield logits
            length += len(ids)
            past = dict(zip(self.past_names, out[1:]))
            ids = [int(logits.argmax())]


class OnnxChatModel:
    """Greedy chat generation, streaming and scoring with an ONNX export; the Runtime interface of
    edgedistill.runtimes. `device` "cuda" runs it with ONNX Runtime's CUDA provider (require_cuda)."""

    def __init__(self, folder: Path, *, threads: int | None = None, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise EdgedistillError(f"unknown device {device!r}", "use device 'cpu' or 'cuda'")
        self.folder = check_onnx_folder(folder)
        self.device = device
        if device == "cuda":
            require_cuda(self.folder)  # before anything loads
        self.threads = threads or os.cpu_count() or 1
        self.template = read_chat_template(self.folder)
        special_map = self.folder / SPECIAL_TOKENS_MAP
        special = json.loads(special_map.read_text()) if special_map.is_file() else {}
        self.special = {key: (value["content"] if isinstance(value, dict) else value)
                        for key, value in special.items() if key in ("bos_token", "eos_token")}
        self.genai = (self.folder / GENAI_CONFIG).is_file()
        self.decoder: OnnxDecoder | None = None
        self.text_tokenizers: dict[bool, object] = {}  # onnxruntime-genai tokenizers for encode(add_special=)
        if self.genai:
            self._open_genai()
        else:
            self._open_plain()

    def _open_genai(self) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(self.folder))
        config.clear_providers()  # none left: the CPU
        if self.device == "cuda":
            config.append_provider("cuda")
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
        self.og = og
        try:
            self.model = og.Model(config)
        except RuntimeError as exc:
            if self.device == "cpu":
                raise
            raise _no_cuda(f"onnxruntime-genai could not load {self.folder} with its CUDA provider ({exc})",
                           True) from None
        if self.device == "cuda" and self.model.device_type == "CPU":
            raise _no_cuda(f"onnxruntime-genai loaded {self.folder} on the CPU", True)
        self.tokenizer = og.Tokenizer(self.model)
        genai_config = json.loads((self.folder / GENAI_CONFIG).read_text())["model"]
        eos = genai_config.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        # the export's own files as well: a folder exported before genai_config carried every stop id
        self.eos_ids = set(eos) | set(declared_stop_tokens(self.folder))
        self.bos_id, self.eos_id = genai_config.get("bos_token_id"), eos[0]
        self.context_length = genai_config.get("context_length") or 2048
        self.vocab_size = genai_config["vocab_size"]

    def _open_plain(self) -> None:
        from tokenizers import Tokenizer

        self.decoder = OnnxDecoder(self.folder, threads=self.threads, device=self.device)
        self.vocab_size = self.decoder.vocab_size
        self.hf_tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER_JSON))
        config_file = self.folder / HF_CONFIG
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        ids = list(declared_stop_tokens(self.folder))  # the tokenizer's own end token first
        self.eos_ids = set(ids)
        self.eos_id = ids[0] if ids else None
        bos = self.special.get("bos_token")
        self.bos_id = self.hf_tokenizer.token_to_id(bos) if bos is not None else config.get("bos_token_id")
        self.context_length = config.get("max_position_embeddings")

    def encode(self, text: str, *, add_special: bool | None = None) -> list[int]:
        """Token ids as the export's tokenizer gives them; add_special: whether the tokens its config
        puts around a text (a bos) are added (None: the tokenizer's default, which chat prompts use)."""
        if self.genai:
            tokenizer = self.tokenizer
            if add_special is not None:
                # the option stays set on a tokenizer: one of its own per setting leaves the default as it was
                if add_special not in self.text_tokenizers:
                    self.text_tokenizers[add_special] = self.og.Tokenizer(self.model)
                    self.text_tokenizers[add_special].update_options(add_special_tokens=str(add_special).lower())
                tokenizer = self.text_tokenizers[add_special]
            return [int(t) for t in tokenizer.encode(text)]
        return self.hf_tokenizer.encode(text, add_special_tokens=add_special is not False).ids

    def decode(self, ids: list[int]) -> str:
        if self.genai:
            return self.tokenizer.decode(np.array(ids, np.int32))
        return self.hf_tokenizer.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        if self.template is None:
            raise EdgedistillError(f"{self.folder} has no chat template",
                                   "export from a folder whose tokenizer_config.json has chat_template")
        ids = self.encode(render_chat(self.template, messages, self.special, add_generation_prompt))
        # a template that writes the BOS itself (Llama 3, Gemma, Mistral) would get a second one from the
        # tokenizer's own; transformers' apply_chat_template never adds it, so neither is it kept here
        return ids[1:] if len(ids) > 1 and self.bos_id is not None and ids[0] == ids[1] == self.bos_id else ids

    def is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def greedy_ids(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        """The greedy continuation of `prompt`, one token id at a time, stopping after an end token."""
        if self.genai:
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(do_sample=False, max_length=min(len(prompt) + max_new_tokens,
                                                                      self.context_length))
            generator = self.og.Generator(self.model, params)
            generator.append_tokens(np.array([prompt], np.int32))
            for _ in range(max_new_tokens):
                if generator.is_done():
                    return
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                yield token
                if token in self.eos_ids:
                    return
            return
        steps = self.decoder.steps(prompt)
        for _ in range(max_new_tokens):
            token = int(next(steps).argmax())
            yield token
            if token in self.eos_ids:
                return

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int) -> Iterator[str]:
        """The greedy answer's text, piece by piece as tokens come (pieces of a character wait for it)."""
        tokens = takewhile(lambda t: not self.is_end(t), self.greedy_ids(self.prompt_ids(messages), max_new_tokens))
        yield from stream_pieces(tokens, self.decode)

    @property
    def scorer(self) -> OnnxDecoder:
        """The plain onnxruntime session that scores: onnxruntime-genai gives no full-sequence logits,
        so a builder export opens its graph a second time (once, on first use)."""
        if self.decoder is None:
            self.decoder = OnnxDecoder(self.folder, threads=self.threads, device=self.device)
        return self.decoder

    def score(self, ids: list[int], *, last: int | None = None) -> np.ndarray:
        """float32 [positions, vocab_size] log-probs of the next token at each position of `ids` (the
        last `last` positions only; the graph computes them all), in a plain onnxruntime session."""
        keep = scored_positions(ids, last)
        return log_softmax(self.scorer.logits(ids)[-keep:])

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[tuple[str, bool]]:
        """(answer, finished) per conversation; finished is False when max_new_tokens cut it off."""
        answers = []
        for messages in conversations:
            ids = list(self.greedy_ids(self.prompt_ids(messages), max_new_tokens))
            finished = bool(ids) and ids[-1] in self.eos_ids
            # an answer cut off inside a multi-byte character ends in U+FFFD; stream() holds that piece back too
            text = self.decode(ids[:-1] if finished else ids)
            answers.append(((text if finished else text.rstrip("\ufffd")).strip(), finished))
        return answers


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    chat = OnnxChatModel(args.folder, threads=args.threads, device=args.device)
    for piece in chat.stream([{"role": "user", "content": args.prompt}], max_new_tokens=args.max_new_tokens):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
