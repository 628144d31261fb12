"""Tokenizer round trip: the HF tokenizer and llama.cpp's, reading the exported GGUF, give the same ids.

One fixed multilingual text set (code, emoji, accents, CJK, other scripts, whitespace runs) runs
through every kind of vocabulary the GGUF writer handles:
- byte-level BPE: the embedded teacher's own 49,152-token SmolLM2 tokenizer, and vocabularies
  trained here behind Qwen2's and Llama 3's split regexes;
- SentencePiece BPE with byte fallback, trained here with the `sentencepiece` library and converted
  by transformers, as Llama 2 / Mistral (a "▁" before the text; both of transformers' layouts)
  and Gemma (no "▁" before the text) tokenizers are.
Each vocabulary goes into the tiny random llama of tests/conftest.py (only the tokenizer matters)
written as GGUF; llama.cpp
loads the vocabulary only.

    .venv/bin/python -m pytest -q tests/test_gguf_tokenizers.py
"""

from __future__ import annotations

import io

import gguf
import pytest
from conftest import make_tiny_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import write_gguf
from edgedistill.export.gguf.tokenizer import LLAMA3_REGEX, QWEN2_REGEX, read_tokenizer
from edgedistill.runtimes.llamacpp import detokenize
from edgedistill.sources.builtin import builtin_gguf_path
from edgedistill.sources.gguf import tokenizer_from_gguf

llama_cpp = pytest.importorskip("llama_cpp")
spm = pytest.importorskip("sentencepiece")

ROUND_TRIP_TEXTS = (
    "Hello world",
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # πr²\n",
    "if (x != y && z >= 0) { printf(\"%d\\n\", x); }",
    "emoji 🚀🎉 family 👨‍👩‍👧 thumbs 👍🏽 flag 🇫🇷",
    "café naïve Zürich Ærø façade crème brûlée",
    "combining: cafe\u0301 vs café",
    "中文：我们今天去北京。日本語のテキストです。한국어 문장입니다.",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "spaces   runs  \n\n\tand\ttabs    end  ",
    "   leading spaces",
    "trailing newline\n",
    "digits 1234567890 and 2024-11-05, 3.5%",
)

# Training text for the SentencePiece model: enough of each script that it learns pieces, while
# characters outside it (most emoji, Greek, Arabic) exercise the byte fallback.
SPM_CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog. def return float print if else",
    "café naïve Zürich façade crème brûlée résumé über straße",
    "我们今天去北京。这是中文的句子。日本語のテキストです。東京に行きます。",
    "한국어 문장입니다. 안녕하세요 세계",
    "Привет, мир! Это русский текст для обучения.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and code: x = y + 1; z = f(x) * 2",
    "    indented    code\n\tand tabs\n\n  and   gaps",
]


def _round_trip(hf_dir, gguf_file, texts=ROUND_TRIP_TEXTS, *, decoded=True):
    hf = AutoTokenizer.from_pretrained(hf_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    for text in texts:
        want = hf.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
        if decoded:  # a tokenizer that cleans up spaces does not give the text back
            assert hf.decode(want) == text, "the HF tokenizer itself must round-trip"
            assert detokenize(llm, want) in (text, " " + text), text
    return hf, llm


@pytest.mark.integration
def test_byte_level_bpe_of_the_embedded_teacher(tmp_path):
    make_tiny_model(tmp_path, tokenizer=tokenizer_from_gguf(builtin_gguf_path("smollm2-135m-instruct")),
                    vocab_size=49152)
    out = write_gguf(tmp_path, tmp_path / "smollm2-vocab.gguf")
    hf, llm = _round_trip(tmp_path, out)
    # special tokens are matched on raw text when asked to
    chat = "<|im_start|>user\nBonjour 👋<|im_end|>\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf.encode(chat, add_special_tokens=False)


@pytest.mark.parametrize("layout", ["qwen2", "llama-bpe"])
@pytest.mark.integration
def test_byte_level_bpe_with_a_split_regex(tmp_path, layout):
    # Qwen2/2.5/3 and Llama 3 split text with a regex before byte-level BPE; llama.cpp has each
    # regex built in under a pre-tokenizer name. A vocabulary trained here on the multilingual
    # corpus, with digits, contractions and runs of spaces that the two regexes split differently.
    llama3 = layout == "llama-bpe"
    # as the real ones are: Llama 3 takes whole-word tokens before merging and cleans up spaces
    # when decoding (llama.cpp does both for "llama-bpe"); Qwen does neither
    tokenizer = Tokenizer(models.BPE(ignore_merges=llama3))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX if llama3 else QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = SPM_CORPUS + ["I'm sure they'll say it's 12345 or 2024, we've 987654 left", "x  =  1\n\n\n  y"]
    tokenizer.train_from_iterator(corpus * 5, trainer)
    make_tiny_model(tmp_path, tokenizer=PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=llama3), vocab_size=tokenizer.get_vocab_size())
    assert read_tokenizer(tmp_path).pre == layout
    texts = (*ROUND_TRIP_TEXTS, "I'M SURE THEY'LL: it's 1234567 and 3.14159", "we've  got   20000\n\n\n  items")
    hf, llm = _round_trip(tmp_path, write_gguf(tmp_path, tmp_path / "vocab.gguf"), texts, decoded=not llama3)
    for text in texts:  # decoded as the HF tokenizer decodes, spaces cleaned up or not
        assert detokenize(llm, hf.encode(text, add_special_tokens=False)) == hf.decode(hf.encode(text)), text


def _sentencepiece_model(tmp_path, *, dummy_prefix: bool) -> str:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 20), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", character_coverage=1.0, split_digits=True,
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.mark.parametrize("layout", ["llama_legacy", "llama_metaspace", "gemma_no_prefix"])
@pytest.mark.integration
def test_sentencepiece_bpe(tmp_path, layout):
    model_file = _sentencepiece_model(tmp_path, dummy_prefix=layout != "gemma_no_prefix")
    hf_dir = tmp_path / "hf"
    # legacy=True: normalizer Prepend("▁") + Replace(" ", "▁"); legacy=False: a Metaspace pre-tokenizer
    tokenizer = LlamaTokenizerFast(vocab_file=model_file, legacy=layout != "llama_metaspace",
                                   add_prefix_space=layout != "gemma_no_prefix", from_slow=True)
    make_tiny_model(hf_dir, tokenizer=tokenizer)
    out = write_gguf(hf_dir, tmp_path / "spm.gguf")

    meta = read_tokenizer(hf_dir)
    assert meta.model == "llama" and meta.add_space_prefix == (layout != "gemma_no_prefix")
    texts = ROUND_TRIP_TEXTS
    if layout == "llama_metaspace":
        # Metaspace puts no "▁" before text that starts with a space; llama.cpp always does (the
        # known difference of this layout, reported by verify-export when it matters)
        texts = [t for t in texts if not t.startswith(" ")]
        hf = AutoTokenizer.from_pretrained(hf_dir)
        llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
        text = "   leading spaces"
        assert llm.tokenize(text.encode(), add_bos=False) == hf.encode(" " + text, add_special_tokens=False)
    hf, llm = _round_trip(hf_dir, out, texts)
    byte_ids = {i for i, t in enumerate(meta.tokens) if t.startswith("<0x")}
    # 🚀 is not in the training text: its four UTF-8 bytes come from byte fallback
    assert sum(i in byte_ids for i in hf.encode("🚀", add_special_tokens=False)) == 4

    reader = gguf.GGUFReader(out)
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert {types[i] for i in byte_ids} == {gguf.TokenType.BYTE}
    assert types[hf.unk_token_id] == gguf.TokenType.UNKNOWN
    assert reader.get_field("tokenizer.ggml.pre") is None
    # BOS as the HF tokenizer adds it
    text = "Hello world"
    assert llm.tokenize(text.encode(), add_bos=True) == hf.encode(text)


@pytest.mark.unit
def test_sentencepiece_with_a_normalizer_llama_cpp_lacks_is_refused(tmp_path):
    model_file = _sentencepiece_model(tmp_path, dummy_prefix=True)
    tokenizer = LlamaTokenizerFast(vocab_file=model_file, legacy=True, from_slow=True)
    tokenizer.save_pretrained(tmp_path)
    tokenizer_json = tmp_path / "tokenizer.json"
    text = tokenizer_json.read_text(encoding="utf-8")
    tokenizer_json.write_text(text.replace('"normalizer": {', '"normalizer": {"type": "NFKC"}, "unused": {', 1),
                              encoding="utf-8")
    with pytest.raises(EdgedistillError, match="NFKC"):
        read_tokenizer(tmp_path)
