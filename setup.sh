#!/usr/bin/env bash
# Sets up edgedistill in ./.venv on a fresh clone; safe to run again (then it takes seconds).
#   bash setup.sh && .venv/bin/edgedistill run
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

# The CPU build of torch that lies on this machine; a range in pyproject.toml keeps it.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0"

# llama.cpp is compiled for this CPU, but without its AMX kernels: llama-cpp-python 0.3.36's
# ggml_backend_amx_mul_mat segfaults on the AMX-capable Xeons here. pip's own wheel cache ignores
# build flags, so the wheel is built once into a cache folder keyed by version, flags and CPU.
LLAMA_VERSION=0.3.36
LLAMA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cpu_key=$( (uname -m; grep -m1 '^flags' /proc/cpuinfo || true; echo "$LLAMA_VERSION $LLAMA_FLAGS") | sha256sum | cut -c1-16)
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/edgedistill/wheels/llama-cpp-$cpu_key"
marker=.venv/.llama-cpp-$cpu_key
if [ ! -f "$marker" ]; then
  if ! ls "$wheel_dir"/llama_cpp_python-$LLAMA_VERSION-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_VERSION for this CPU (about 6 minutes on 2 cores, once)"
    mkdir -p "$wheel_dir"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$LLAMA_FLAGS' -DCMAKE_CXX_FLAGS='$LLAMA_FLAGS'" \
      "${PIP[@]}" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$wheel_dir" \
      "llama-cpp-python==$LLAMA_VERSION"
  fi
  "${PIP[@]}" install --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-$LLAMA_VERSION-*.whl
  touch "$marker"
fi

"${PIP[@]}" install -e ".[test]"

# tests/test_report.py opens report.html in a real headless browser: Debian's chromium (about
# 15 seconds to install, once; the test skips with how to install it where this cannot).
if [ ! -x /usr/bin/chromium ]; then
  apt_log=$(mktemp)
  if command -v apt-get >/dev/null 2>&1 && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
       apt-get install -y -qq --no-install-recommends chromium; } >"$apt_log" 2>&1; then
    echo "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium) for the report's browser test"
  else
    tail -n 3 "$apt_log" >&2
    echo "warning: could not install chromium, so the report's browser test will skip;" \
         "install it with: apt-get install -y --no-install-recommends chromium" >&2
  fi
  rm -f "$apt_log"
fi
