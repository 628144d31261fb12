"""The test tiers, and the one tiny random model every test that needs an HF folder builds.

Every test carries exactly one tier marker (collection fails otherwise):
- unit: no subprocess, no model file on disk, no network, no llama.cpp or ONNX Runtime session;
  the whole tier runs in well under a minute on 2 cores;
- integration: tiny models through llama.cpp, ONNX Runtime, the pipeline, subprocesses, loopback servers;
- slow: the real embedded teacher or the default recipe (minutes; off unless asked for).

    .venv/bin/python -m pytest -q                    # unit + integration
    .venv/bin/python -m pytest -q -m unit            # the fast tier
    .venv/bin/python -m pytest -q -m slow            # the real teacher

The tiny model: `make_tiny_model(out_dir, **config_overrides)` writes an HF folder (safetensors
weights, a byte-level BPE tokenizer trained here with ChatML specials and template) from one set of
shape constants, TINY_SHAPE; `build_tiny_model(**config_overrides)` is the same model in memory. The
session fixtures `tiny_llama_dir` (tied head) and `tiny_llama_untied_dir` (own head, vocabulary
padded to 512 rows) build the two common folders once per session; treat them as read-only.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

TIERS = ("unit", "integration", "slow")

# 2 layers, width 64, 4 query heads in 2 KV groups (head_dim 16), MLP 128. Weights this large
# (initializer_range 0.2) make attention position-sensitive, so a wrong rotary layout shows in the logits.
TINY_SHAPE = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
TOKENIZER_VOCAB_SIZE = 450
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_teacher_recipe(*, name: str, prompt: str, data: str, generate: str) -> str:
    """Recipe YAML for the tests that run stages on a random 2-layer teacher with SmolLM2's tokenizer:
    sentiment labels, a 1-block pruned student; `data` and `generate` are YAML flow mappings."""
    return f"""
name: {name}
seed: 0
teacher: {{source: random, tokenizer: smollm2-135m-instruct,
          random: {{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
                   intermediate_size: 128}}}}
task:
  labels: [positive, negative]
  prompt: {json.dumps(prompt)}
data: {data}
generate: {generate}
student: {{method: prune, keep_layers: 1}}
"""


def student_recipe(train_jsonl: Path, **student):
    """A minimal label recipe over `train_jsonl` with these student fields (build_student's tests)."""
    from edgedistill.recipe import Recipe

    return Recipe.model_validate({
        "name": "t", "task": {"labels": ["a", "b"], "prompt": "{text}"},
        "data": {"prompts": str(train_jsonl)}, "student": student})


def tokenizer_corpus() -> list[str]:
    """The text the tiny tokenizer is trained on: 196 two-syllable words (accents included), digits,
    whitespace runs and emoji."""
    syllables = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "de", "va", "qu", "zé", "ñu", "ør"]
    words = ["".join(pair) for pair in itertools.product(syllables, repeat=2)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    extras = ["numbers 0 1 2 3 4 5 6 7 8 9 10 42 314", "  indented\n\tlines\n\n  and   gaps", "rocket 🚀 party 🎉"]
    return lines + extras


def make_tiny_tokenizer(out_dir: Path | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE with single-digit splitting (GGUF pre-tokenizer "smollm"), ChatML specials
    (ids 0-2) and template; saved in `out_dir` when given."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=CHATML,
    )
    if out_dir is not None:
        hf_tokenizer.save_pretrained(out_dir)
    return hf_tokenizer


def tiny_config(model_type: str = "llama", **overrides) -> PretrainedConfig:
    """TINY_SHAPE with `overrides`, as the config class of `model_type` (llama, mistral, qwen2, qwen3,
    gemma3_text, gpt2, ...); the vocabulary defaults to the tiny tokenizer's size."""
    overrides.setdefault("vocab_size", len(make_tiny_tokenizer()))
    return AutoConfig.for_model(model_type, **{**TINY_SHAPE, **overrides})


def build_tiny_model(*, seed: int = 0, jitter_norms: bool = False,
                     edit: Callable[[PreTrainedModel], None] | None = None, **config_overrides) -> PreTrainedModel:
    """The tiny random model in memory, float32, in eval mode, every weight exactly a float16 value
    (F16 exports store float16: rounding here leaves only the runtimes' arithmetic to compare).

    jitter_norms: add noise to norm weights and biases (initialized to constants), so that a wrong
    norm transform, a swapped norm or a misplaced bias shows in the logits.
    edit: called on the model (under no_grad) after initialization, to shape particular weights.
    """
    config = tiny_config(**config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if jitter_norms and ("norm" in name or name.endswith(".bias")):
                param.add_(0.2 * torch.randn_like(param))
            param.copy_(param.half().float())
        if edit is not None:
            edit(model)
    return model


def make_tiny_model(out_dir: Path, *, tokenizer: PreTrainedTokenizerFast | None = None,
                    tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE, dtype: torch.dtype = torch.float32,
                    **model_args) -> Path:
    """An HF folder in `out_dir`: model.safetensors and config.json of `build_tiny_model(**model_args)`
    (stored in `dtype`), and `tokenizer` or else the tiny BPE tokenizer; the vocabulary is the
    tokenizer's size unless `vocab_size` is given (a larger one pads the embedding)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = make_tiny_tokenizer(vocab_size=tokenizer_vocab_size)
    tokenizer.save_pretrained(out_dir)
    model_args.setdefault("vocab_size", len(tokenizer))
    build_tiny_model(**model_args).to(dtype).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The default tiny llama (tied head) as an HF folder, built once per session. Read-only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory) -> Path:
    """The tiny llama with an output matrix of its own and 512 vocabulary rows (more than the
    tokenizer's), built once per session. Read-only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-untied"), tie_word_embeddings=False, vocab_size=512)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: an untiered test fails every selection
def pytest_collection_modifyitems(config, items):
    """Every test has exactly one tier: a new test cannot go untiered."""
    problems = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: {'no tier marker' if not tiers else 'tiers ' + ', '.join(tiers)}")
    if problems:
        raise pytest.UsageError(
            "every test needs exactly one of the markers " + ", ".join(TIERS) + " (see tests/conftest.py):\n  "
            + "\n  ".join(problems))
