"""SentencePiece GGUF vocabularies (`tokenizer.ggml.model` "llama": Llama 2, Mistral, Gemma) as `tokenizers` BPE.

    python -c "from edgedistill.sources.gguf import tokenizer_from_gguf; print(tokenizer_from_gguf('gemma.gguf'))"

What llama.cpp runs for such a file (llm_tokenizer_spm_session and tokenize in llama-vocab.cpp):
spaces become "▁"; one "▁" goes before each stretch of text that opens the input or follows a
special token, when `tokenizer.ggml.add_space_prefix` says so (its default is true); the text is
split into UTF-8 characters, then the adjacent pair whose concatenation is a token with the highest
`tokenizer.ggml.scores` entry is merged (the leftmost one on a tie), again and again; a symbol
that is not a token at the end is written as its <0xXX> byte tokens.

A `tokenizers` BPE takes the same walk when its merges are ranked by the score of the token each
makes: every split of a token into two tokens is a merge, the highest score first (what
transformers' LlamaConverter derives from a tokenizer.model too). A Unigram model over the same
scores does not: it picks the segmentation with the best total score, not the greedy merges.
Measured against llama.cpp (llama-cpp-python 0.3.36) on the SentencePiece vocabularies llama.cpp
tests itself with (Llama 2, Phi-3, Baichuan: 32,000 to 64,000 tokens), 11,719 texts each (llama.cpp's
test texts, the multilingual round-trip set, random snippets, runs of repeated characters): the
BPE gave llama.cpp's ids on every text; the Unigram model differed on about half (1,701 of 3,065
for Llama 2, "Hello world" among them).

What a ranked merge list cannot express: two different merges making tokens of equal score, both
possible at once (llama.cpp takes the leftmost, BPE the lower rank). SentencePiece gives nearly
every merged piece a score of its own, so this needs a repeated character ("aaa" from "a"+"aa" or
"aa"+"a") or a vocabulary with tied scores; ties are ranked by token id, then by the left part's
length, shortest first (ranking them by the parts' ids, or longest first, measured the same).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers

SPACE = "▁"  # what SentencePiece and llama.cpp write for " "


def merges_by_score(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation and both halves are tokens, the best-scored result first."""
    token_ids = {token: token_id for token_id, token in enumerate(tokens)}
    ranked = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in token_ids and right in token_ids:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe(tokens: list[str], scores: list[float], *, unk_token: str | None,
                      add_space_prefix: bool) -> Tokenizer:
    """The vocabulary as a byte-fallback BPE that merges as llama.cpp's SPM tokenizer does.

    The special and user-defined tokens, and bos/eos around a sequence, are the caller's to add.
    """
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges_by_score(tokens, scores), unk_token=unk_token, byte_fallback=True,
                   fuse_unk=False)
    )
    # No pre-tokenizer: llama.cpp merges across the whole stretch of text, spaces included. The
    # normalizer runs on each stretch between added tokens, so Prepend puts "▁" exactly where
    # llama.cpp does (the start, and after every special or user-defined token).
    escape = normalizers.Replace(" ", SPACE)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), escape]) if add_space_prefix else escape
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    # the "▁" put before the text is not part of it
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    return tokenizer
