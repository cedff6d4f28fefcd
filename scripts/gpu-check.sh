#!/usr/bin/env bash
# One command for a GPU machine (run from the repository root, after scripts/build-gpu-dist.sh
# here and with dist/ carried there): the GPU tests (every fixture's logits on the GPU against
# the CPU path), a 2B-4T-shaped model, and llama-bench's tests on the GPU. Prints one table
# last. Needs only the NVIDIA driver; NVRTC is the machine's own (set NVRTC_DIR to its lib
# folder if it is not on the library path).
set -uo pipefail
cd "$(dirname "$0")/.."
dist=${1:-dist}
export BITNETC_REPO_ROOT=$PWD
if [ -n "${NVRTC_DIR:-}" ]; then
  export LD_LIBRARY_PATH="$NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  # A CUDA toolkit's NVRTC, if the loader does not find one by itself.
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  # NVRTC 13 is named libnvrtc.so.13: give the loader the name it looks for.
  if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so '; then
    so=$(ls /usr/local/cuda/lib64/libnvrtc.so.1[0-9]* 2>/dev/null | head -1)
    if [ -n "$so" ]; then
      mkdir -p /tmp/bitnetc-nvrtc && ln -sf "$so" /tmp/bitnetc-nvrtc/libnvrtc.so
      export LD_LIBRARY_PATH="/tmp/bitnetc-nvrtc:$LD_LIBRARY_PATH"
    fi
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

status_tests=fail
if "$dist/cuda-tests" --nocapture --test-threads 1 2>&1 | tee /tmp/gpu-tests.log; then
  status_tests=pass
fi

model=/tmp/bitnetc-2b.gguf
[ -e "$model" ] || "$dist/bitnetc" gen-model --like bitnet-b1.58-2B-4T -o "$model"
"$dist/bitnetc" bench -m "$model" --device cuda -p 512 -n 128 -r 3 -o md 2>&1 | tee /tmp/gpu-bench.log
"$dist/bitnetc" bench -m "$model" -p 512 -n 32 -r 1 -t "$(nproc)" -o md 2>&1 | tail -2 | tee -a /tmp/gpu-bench.log

echo
echo "== bitnetc GPU check =="
echo "tests: $status_tests"
grep -E "max \|Δlogit\|" /tmp/gpu-tests.log || true
grep -E "^\| " /tmp/gpu-bench.log || true
