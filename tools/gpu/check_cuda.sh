#!/usr/bin/env bash
# The GPU checks in one go. On the GPU machine, from the repo root, with .whl and tools/gpu/tokenizer carried
# (made here by tools/gpu/prepare.sh):
#   bash tools/gpu/check_cuda.sh                  # all five parts, about 5-8 minutes on an H200
#   bash tools/gpu/check_cuda.sh bench tests      # some of: distill bench tests runtimes teacher
# Installs the carried wheels (transformers 4.57.6 and what it needs; the machine has 5.x) into /tmp/site, then
#   distill: tools/gpu/check_cuda.py, does `edgedistill run` train on CUDA             -> $OUT/cuda_check.json
#   bench:   tools/gpu/check_bench.py, bench of an HF folder on CUDA in fp32/fp16/bf16,
#            torch_decode (static cache + CUDA graph) against plain generate           -> $OUT/bench_check.json
#   tests:   the CUDA tests of tests/test_bench.py (they skip, with the reason, without a GPU) -> $OUT/tests.log
#   runtimes: tests/test_gpu_runtimes.py, GGUF in llama.cpp with every layer offloaded and ONNX with the
#            CUDA provider against the CPU; they run only where CUDA builds of llama-cpp-python and
#            onnxruntime-gpu / onnxruntime-genai-cuda are installed (README: GPU runtimes), else skip
#            with the reason, which gpu_check.json lists                                -> $OUT/runtimes.log
#   teacher: tools/gpu/check_teacher.py, the generate and logits stages with compute: auto (bf16 on CUDA)
#            on a bf16 teacher of the default's shape, logits against 2 CPU threads in float32
#            (target: 20x) and their top-k agreement                                   -> $OUT/teacher_check.json
# and prints one JSON of all parts ($OUT/gpu_check.json); each part's log is in $OUT. Exit 0 when every part ran ok.
set -uo pipefail
OUT=${OUT:-/tmp/cuda-check-out}
mkdir -p "$OUT"
parts=${*:-distill bench tests runtimes teacher}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; echo "wheel install failed: run tools/gpu/prepare.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

show_log() {  # the end of a failed part's log, progress bars left out
  echo "--- end of $1 (exit $2) ---"
  tr '\r' '\n' <"$1" | grep -v '%|' | tail -40
}
declare -A status
for part in $parts; do
  case $part in
    distill)
      timeout 170 python3 tools/gpu/check_cuda.py --runs /tmp/cuda-check-runs --json "$OUT/cuda_check.json" \
        >"$OUT/distill.log" 2>&1
      status[distill]=$?; [ "${status[distill]}" -ne 0 ] && show_log "$OUT/distill.log" "${status[distill]}" ;;
    bench)
      timeout 300 python3 tools/gpu/check_bench.py --json "$OUT/bench_check.json" >"$OUT/bench.log" 2>&1
      status[bench]=$?; [ "${status[bench]}" -ne 0 ] && show_log "$OUT/bench.log" "${status[bench]}" ;;
    tests)
      timeout 200 python3 -m pytest -q -rs tests/test_bench.py -k cuda >"$OUT/tests.log" 2>&1
      status[tests]=$?; [ "${status[tests]}" -ne 0 ] && show_log "$OUT/tests.log" "${status[tests]}" ;;
    runtimes)
      timeout 200 python3 -m pytest -q -rs tests/test_gpu_runtimes.py >"$OUT/runtimes.log" 2>&1
      status[runtimes]=$?; [ "${status[runtimes]}" -ne 0 ] && show_log "$OUT/runtimes.log" "${status[runtimes]}" ;;
    teacher)
      (cd tools/gpu && timeout 240 python3 check_teacher.py --json "$OUT/teacher_check.json") >"$OUT/teacher.log" 2>&1
      status[teacher]=$?; [ "${status[teacher]}" -ne 0 ] && show_log "$OUT/teacher.log" "${status[teacher]}" ;;
    *) echo "unknown part $part (distill, bench, tests, runtimes, teacher)"; exit 2 ;;
  esac
done

summary=""
for part in "${!status[@]}"; do summary+="$part=${status[$part]} "; done
python3 - "$OUT" $summary <<'EOF'
import json, sys
from pathlib import Path

out, report = Path(sys.argv[1]), {}
for item in sys.argv[2:]:
    part, code = item.split("=")
    entry = {"exit": int(code)}
    result = {"distill": "cuda_check.json", "bench": "bench_check.json", "teacher": "teacher_check.json"}.get(part)
    if result and (out / result).is_file():
        entry["result"] = json.loads((out / result).read_text())
    if part in ("tests", "runtimes"):
        lines = [l for l in (out / f"{part}.log").read_text().splitlines() if l.strip()]
        entry["summary"] = next((l for l in reversed(lines) if " in " in l and any(
            word in l for word in ("passed", "failed", "skipped", "error", "deselected"))), "")
        entry["skipped"] = [l for l in lines if l.startswith("SKIPPED")]
    report[part] = entry
report["ok"] = all(entry["exit"] == 0 for entry in report.values())
text = json.dumps(report, indent=2)
(out / "gpu_check.json").write_text(text + "\n")
print(text)
EOF
for code in "${status[@]}"; do [ "$code" -ne 0 ] && exit 1; done
exit 0
