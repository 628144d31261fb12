"""Tokenizer metadata for GGUF, read from an HF folder's tokenizer.json and tokenizer_config.json.

llama.cpp tokenizes with its own code from what the GGUF says, so everything here must describe
the HF tokenizer exactly: tokens by id, their types, BPE merges, special ids, whether a BOS is
added, the chat template, and `tokenizer.ggml.pre`, the name of the pre-tokenizer regex set
llama.cpp applies. The pre-tokenizer name is looked up from the tokenizer.json pre_tokenizer
structure in `PRE_TOKENIZERS`; a structure not in the table is refused rather than guessed,
because a wrong guess tokenizes differently without any error.

Two vocabulary kinds are written:
- byte-level BPE (GGUF `tokenizer.ggml.model` "gpt2"; SmolLM, Qwen, GPT-2): tokens, merges, the
  pre-tokenizer name;
- SentencePiece BPE (GGUF "llama"; Llama 2, Mistral, Gemma), as transformers saves it in
  tokenizer.json: a BPE model with byte fallback over text whose spaces a normalizer (or a
  Metaspace pre-tokenizer) turns into "▁". llama.cpp's SentencePiece tokenizer merges the adjacent
  pair whose result has the highest score, so each token's score is minus the rank of the first
  tokenizer.json merge that makes it: llama.cpp then merges in the order the HF tokenizer does.
  Byte pieces (<0x41>) are typed BYTE, which is what llama.cpp's byte fallback looks up; whether a
  "▁" is put before the text is `tokenizer.ggml.add_space_prefix`. One difference llama.cpp cannot
  express: a Metaspace pre-tokenizer (prepend_scheme "first", Mistral's layout) adds no "▁" to text
  that already starts with a space, or after a special token; llama.cpp does.

llama.cpp ends generation at its end-of-generation (EOG) tokens: the eos, eot and eom ids the GGUF
names, and tokens whose text it knows (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...). The
other ids that end the model's turn (edgedistill.runtimes.common.declared_stop_tokens: the chat
template's end-of-turn token, generation_config.json's eos list) go into `tokenizer.ggml.eot_token_id`
and `tokenizer.ggml.eom_token_id`, in that order, so that a turn ending in a token llama.cpp does
not know by name still stops; GGUF has no key for a third.

    meta = read_tokenizer(Path("runs/x/merged"), vocab_size=49152)
    add_tokenizer_metadata(gguf_writer, meta)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from edgedistill.errors import EdgedistillError
from edgedistill.layout import CHAT_TEMPLATE, TOKENIZER_CONFIG, TOKENIZER_JSON
from edgedistill.runtimes.common import declared_stop_tokens

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")

# The split regexes of tokenizer.json files that llama.cpp implements under a pre-tokenizer name.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

# Each entry: the llama.cpp pre-tokenizer name and the steps it implements. A step matches a
# tokenizer.json step of the same type whose listed fields have these values (fields not listed,
# such as ByteLevel's trim_offsets, do not change how text splits).
# Note llama.cpp spells GPT-2's "gpt-2"; plain "gpt2" is rejected at load time.
PRE_TOKENIZERS: tuple[tuple[str, tuple[dict[str, Any], ...]], ...] = (
    (
        "smollm",
        (
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        ),
    ),
    ("gpt-2", ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},)),
    (
        "qwen2",  # Qwen2, Qwen2.5, Qwen3: single digits
        (
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ),
    ),
    (
        "llama-bpe",  # Llama 3: digits in groups of up to three
        (
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ),
    ),
)


@dataclass(frozen=True)
class TokenizerMetadata:
    """What llama.cpp needs to tokenize exactly as the HF tokenizer does."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # the byte-level pre-tokenizer's name; SentencePiece has none
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None
    scores: list[float] | None = None  # SentencePiece merge priorities
    add_space_prefix: bool | None = None  # SentencePiece: "▁" before the text
    eot_id: int | None = None  # the first id other than eos that ends a turn (the chat template's end token)
    eom_id: int | None = None  # the second such id (one from generation_config.json's eos list)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgedistillError(
            f"{path} not found", "the folder must hold a fast (tokenizer.json) HF tokenizer"
        ) from None
    except json.JSONDecodeError as err:
        raise EdgedistillError(f"{path} is not valid JSON: {err}") from None


def _steps(pre_tokenizer: dict | None) -> list[dict]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [step for sub in pre_tokenizer["pretokenizers"] for step in _steps(sub)]
    return [pre_tokenizer]


# What the BPE model itself must say for llama.cpp's pre-tokenizer to behave the same: for Llama 3
# llama.cpp takes a whole word that is a token as is, before any merge (HF's ignore_merges).
PRE_TOKENIZER_MODEL: dict[str, dict[str, Any]] = {"llama-bpe": {"ignore_merges": True}}


def pre_tokenizer_name(pre_tokenizer: dict | None, source: Path, model: dict | None = None) -> str:
    """The llama.cpp `tokenizer.ggml.pre` name for a tokenizer.json pre_tokenizer structure (and its
    BPE `model` section, which some names constrain)."""
    steps = _steps(pre_tokenizer)
    for name, pattern in PRE_TOKENIZERS:
        wanted = PRE_TOKENIZER_MODEL.get(name, {})
        if any(bool((model or {}).get(field)) != value for field, value in wanted.items()):
            continue
        if len(steps) == len(pattern) and all(
            all(step.get(field) == value for field, value in want.items())
            for step, want in zip(steps, pattern)
        ):
            return name
    raise EdgedistillError(
        f"{source}: pre_tokenizer {json.dumps(pre_tokenizer)} has no known llama.cpp equivalent",
        "add its structure and llama.cpp's pre-tokenizer name to PRE_TOKENIZERS in "
        "edgedistill/export/gguf/tokenizer.py",
    )


def _token_content(value: Any) -> str | None:
    # tokenizer_config stores special tokens as a string or as an AddedToken dict
    if isinstance(value, dict):
        return value.get("content")
    return value


def _post_processor_adds(post_processor: dict | None, token: str | None, position: int) -> bool:
    """Whether the tokenizer.json post-processor puts `token` first (0) or last (-1) of one sequence."""
    if post_processor is None or token is None:
        return False
    if post_processor.get("type") == "Sequence":
        return any(_post_processor_adds(p, token, position) for p in post_processor["processors"])
    single = post_processor.get("single") if post_processor.get("type") == "TemplateProcessing" else None
    if not single:
        return False
    return single[position].get("SpecialToken", {}).get("id") == token


def _chat_template(hf_dir: Path, tokenizer_config: dict) -> str | list[dict[str, str]] | None:
    # transformers >= 4.43 may write the template to its own file instead of tokenizer_config.json
    if tokenizer_config.get("chat_template"):
        return tokenizer_config["chat_template"]
    jinja = hf_dir / CHAT_TEMPLATE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = hf_dir / "chat_template.json"
    if as_json.is_file():
        return _read_json(as_json).get("chat_template")
    return None


def _sentencepiece_layout(tokenizer_json: dict, source: Path) -> bool | None:
    """For a tokenizer.json that is SentencePiece BPE: whether it puts "▁" before the text.
    None when it is not SentencePiece; EdgedistillError for a text pipeline llama.cpp lacks."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    normalizers = tokenizer_json.get("normalizer") or {}
    normalizers = normalizers.get("normalizers", [normalizers]) if normalizers.get("type") == "Sequence" else (
        [normalizers] if normalizers else [])
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    prefix, escaped = False, False
    for step in normalizers:
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            prefix = True
        elif step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == "▁":
            escaped = True
        else:
            raise EdgedistillError(f"{source}: normalizer step {json.dumps(step)} has no llama.cpp equivalent",
                                   "llama.cpp's SentencePiece tokenizer only turns spaces into ▁ (and may prepend one)")
    for step in steps:
        if step.get("type") == "Metaspace" and step.get("replacement") == "▁" and not step.get("split"):
            escaped = True
            prefix = prefix or step.get("prepend_scheme", "always") in ("always", "first")
        elif step.get("type") == "Split" and step.get("pattern") == {"String": " "} and escaped:
            pass  # Gemma's split on " " comes after every space became ▁: it splits nothing
        else:
            raise EdgedistillError(f"{source}: pre_tokenizer step {json.dumps(step)} has no llama.cpp equivalent",
                                   "llama.cpp's SentencePiece tokenizer does not split text before merging")
    if not escaped:
        raise EdgedistillError(f"{source}: a byte-fallback BPE that does not turn spaces into ▁",
                               "only SentencePiece-style (▁) or byte-level BPE tokenizers export to GGUF")
    return prefix


def _merge_scores(n_tokens: int, token_to_id: dict[str, int], merges: list[str]) -> list[float]:
    """Minus the rank of the first merge that makes each token (0 for tokens no merge makes)."""
    scores = [0.0] * n_tokens
    made: set[int] = set()
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        token_id = token_to_id.get(left + right)
        if token_id is not None and token_id not in made:
            made.add(token_id)
            scores[token_id] = -float(rank + 1)
    return scores


def read_tokenizer(hf_dir: Path, *, vocab_size: int | None = None) -> TokenizerMetadata:
    """Read a byte-level BPE or SentencePiece BPE tokenizer from an HF folder.

    `vocab_size` is the model's embedding row count: when it is larger than the tokenizer (padded
    embeddings), the gap is filled with UNUSED placeholder tokens, since llama.cpp sizes the
    vocabulary from the token list and checks it against token_embd.
    """
    hf_dir = Path(hf_dir)
    tokenizer_file = hf_dir / TOKENIZER_JSON
    tokenizer_json = _read_json(tokenizer_file)
    config_file = hf_dir / TOKENIZER_CONFIG
    tokenizer_config = _read_json(config_file) if config_file.is_file() else {}

    model = tokenizer_json.get("model") or {}
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    add_space_prefix = _sentencepiece_layout(tokenizer_json, tokenizer_file)
    sentencepiece = add_space_prefix is not None
    if not sentencepiece and (model.get("type") != "BPE" or not any(step.get("type") == "ByteLevel" for step in steps)):
        raise EdgedistillError(
            f"{tokenizer_file}: tokenizer model {model.get('type')!r} is neither byte-level BPE nor SentencePiece BPE",
            "GGUF export takes byte-level BPE (SmolLM2, Qwen) and SentencePiece BPE with byte fallback "
            "(Llama 2, Mistral, Gemma) tokenizers",
        )
    pre = None if sentencepiece else pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"), tokenizer_file, model)

    id_to_token: dict[int, str] = {i: tok for tok, i in model["vocab"].items()}
    id_to_type: dict[int, int] = {i: TokenType.NORMAL for i in id_to_token}
    if sentencepiece:
        for token, i in model["vocab"].items():
            if _BYTE_PIECE.fullmatch(token):
                id_to_type[i] = TokenType.BYTE
        if model.get("unk_token") in model["vocab"]:
            id_to_type[model["vocab"][model["unk_token"]]] = TokenType.UNKNOWN
    for added in tokenizer_json.get("added_tokens", []):
        # llama.cpp matches USER_DEFINED and CONTROL tokens on raw text, so their content stays raw
        id_to_token[added["id"]] = added["content"]
        if id_to_type.get(added["id"]) != TokenType.UNKNOWN:
            id_to_type[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED

    n_tokens = max(id_to_token) + 1
    if vocab_size is not None and vocab_size < n_tokens:
        raise EdgedistillError(
            f"{tokenizer_file}: the tokenizer has ids up to {n_tokens - 1} but the model's vocab_size is {vocab_size}",
            "export the tokenizer that was trained with this model",
        )
    n_tokens = max(n_tokens, vocab_size or 0)
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(n_tokens)]
    token_types = [int(id_to_type.get(i, TokenType.UNUSED)) for i in range(n_tokens)]

    # tokenizers >= 0.20 writes merges as [left, right] pairs, older versions as "left right"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    token_to_id = {tok: i for i, tok in id_to_token.items()}

    def special_id(field: str) -> int | None:
        content = _token_content(tokenizer_config.get(field))
        if content is None:
            return None
        if content not in token_to_id:
            raise EdgedistillError(f"{config_file}: {field} {content!r} is not a token of {tokenizer_file}")
        return token_to_id[content]

    bos_token = _token_content(tokenizer_config.get("bos_token"))
    eos_token = _token_content(tokenizer_config.get("eos_token"))
    post_processor = tokenizer_json.get("post_processor")
    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:
        add_bos = _post_processor_adds(post_processor, bos_token, 0)
    add_eos = tokenizer_config.get("add_eos_token")
    if add_eos is None:
        add_eos = _post_processor_adds(post_processor, eos_token, -1)
    eos_id = special_id("eos_token")
    other_stops = [i for i in declared_stop_tokens(hf_dir) if i != eos_id and 0 <= i < n_tokens] + [None, None]

    return TokenizerMetadata(
        model="llama" if sentencepiece else "gpt2",
        pre=pre,
        tokens=tokens,
        token_types=token_types,
        # llama.cpp's SentencePiece tokenizer ranks by scores and ignores merges
        merges=[] if sentencepiece else merges,
        bos_id=special_id("bos_token"),
        eos_id=eos_id,
        pad_id=special_id("pad_token"),
        unk_id=special_id("unk_token"),
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        chat_template=_chat_template(hf_dir, tokenizer_config),
        scores=_merge_scores(n_tokens, token_to_id, merges) if sentencepiece else None,
        add_space_prefix=add_space_prefix,
        eot_id=other_stops[0],
        eom_id=other_stops[1],
    )


def add_tokenizer_metadata(writer: gguf.GGUFWriter, meta: TokenizerMetadata) -> None:
    """Put the tokenizer keys into a GGUFWriter (before its header is written)."""
    writer.add_tokenizer_model(meta.model)
    if meta.pre is not None:
        writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.token_types)
    if meta.scores is not None:
        writer.add_token_scores(meta.scores)
    if meta.merges:
        writer.add_token_merges(meta.merges)
    if meta.add_space_prefix is not None:
        writer.add_add_space_prefix(meta.add_space_prefix)
    for set_id, token_id in (
        (writer.add_bos_token_id, meta.bos_id),
        (writer.add_eos_token_id, meta.eos_id),
        (writer.add_pad_token_id, meta.pad_id),
        (writer.add_unk_token_id, meta.unk_id),
        (writer.add_eot_token_id, meta.eot_id),
        (writer.add_eom_token_id, meta.eom_id),
    ):
        if token_id is not None:
            set_id(token_id)
    # always explicit: llama.cpp's default for a missing add_bos key differs by pre-tokenizer
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
