"""A GGUF teacher with a Qwen2 or Llama 3 vocabulary: the tokenizer the teacher stage rebuilds from the
GGUF's metadata gives exactly llama.cpp's ids.

A byte-level BPE vocabulary is trained behind each family's tokenizer.json split regex, exported
with the tiny random llama of tests/conftest.py to GGUF, then materialized as a teacher source
(`resolve_source` + `materialize`, as the teacher stage does: weights through transformers, the
tokenizer from `tokenizer.ggml.*`); llama.cpp reads the same GGUF's vocabulary only.

    .venv/bin/python -m pytest -q tests/test_gguf_source_pretok.py
"""

from __future__ import annotations

import pytest
from conftest import make_tiny_model
from test_gguf_tokenizers import ROUND_TRIP_TEXTS, SPM_CORPUS
from test_sources import _write_tiny_gguf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from edgedistill.errors import EdgedistillError
from edgedistill.export.gguf import write_gguf
from edgedistill.export.gguf.tokenizer import LLAMA3_REGEX, QWEN2_REGEX
from edgedistill.sources import materialize, resolve_source
from edgedistill.sources.gguf import PRE_TOKENIZERS, tokenizer_from_gguf

llama_cpp = pytest.importorskip("llama_cpp")

# Besides the round-trip set: contractions in capitals, digit runs the two regexes group differently,
# whitespace runs, and "'ſt" (long s), where the tokenizer.json regex's (?i:'s) splits "'ſ" from "t"
# and llama.cpp's ASCII '[sS] does not (the vocabulary is trained to merge "ſt").
TEXTS = (*ROUND_TRIP_TEXTS, "I'M SURE THEY'LL: it's 1234567 and 3.14159", "we've  got   20000\n\n\n  items",
         "it'ſt the long s, IT'S 'ſtill")


def _hf_vocabulary(split_regex: str, *, ignore_merges: bool) -> Tokenizer:
    """A small byte-level BPE trained behind a tokenizer.json split regex (Qwen2's or Llama 3's layout)."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = SPM_CORPUS + ["I'm sure they'll say it's 12345 or 2024, we've 987654 left", "x  =  1\n\n\n  y",
                           "the long s: it'ſt moſt, 'ſtill"]
    tokenizer.train_from_iterator(corpus * 5, trainer)
    return tokenizer


@pytest.mark.parametrize("layout", ["qwen2", "llama-bpe"])
@pytest.mark.integration
def test_gguf_teacher_tokenizer_matches_llama_cpp(tmp_path, layout):
    llama3 = layout == "llama-bpe"
    vocabulary = _hf_vocabulary(LLAMA3_REGEX if llama3 else QWEN2_REGEX, ignore_merges=llama3)
    hf_dir = tmp_path / "hf"
    make_tiny_model(hf_dir, tokenizer=PreTrainedTokenizerFast(
        tokenizer_object=vocabulary, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=llama3), vocab_size=vocabulary.get_vocab_size())
    gguf_file = write_gguf(hf_dir, tmp_path / "teacher.gguf")

    teacher_dir = materialize(resolve_source(str(gguf_file)), tmp_path / "teacher", progress=False)
    teacher = AutoTokenizer.from_pretrained(teacher_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    assert teacher.clean_up_tokenization_spaces == PRE_TOKENIZERS[layout].clean_spaces
    for text in TEXTS:
        ids = teacher.encode(text, add_special_tokens=False)
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=False), text
        # with the specials llama.cpp adds (bos when the GGUF says so) and parses in text
        chat = f"<|im_start|>user\n{text}<|im_end|>\n"
        assert teacher.encode(chat) == llm.tokenize(chat.encode(), add_bos=True, special=True), text
        assert teacher.decode(ids) == (teacher.clean_up_tokenization(text) if llama3 else text), text


@pytest.mark.unit
def test_unknown_pre_tokenizer_is_named_with_the_known_ones(tmp_path):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", pre="tekken", add_bos=False)
    with pytest.raises(EdgedistillError, match="tokenizer.ggml.pre='tekken'") as error:
        tokenizer_from_gguf(path)
    for known in ("smollm", "gpt2", "llama-bpe", "qwen2"):
        assert known in error.value.hint
