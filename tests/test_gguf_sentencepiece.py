"""A GGUF teacher with a SentencePiece vocabulary (`tokenizer.ggml.model` "llama": Llama 2, Mistral,
Gemma) becomes an HF folder whose tokenizer gives exactly llama.cpp's ids on the same file.

A SentencePiece BPE with byte fallback is trained here on the multilingual corpus of
tests/test_gguf_tokenizers.py in two layouts, and its pieces, scores and types go into a GGUF as
llama.cpp's converter writes them, beside the tiny random model of tests/conftest.py:
- Llama 2 / Mistral: <unk> 0, <s> 1, </s> 2, a "▁" before the text, an [INST] chat template;
- Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3, no "▁" before the text, <start_of_turn> and
  <end_of_turn> user-defined (llama.cpp makes <end_of_turn> a control token by its name), a control
  <start_of_image>, and Gemma's chat template; a gemma3 model.
The GGUF is materialized as the teacher stage does (`resolve_source` + `materialize`); llama.cpp
reads the same file's vocabulary only.

    .venv/bin/python -m pytest -q tests/test_gguf_sentencepiece.py
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import make_tiny_model
from test_gguf_tokenizers import ROUND_TRIP_TEXTS, SPM_CORPUS
from transformers import AutoTokenizer

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import write_gguf
from edgedistill.export.gguf.tokenizer import read_tokenizer
from edgedistill.runtimes.llamacpp import detokenize
from edgedistill.sources import materialize, resolve_source
from edgedistill.sources.gguf import tokenizer_from_gguf

llama_cpp = pytest.importorskip("llama_cpp")
spm = pytest.importorskip("sentencepiece")

# Besides the round-trip set: runs of spaces at either end, newlines, characters the vocabulary
# never saw (byte fallback), repeated characters (merges of equal pieces), the empty text.
PLAIN_TEXTS = (
    *ROUND_TRIP_TEXTS,
    "  two before, three after   ",
    " ",
    "\n",
    "line one\nline two\n\n\n  line five\r\n",
    "unseen: ☃ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ ﷽",
    "emoji 🦙🚀 and ZWJ 👩‍💻 at the end 🎉",
    "aaaaaaaa ........ ======== ----",
    "",
)

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }}"
    " [/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class Layout:
    """How one model family lays out its SentencePiece vocabulary and its GGUF keys."""

    model_type: str  # of the tiny model around the vocabulary
    trainer: dict  # sentencepiece trainer arguments: special ids and pieces, dummy prefix
    bos: str
    eos: str
    pad: str | None
    chat_template: str
    special_texts: tuple[str, ...]  # texts with special and user-defined tokens inside


LAYOUTS = {
    "llama": Layout(
        "llama", dict(add_dummy_prefix=True), "<s>", "</s>", None, LLAMA_TEMPLATE,
        ("<s>[INST] Bonjour 👋 [/INST] Salut !</s>", "glued<s>text</s>  spaced  <unk> end", "</s>"),
    ),
    "gemma": Layout(
        "gemma3_text",
        dict(add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
             bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
             control_symbols=["<start_of_image>"]),
        "<bos>", "<eos>", "<pad>", GEMMA_TEMPLATE,
        ("<bos><start_of_turn>user\nBonjour 👋<end_of_turn>\n<start_of_turn>model\n",
         "glued<start_of_turn>text<end_of_turn>  spaced  <start_of_image> <unk><pad>end", "<end_of_turn>"),
    ),
}


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    scores: list[float]
    types: list[int]  # SentencePiece's piece types are numbered as GGUF's token types


def _train(layout: Layout) -> Vocabulary:
    from sentencepiece import sentencepiece_model_pb2

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 20), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", character_coverage=1.0, split_digits=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2, **layout.trainer,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return Vocabulary([p.piece for p in proto.pieces], [p.score for p in proto.pieces],
                      [int(p.type) for p in proto.pieces])


def _with_vocabulary(source: Path, out: Path, vocab: Vocabulary, layout: Layout) -> Path:
    """A copy of the GGUF `source` (metadata and tensors) with `vocab` as its SentencePiece tokenizer,
    written with the keys llama.cpp's convert_hf_to_gguf.py writes."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, arch=reader.get_field("general.architecture").contents())
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "tokenizer.")) or name == "general.architecture":
            continue
        kind = field.types[0]
        writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY
                             else None)
    token_id = vocab.tokens.index
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(token_id(layout.bos))
    writer.add_eos_token_id(token_id(layout.eos))
    writer.add_unk_token_id(token_id("<unk>"))
    if layout.pad is not None:
        writer.add_pad_token_id(token_id(layout.pad))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(layout.trainer["add_dummy_prefix"])
    writer.add_chat_template(layout.chat_template)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def teacher(request, tmp_path_factory):
    """(layout name, vocabulary, GGUF path, materialized HF folder, llama.cpp on the GGUF's vocabulary)."""
    layout = LAYOUTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    vocab = _train(layout)
    # gemma3 at transformers' default head_dim and query scale (256): its GGUF loader takes the
    # default scale whatever the file's head size
    hf_dir = make_tiny_model(tmp / "weights", model_type=layout.model_type, vocab_size=len(vocab.tokens))
    gguf_file = _with_vocabulary(write_gguf(hf_dir, tmp / "weights.gguf"), tmp / "teacher.gguf", vocab, layout)
    folder = materialize(resolve_source(str(gguf_file)), tmp / "teacher", progress=False)
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    return request.param, vocab, gguf_file, folder, llm


@pytest.mark.integration
def test_plain_text_gives_llama_cpp_ids_and_round_trips(teacher):
    _, vocab, _, folder, llm = teacher
    hf = AutoTokenizer.from_pretrained(folder)
    for text in PLAIN_TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=False), text
        assert hf.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text
        assert hf.decode(ids) == text, text
        assert detokenize(llm, ids) == text, text
    # 🦙 is not in the training text: its four UTF-8 bytes come from byte fallback
    byte_ids = {i for i, kind in enumerate(vocab.types) if kind == gguf.TokenType.BYTE}
    assert len(byte_ids) == 256
    assert [i in byte_ids for i in hf.encode("🦙", add_special_tokens=False)][-4:] == [True] * 4


@pytest.mark.integration
def test_special_tokens_in_text_as_llama_cpp_parses_them(teacher):
    name, _, _, folder, llm = teacher
    hf = AutoTokenizer.from_pretrained(folder)
    for text in LAYOUTS[name].special_texts:
        # llama.cpp's parse_special is transformers' matching of special tokens (split_special_tokens off)
        assert hf.encode(text, add_special_tokens=False) == llm.tokenize(text.encode(), add_bos=False, special=True)
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == llm.tokenize(
            text.encode(), add_bos=False, special=False), text
        if name == "gemma":  # with "▁" before the text, transformers strips only the very first space
            ids = hf.encode(text, add_special_tokens=False)
            assert hf.decode(ids, skip_special_tokens=True) == detokenize(llm, ids), text


@pytest.mark.integration
def test_chat_template_and_special_ids_are_the_ggufs(teacher):
    name, vocab, gguf_file, folder, llm = teacher
    layout = LAYOUTS[name]
    assert not (folder / "tokenizer.model").exists()
    assert (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == layout.chat_template and config["add_bos_token"] is True
    hf = AutoTokenizer.from_pretrained(folder)
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == (layout.bos, layout.eos, layout.pad, "<unk>")
    assert (hf.bos_token_id, hf.eos_token_id) == (llm.token_bos(), llm.token_eos())
    assert hf.bos_token_id == vocab.tokens.index(layout.bos) and hf.unk_token_id == vocab.tokens.index("<unk>")
    model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert (model_config["bos_token_id"], model_config["eos_token_id"]) == (hf.bos_token_id, hf.eos_token_id)

    messages = [{"role": "user", "content": "Bonjour, ça va ?"}, {"role": "assistant", "content": "Oui 🙂"},
                {"role": "user", "content": "Et toi ?"}]
    prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(layout.bos) and "Et toi ?" in prompt
    # the rendered prompt holds its bos: tokenized without adding another, as llama.cpp's server does
    assert hf.encode(prompt, add_special_tokens=False) == llm.tokenize(prompt.encode(), add_bos=False, special=True)
    if name == "gemma":
        assert hf.convert_ids_to_tokens(hf.encode(prompt, add_special_tokens=False))[:2] == [
            "<bos>", "<start_of_turn>"]


@pytest.mark.integration
def test_the_folder_exports_back_to_the_same_llama_cpp_tokenization(teacher, tmp_path):
    # a student keeps its teacher's tokenizer: exported to GGUF it must tokenize as the teacher's GGUF
    name, _, _, folder, llm = teacher
    meta = read_tokenizer(folder)
    assert meta.model == "llama" and meta.add_space_prefix == (name == "llama")
    exported = llama_cpp.Llama(model_path=str(write_gguf(folder, tmp_path / "student.gguf")), vocab_only=True,
                               verbose=False)
    for text in (*PLAIN_TEXTS, *LAYOUTS[name].special_texts):
        for special in (False, True):
            assert exported.tokenize(text.encode(), add_bos=True, special=special) == llm.tokenize(
                text.encode(), add_bos=True, special=special), text


def _vocabulary_only_gguf(path: Path, model: str, *, scores: bool = True) -> Path:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), "▁", "a", "▁a"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, *[gguf.TokenType.BYTE] * 256,
             *[gguf.TokenType.NORMAL] * 3]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores:
        writer.add_token_scores([0.0] * 259 + [-1.0, -2.0, -3.0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.unit
def test_a_vocabulary_only_sentencepiece_gguf_takes_llama_cpp_defaults(tmp_path):
    # no bos/eos/unk ids, no add_bos, no add_space_prefix: llama.cpp's SentencePiece defaults
    tokenizer = tokenizer_from_gguf(_vocabulary_only_gguf(tmp_path / "spm.gguf", "llama"))
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    ids = tokenizer.encode("a a")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "▁a", "▁a"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a a"


@pytest.mark.unit
def test_unknown_tokenizer_model_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(EdgedistillError, match="tokenizer.ggml.model='rwkv'") as error:
        tokenizer_from_gguf(_vocabulary_only_gguf(tmp_path / "rwkv.gguf", "rwkv"))
    assert "gpt2" in error.value.hint and "llama" in error.value.hint and "SentencePiece" in error.value.hint


@pytest.mark.unit
def test_sentencepiece_gguf_without_scores_is_refused(tmp_path):
    with pytest.raises(EdgedistillError, match="tokenizer.ggml.scores") as error:
        tokenizer_from_gguf(_vocabulary_only_gguf(tmp_path / "spm.gguf", "llama", scores=False))
    assert "convert_hf_to_gguf" in error.value.hint
