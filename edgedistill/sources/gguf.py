"""GGUF files as model sources: the weights through transformers, the tokenizer rebuilt from the GGUF.

    python -c "from edgedistill.sources.gguf import tokenizer_from_gguf; print(tokenizer_from_gguf('model.gguf'))"

transformers dequantizes GGUF weights well, but the tokenizer it converts from a byte-level BPE GGUF
is misconfigured (a `LlamaTokenizer` adding bos, eos `<|im_start|>`, a SentencePiece/ByteLevel decoder
mix) and breaks other runtimes, and from a SentencePiece GGUF (Gemma 3) it splits words llama.cpp
keeps whole and writes a 253 MB tokenizer.model. The GGUF's own `tokenizer.*` metadata is what
llama.cpp runs, so that is the truth we rebuild the tokenizer from, with the `tokenizers` library
directly: byte-level BPE here, SentencePiece in edgedistill.sources.gguf_sentencepiece.

Every GGUF the package reads is opened by `read_gguf` (or `open_gguf`, its cached form), which first
walks the header against the file's size (edgedistill.sources.gguf_header): gguf-py's reader trusts
every count and loops until memory runs out on a damaged one.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from edgedistill.errors import EdgedistillError
from edgedistill.sources.gguf_header import DAMAGED_HINT, check_gguf_header
from edgedistill.sources.gguf_sentencepiece import sentencepiece_bpe

# The split regexes llama.cpp runs for Qwen2 and Llama 3 (llama-vocab.cpp). Their tokenizer.json
# files say `(?i:'s|'t|...)`; llama.cpp spells the contractions out in ASCII, so in "it'ſt" (a long
# s, which case-folds to "s") it finds no contraction where the tokenizer.json regex splits "'ſ" off.
QWEN2_SPLIT_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT_REGEX = QWEN2_SPLIT_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _split_then_byte_level(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gpt2_byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@dataclass(frozen=True)
class BytePreTokenizer:
    """How llama.cpp runs byte-level BPE under one `tokenizer.ggml.pre` name (llama-vocab.cpp)."""

    pre_tokenizer: Callable[[], pre_tokenizers.PreTokenizer]  # the HF pre-tokenizer splitting the same way
    ignore_merges: bool = False  # a whole word that is a token is taken as is, before any merge
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent
    clean_spaces: bool = False  # decoding drops the space before punctuation (" ." -> ".")


# llama.cpp's `tokenizer.ggml.pre` names -> how to split text the same way.
# smollm: llama.cpp splits every digit on its own (`\p{N}`), then applies the GPT-2 regex.
PRE_TOKENIZERS: dict[str, BytePreTokenizer] = {
    "smollm": BytePreTokenizer(
        lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _gpt2_byte_level()]
        )
    ),
    "gpt2": BytePreTokenizer(_gpt2_byte_level),
    "gpt-2": BytePreTokenizer(_gpt2_byte_level),
    "qwen2": BytePreTokenizer(lambda: _split_then_byte_level(QWEN2_SPLIT_REGEX)),  # Qwen2, Qwen2.5, Qwen3
    "llama-bpe": BytePreTokenizer(  # Llama 3: digits in groups of up to three
        lambda: _split_then_byte_level(LLAMA3_SPLIT_REGEX), ignore_merges=True, add_bos=True, clean_spaces=True
    ),
}


# Token texts llama.cpp's vocabulary loader (llama-cpp-python 0.3.36) turns into control tokens
# whatever their GGUF type: it finds end-of-generation tokens by name (llama-vocab.cpp). So they are
# matched in text only as specials, and left out when decoding without specials.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
})

TOKENIZER_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}


@dataclass(frozen=True)
class GgufTokenizerMetadata:
    """The `tokenizer.*` keys of a GGUF file, as plain Python values."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float]  # SentencePiece: the merge priority of each token (higher merges first)
    add_space_prefix: bool  # SentencePiece: "▁" before the text and after each special token
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    context_length: int | None


_VT = gguf.GGUFValueType


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Check and open a GGUF file, uncached; a bad or truncated file raises EdgedistillError, not a traceback."""
    path = Path(path)
    check_gguf_header(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # anything gguf-py finds that the header check did not: the same message
        raise EdgedistillError(
            f"{path} is a damaged or truncated GGUF file ({size} bytes; gguf could not read it: {error})",
            hint="copy or download the file again and compare its size and checksum with the original",
        ) from error
    data_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if data_end > size:
        raise EdgedistillError(
            f"{path} is truncated: its tensors end at byte {data_end} but the file has {size} bytes",
            hint="copy or download the file again",
        )
    return reader


def open_gguf(path: Path) -> gguf.GGUFReader:
    """read_gguf, cached by path, size and modification time."""
    path = Path(path)
    stat = path.stat()
    # Cached because resolving, tokenizing and materializing the same file each need the reader,
    # and parsing the metadata of a 49k-token vocabulary takes about 1.6 s.
    return _open_gguf_cached(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_gguf_cached(path: Path, size: int, mtime_ns: int) -> gguf.GGUFReader:
    return read_gguf(path)


_INTEGER_TYPES = {_VT.UINT8, _VT.INT8, _VT.UINT16, _VT.INT16, _VT.UINT32, _VT.INT32, _VT.UINT64, _VT.INT64}


def _value_kind(types: list[gguf.GGUFValueType]) -> str:
    """What a field holds, as a message says it: "string", "integer", "array of string", ..."""
    if not types:
        return "nothing"
    if types[0] == _VT.ARRAY:
        return "empty array" if len(types) == 1 else "array of " + _value_kind(types[1:])
    if types[0] in _INTEGER_TYPES:
        return "integer"
    return "float" if types[0] in (_VT.FLOAT32, _VT.FLOAT64) else types[0].name.lower()


def _field(reader: gguf.GGUFReader, path: Path, key: str, kind: str, default=None):
    """The value of `key`, checked to be of `kind` (see _value_kind), as llama.cpp checks it."""
    field = reader.get_field(key)
    if field is None:
        return default
    found = _value_kind(field.types)
    if found != kind and not (found == "empty array" and kind.startswith("array of")):
        raise EdgedistillError(f"{path}: {key} holds {found}, where llama.cpp expects {kind}", hint=DAMAGED_HINT)
    try:
        return field.contents()
    except UnicodeDecodeError as error:
        raise EdgedistillError(f"{path}: {key} is not valid UTF-8 ({error})", hint=DAMAGED_HINT) from None


def read_tokenizer_metadata(path: Path) -> GgufTokenizerMetadata:
    """The tokenizer metadata of the GGUF at `path`."""
    reader = open_gguf(path)
    model = _field(reader, path, "tokenizer.ggml.model", "string")
    if model is None:
        raise EdgedistillError(
            f"{path} has no tokenizer (no tokenizer.ggml.model key)",
            hint="use a GGUF converted with its tokenizer, or an HF folder",
        )
    architecture = _field(reader, path, "general.architecture", "string", "")
    pre = _field(reader, path, "tokenizer.ggml.pre", "string")
    known_pre = PRE_TOKENIZERS.get(pre)
    sentencepiece = model == "llama"
    scores_field = reader.get_field("tokenizer.ggml.scores")
    # llama.cpp takes float or integer scores, and byte-level BPE does not use them
    integer_scores = scores_field is not None and _value_kind(scores_field.types) == "array of integer"
    return GgufTokenizerMetadata(
        model=model,
        pre=pre,
        tokens=_field(reader, path, "tokenizer.ggml.tokens", "array of string", []),
        token_types=_field(reader, path, "tokenizer.ggml.token_type", "array of integer", []),
        merges=_field(reader, path, "tokenizer.ggml.merges", "array of string", []),
        scores=_field(reader, path, "tokenizer.ggml.scores", f"array of {'integer' if integer_scores else 'float'}", [])
        if sentencepiece else [],
        add_space_prefix=_field(reader, path, "tokenizer.ggml.add_space_prefix", "bool", True),
        bos_token_id=_field(reader, path, "tokenizer.ggml.bos_token_id", "integer", 1 if sentencepiece else None),
        eos_token_id=_field(reader, path, "tokenizer.ggml.eos_token_id", "integer", 2 if sentencepiece else None),
        pad_token_id=_field(reader, path, "tokenizer.ggml.padding_token_id", "integer"),
        unk_token_id=_field(reader, path, "tokenizer.ggml.unknown_token_id", "integer", 0 if sentencepiece else None),
        # llama.cpp's defaults when the keys are absent: bos on for SentencePiece and for some
        # pre-tokenizers (llama-bpe), eos off; SentencePiece's bos/eos/unk ids default to 1/2/0.
        add_bos=_field(
            reader,
            path,
            "tokenizer.ggml.add_bos_token",
            "bool",
            sentencepiece or (model == "gpt2" and known_pre is not None and known_pre.add_bos),
        ),
        add_eos=_field(reader, path, "tokenizer.ggml.add_eos_token", "bool", False),
        chat_template=_field(reader, path, "tokenizer.chat_template", "string"),
        context_length=_field(reader, path, f"{architecture}.context_length", "integer"),
    )


def _token(meta: GgufTokenizerMetadata, token_id: int | None, key: str, path: Path) -> str | None:
    if token_id is None:
        return None
    if not 0 <= token_id < len(meta.tokens):
        raise EdgedistillError(f"{path}: tokenizer.ggml.{key}={token_id} is not a token id")
    return meta.tokens[token_id]


def _bos_eos_post_processor(meta: GgufTokenizerMetadata, path: Path) -> processors.PostProcessor | None:
    """Add bos/eos around each sequence exactly when the GGUF says llama.cpp does; None if neither."""
    bos = _token(meta, meta.bos_token_id, "bos_token_id", path) if meta.add_bos else None
    eos = _token(meta, meta.eos_token_id, "eos_token_id", path) if meta.add_eos else None
    if bos is None and eos is None:
        return None

    def around(sequence: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in (bos, sequence, eos) if t is not None]

    single = around("$A", 0)
    return processors.TemplateProcessing(
        single=single,
        pair=single + around("$B", 1),
        special_tokens=[
            (token, token_id)
            for token, token_id in ((bos, meta.bos_token_id), (eos, meta.eos_token_id))
            if token is not None
        ],
    )


def _vocab(meta: GgufTokenizerMetadata, path: Path) -> dict[str, int]:
    vocab = {token: token_id for token_id, token in enumerate(meta.tokens)}
    if len(vocab) != len(meta.tokens):
        raise EdgedistillError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens", hint=DAMAGED_HINT)
    return vocab


def _byte_level_bpe(meta: GgufTokenizerMetadata, path: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to llama.cpp's byte-level BPE for this vocabulary (specials aside)."""
    if meta.pre not in PRE_TOKENIZERS:
        raise EdgedistillError(
            f"{path}: unknown pre-tokenizer tokenizer.ggml.pre={meta.pre!r}",
            hint=f"known ones: {', '.join(sorted(PRE_TOKENIZERS))}; add the matching split to "
            "PRE_TOKENIZERS in edgedistill/sources/gguf.py",
        )
    merges = [tuple(merge.split(" ", 1)) for merge in meta.merges]
    known_pre = PRE_TOKENIZERS[meta.pre]
    # Byte-level BPE covers every byte with its 256 base symbols: no unk token, no byte fallback.
    tokenizer = Tokenizer(
        models.BPE(
            vocab=_vocab(meta, path), merges=merges, byte_fallback=False, fuse_unk=False,
            ignore_merges=known_pre.ignore_merges,
        )
    )
    tokenizer.pre_tokenizer = known_pre.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(meta: GgufTokenizerMetadata, path: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to llama.cpp's SentencePiece tokenizer for this vocabulary (specials aside)."""
    if len(meta.scores) < len(meta.tokens):
        # without scores llama.cpp merges the leftmost pair first, which no ranked merge list does
        raise EdgedistillError(
            f"{path}: a SentencePiece vocabulary of {len(meta.tokens)} tokens with {len(meta.scores)} "
            "tokenizer.ggml.scores",
            hint="convert the model again with llama.cpp's convert_hf_to_gguf.py, which writes each token's score",
        )
    _vocab(meta, path)  # llama.cpp refuses duplicate tokens; a dict would silently keep the last
    return sentencepiece_bpe(
        meta.tokens, meta.scores, unk_token=_token(meta, meta.unk_token_id, "unknown_token_id", path),
        add_space_prefix=meta.add_space_prefix,
    )


def _add_specials(tokenizer: Tokenizer, meta: GgufTokenizerMetadata, path: Path) -> Tokenizer:
    """The tokens llama.cpp matches in raw text before tokenizing, and bos/eos where it adds them.

    Specials (CONTROL and UNKNOWN tokens, and the end-of-generation ones llama.cpp makes control) are
    matched in text only when asked (llama.cpp's parse_special, transformers' split_special_tokens
    off) and skipped when decoding with skip_special_tokens; USER_DEFINED ones are always matched.
    Both are matched in the raw text (normalized=False), as llama.cpp does.
    """
    special_types = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    added = []
    for token, token_type in zip(meta.tokens, meta.token_types):
        special = token_type in special_types or token in EOG_TEXTS
        if special or token_type == gguf.TokenType.USER_DEFINED:
            added.append(AddedToken(token, special=special, normalized=False))
    tokenizer.add_tokens(added)
    post_processor = _bos_eos_post_processor(meta, path)
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return tokenizer


def tokenizer_from_gguf(path: Path):
    """A `PreTrainedTokenizerFast` from the GGUF's metadata alone (no weights are read)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    meta = read_tokenizer_metadata(path)
    if meta.model not in TOKENIZER_MODELS:
        raise EdgedistillError(
            f"{path}: tokenizer.ggml.model={meta.model!r} is not supported",
            hint="supported: " + ", ".join(f"{name} ({kind})" for name, kind in TOKENIZER_MODELS.items()),
        )
    byte_level = meta.model == "gpt2"
    tokenizer = _byte_level_bpe(meta, path) if byte_level else _sentencepiece(meta, path)
    return PreTrainedTokenizerFast(
        tokenizer_object=_add_specials(tokenizer, meta, path),
        bos_token=_token(meta, meta.bos_token_id, "bos_token_id", path),
        eos_token=_token(meta, meta.eos_token_id, "eos_token_id", path),
        pad_token=_token(meta, meta.pad_token_id, "padding_token_id", path),
        unk_token=_token(meta, meta.unk_token_id, "unknown_token_id", path),
        chat_template=meta.chat_template,
        # Decoding is exact; the "cleanup" turns " ." into "." and breaks round trips, so it is on
        # only where llama.cpp does it too (never for SentencePiece).
        clean_up_tokenization_spaces=byte_level and PRE_TOKENIZERS[meta.pre].clean_spaces,
        # Ignored by PreTrainedTokenizerFast (the post-processor decides), but saved into
        # tokenizer_config.json, where gguf's SpecialVocab and other exporters read them.
        add_bos_token=meta.add_bos,
        add_eos_token=meta.add_eos,
        model_max_length=meta.context_length or int(1e30),
        # The default also returns token_type_ids, which decoder-only models reject in generate().
        model_input_names=["input_ids", "attention_mask"],
    )


@contextlib.contextmanager
def _transformers_gguf_loader(progress: bool) -> Iterator[None]:
    """Patch two things in transformers' GGUF loader for the duration of one load.

    Its tqdm bar has no switch, so `progress=False` replaces it with a disabled one. And it rebuilds
    gguf's TensorNameMap (pure in architecture and layer count) once per submodule, 397 times for
    SmolLM2, which is a third of the load time; a cache makes that once.
    """
    import tqdm.auto
    from transformers import modeling_gguf_pytorch_utils as loader

    original_tqdm, original_name_map = loader.tqdm, gguf.get_tensor_name_map
    if not progress:
        loader.tqdm = functools.partial(tqdm.auto.tqdm, disable=True)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        loader.tqdm, gguf.get_tensor_name_map = original_tqdm, original_name_map


def load_gguf_model(path: Path, *, progress: bool = True):
    """The GGUF's weights as a transformers causal LM: in float16 or bfloat16 when every weight matrix
    is stored so (F16, BF16), else dequantized to float32, which holds every quantized type exactly."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path)
    reader = open_gguf(path)
    architecture = _field(reader, path, "general.architecture", "string")
    if not reader.tensors:
        raise EdgedistillError(f"{path} holds no weights (a vocabulary-only GGUF)")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise EdgedistillError(
            f"{path}: transformers cannot load GGUF architecture {architecture!r}",
            hint=f"supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}; or convert the "
            "model to an HF folder another way",
        )
    # 1-D tensors (norms) are F32 in every GGUF; the matrices say what the model was stored in
    matrix_types = {tensor.tensor_type for tensor in reader.tensors if len(tensor.shape) > 1}
    kept = {gguf.GGMLQuantizationType.F16: torch.float16, gguf.GGMLQuantizationType.BF16: torch.bfloat16}
    dtype = kept.get(next(iter(matrix_types))) if len(matrix_types) == 1 else None
    if progress:
        how = f"as {str(dtype).removeprefix('torch.')}" if dtype else "dequantizing them to float32"
        print(f"loading {path.name}: {len(reader.tensors)} tensors, {how} ...", file=sys.stderr, flush=True)
    dequantize = gguf.dequantize

    def keep_f16(data, qtype):
        # transformers widens every tensor to a float32 copy before it casts: F16 stays F16 here, so
        # the load holds one copy of the weights (BF16 has no numpy type and still passes through float32)
        return data.view(np.float16) if qtype == gguf.GGMLQuantizationType.F16 else dequantize(data, qtype)

    if dtype == torch.float16:
        gguf.dequantize = keep_f16  # read by name when transformers loads the file
    try:
        with _transformers_gguf_loader(progress):
            return AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype or torch.float32, local_files_only=True
            )
    finally:
        gguf.dequantize = dequantize


def materialize_gguf(path: Path, out: Path, *, progress: bool = True) -> Path:
    """Write the GGUF at `path` as an HF folder into `out` (which exists and is empty)."""
    path = Path(path)
    model = load_gguf_model(path, progress=progress)
    tokenizer = tokenizer_from_gguf(path)
    meta = read_tokenizer_metadata(path)
    # The config transformers derives from the GGUF must agree with the tokenizer the GGUF runs:
    # generation stops on eos, and exporters copy these ids into every other format.
    for config in (model.config, model.generation_config):
        config.bos_token_id = meta.bos_token_id
        config.eos_token_id = meta.eos_token_id
        config.pad_token_id = meta.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    # The chat template goes into tokenizer_config.json, where older readers (onnxruntime-genai,
    # transformers < 4.52) look, rather than a separate chat_template.jinja.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    return out
