"""What every runtime shares: log-probs from logits, the score() request's checks, streamed text
pieces, the devices and dtypes PyTorch runs in, and a model folder's chat files: its chat template,
rendered as transformers renders it, and the token ids that end the model's turn.

    python -c "import numpy as np; from edgedistill.runtimes.common import log_softmax; print(log_softmax(np.zeros(4)))"
    python -c "from edgedistill.runtimes.common import declared_stop_tokens as d; print(d('runs/tiny/teacher'))"

The runtime modules import these from here, not from the edgedistill.runtimes package, whose
open_runtime imports them: a helper in the package would make each runtime and the package import
each other. This module imports numpy, edgedistill.errors and edgedistill.layout (jinja2 when a
template is rendered), never torch or transformers: the ONNX runtime and the GGUF exporter read
chat files without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from edgedistill.errors import EdgedistillError
from edgedistill.layout import (CHAT_TEMPLATE, GENERATION_CONFIG, HF_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG,
                                TOKENIZER_JSON)

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")


def log_softmax(logits: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Log-probs of logits rows, normalized in float64 (a 262k vocabulary stays exact), as `dtype`."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(dtype, copy=False)


def scored_positions(ids: list[int], last: int | None) -> int:
    """How many positions score(ids, last=last) returns; refuses an empty or bad request."""
    if not ids:
        raise EdgedistillError("score() needs at least one token id", "pass a non-empty list of ids")
    if last is not None and not 0 < last:
        raise EdgedistillError(f"score(last={last}) asks for no positions", "pass last >= 1 or None (all)")
    return len(ids) if last is None else min(last, len(ids))


def stream_pieces(tokens: Iterable[int], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """Text pieces of an answer whose tokens (end token left out) come one by one: each piece is
    what the text gained, and a piece that ends inside a multi-byte character waits for the rest."""
    emitted, ids = "", []
    for token in tokens:
        ids.append(token)
        # decoding the whole answer each time keeps multi-byte characters whole; answers are short,
        # so the quadratic cost does not matter
        text = decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text


def _json_file(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    # tokenizer_config.json and special_tokens_map.json store a token as a string or an AddedToken dict
    return value.get("content") if isinstance(value, dict) else value


def read_chat_template(folder: Path) -> str | None:
    """The folder's chat template: tokenizer_config.json's chat_template (of a list of named ones, the
    "default"), else chat_template.jinja, else chat_template.json's (transformers writes each)."""
    template = _json_file(folder / TOKENIZER_CONFIG).get("chat_template")
    if template is None and (folder / CHAT_TEMPLATE).is_file():
        template = (folder / CHAT_TEMPLATE).read_text(encoding="utf-8")
    if template is None:
        template = _json_file(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default", template[0].get("template") if template else None)
    return template


def render_chat(template: str, messages: list[dict[str, str]], special: dict[str, str],
                add_generation_prompt: bool = True) -> str:
    """The prompt text, rendered as transformers' apply_chat_template renders it."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


# The content of the probe's assistant turn: text no template changes and no special token starts with.
_PROBE_ANSWER = "EdgedistillProbeAnswer"


def _end_of_turn_text(template: str, special: dict[str, str], special_texts: Iterable[str]) -> str | None:
    """The special token (one of `special_texts`) that `template` puts right after an assistant
    turn's content, found by rendering a one-exchange conversation; None when plain text or nothing follows."""
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = render_chat(template, messages, special, add_generation_prompt=False)
    except Exception:  # a template that cannot render the probe declares no end token (prompts still fail loudly)
        return None
    if _PROBE_ANSWER not in text:
        return None
    after = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):].lstrip()
    # the longest match: <|end|> must not be taken for the <|end_of_text|> that follows
    return max((token for token in special_texts if token and after.startswith(token)), key=len, default=None)


def declared_stop_tokens(folder: Path) -> dict[int, str | None]:
    """The tokens that end the model's turn, as the HF (or export) folder `folder` declares them:
    id → token text (None for an id its tokenizer lacks), in this order, each id once: the
    tokenizer's eos token; the special token the chat template closes an assistant turn with
    (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, `<|end|>`: whatever follows the content when a
    one-exchange conversation is rendered); the eos_token_id of generation_config.json, then of
    config.json (an id or a list: Llama 3's [128001, 128008, 128009]).

    Generation that stops at the tokenizer's eos alone runs on to max_new_tokens on a model whose
    turn ends with another token. The files are read as JSON, so no tokenizer library is needed."""
    folder = Path(folder)
    tokenizer_json = _json_file(folder / TOKENIZER_JSON)
    tokenizer_config = _json_file(folder / TOKENIZER_CONFIG)
    special_ids = {entry["content"]: int(i) for i, entry in tokenizer_config.get("added_tokens_decoder", {}).items()
                   if entry.get("special")}
    special_ids |= {entry["content"]: entry["id"] for entry in tokenizer_json.get("added_tokens", [])
                    if entry.get("special")}
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    token_ids = {**(vocab if isinstance(vocab, dict) else {}), **special_ids}
    texts = {i: token for token, i in token_ids.items()}
    special_map = _json_file(folder / SPECIAL_TOKENS_MAP)
    special = {key: _token_text(tokenizer_config.get(key) or special_map.get(key))
               for key in ("bos_token", "eos_token")}
    special = {key: value for key, value in special.items() if value is not None}

    ids: list[int | None] = [token_ids.get(special.get("eos_token"))]
    template = read_chat_template(folder)
    if template is not None:
        ids.append(token_ids.get(_end_of_turn_text(template, special, special_ids)))
    for config in (GENERATION_CONFIG, HF_CONFIG):
        eos = _json_file(folder / config).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return {i: texts.get(i) for i in dict.fromkeys(ids) if i is not None}
