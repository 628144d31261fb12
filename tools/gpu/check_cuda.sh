#!/usr/bin/env bash
# On the GPU machine, from the repo root, with .whl and tools/gpu/tokenizer carried (see tools/gpu/check_cuda.py):
#   bash tools/gpu/check_cuda.sh
# Installs the carried wheels (transformers 4.57.6 and what it needs; the machine has 5.x) into
# /tmp/site, runs the check and leaves cuda_check.json and check.log in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/cuda-check-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The pipeline's progress bars go to the log; only the JSON is printed.
timeout 170 python3 tools/gpu/check_cuda.py --runs /tmp/cuda-check-runs --json "$OUT/cuda_check.json" >"$OUT/check.log" 2>&1
status=$?
if [ ! -s "$OUT/cuda_check.json" ] || [ $status -ne 0 ]; then
  echo "--- end of check.log (exit $status) ---"
  tr '\r' '\n' <"$OUT/check.log" | grep -v '%|' | tail -60
fi
[ -s "$OUT/cuda_check.json" ] && cat "$OUT/cuda_check.json"
exit $status
