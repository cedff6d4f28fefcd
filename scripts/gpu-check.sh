#!/usr/bin/env bash
# One command for a GPU machine (run from the repository root, after scripts/build-gpu-dist.sh
# here and with dist/ carried there): the GPU tests (every fixture's logits on the GPU against
# the CPU path), a plan compiled ahead with `--target cuda` run with no NVRTC on the library
# path, a 2B-4T-shaped model, and llama-bench's tests on the GPU and the CPU. Prints one table
# last. Needs only the NVIDIA driver; NVRTC is the machine's own (set NVRTC_DIR to its lib
# folder if it is not on the library path). Logs go to LOG_DIR (second argument).
set -uo pipefail
cd "$(dirname "$0")/.."
dist=${1:-dist}
logs=${2:-/tmp/bitnetc-gpu}
mkdir -p "$logs"
export BITNETC_REPO_ROOT=$PWD
# The test binary was built elsewhere: its snapshots are the ones of this checkout.
export INSTA_WORKSPACE_ROOT=$PWD INSTA_UPDATE=no
plain_path=${LD_LIBRARY_PATH:-}
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
echo "NVRTC: $(ls /usr/local/cuda/lib64/libnvrtc.so.* 2>/dev/null | tr '\n' ' ')"

status_tests=fail
if timeout 150 "$dist/cuda-tests" --nocapture --test-threads 1 >"$logs/tests.log" 2>&1; then
  status_tests=pass
fi
tail -25 "$logs/tests.log"
# The device tests again with programmatic dependent launch (launches overlapping the kernel
# before them, each waiting for its inputs).
status_pdl=fail
if BITNETC_CUDA_PDL=1 timeout 150 "$dist/cuda-tests" --nocapture --test-threads 1 device_ gpu_ >"$logs/tests-pdl.log" 2>&1; then
  status_pdl=pass
fi
tail -5 "$logs/tests-pdl.log"

# A plan whose PTX was compiled ahead (scripts/build-gpu-dist.sh), with no NVRTC to be found.
status_plan=absent
if [ -e "$dist/tiny-cuda.bplan" ]; then
  gen() {
    timeout 60 "$dist/bitnetc" run -m "$dist/tiny-cuda.bplan" -p "the" -n 24 --temp 1 --seed 7 \
      --no-display-prompt --output-ids "$@" 2>&1 >/dev/null | tail -1
  }
  gpu_ids=$(LD_LIBRARY_PATH=$plain_path gen --device cuda)
  cpu_ids=$(gen)
  echo "plan on cuda: $gpu_ids"
  echo "plan on cpu:  $cpu_ids"
  if [ "$gpu_ids" = "$cpu_ids" ]; then status_plan=same; else status_plan=differ; fi
fi

model=/tmp/bitnetc-2b.gguf
[ -e "$model" ] || timeout 150 "$dist/bitnetc" gen-model --like bitnet-b1.58-2B-4T -o "$model" >"$logs/gen.log" 2>&1
timeout 150 "$dist/bitnetc" bench -m "$model" --device cuda -p 512 -n 128 -r 3 -o md 2>&1 | tee "$logs/bench-gpu.log"
# The same tests as variants (rows of the table labelled): the head re-encoded to Q8_0; the
# I2_S layers as plain prologue + one-row-per-warp kernels (no one-token fusion, no token
# tiles); with programmatic dependent launch; without CUDA graphs.
variant() {
  local label=$1
  shift
  timeout 90 "$@" 2>&1 | grep -E '^\| .*(pp512|tg128)|: on ' | sed -E "s/(pp512|tg128) \|/\1 ($label) |/" | tee -a "$logs/bench-gpu.log"
}
variant "q8_0 head" "$dist/bitnetc" bench -m "$model" --device cuda -p 512 -n 128 -r 3 -o md --lm-head q8_0
BITNETC_CUDA_PLAIN=1 variant "plain" "$dist/bitnetc" bench -m "$model" --device cuda -p 512 -n 128 -r 3 -o md
BITNETC_CUDA_PDL=1 variant "pdl" "$dist/bitnetc" bench -m "$model" --device cuda -p 512 -n 128 -r 3 -o md
BITNETC_CUDA_PDL=1 variant "pdl, q8_0 head" "$dist/bitnetc" bench -m "$model" --device cuda -p 512 -n 128 -r 3 -o md --lm-head q8_0
BITNETC_CUDA_GRAPHS=0 variant "no graph" "$dist/bitnetc" bench -m "$model" --device cuda -p 0 -n 128 -r 3 -o md
# Each kernel's time (launch by launch, synchronized).
timeout 60 "$dist/bitnetc" bench -m "$model" --device cuda -p 512 -n 32 -r 1 -o md --trace-kernels >"$logs/trace.log" 2>&1
head -30 "$logs/trace.log"
timeout 90 "$dist/bitnetc" bench -m "$model" -p 512 -n 32 -r 1 -t "$(nproc)" -o md 2>&1 | tail -3 | tee "$logs/bench-cpu.log"

echo
echo "== bitnetc GPU check =="
echo "tests: $status_tests"
echo "device tests with BITNETC_CUDA_PDL=1: $status_pdl"
echo "ahead-compiled plan without NVRTC, sampled ids (seed 7) GPU vs CPU: $status_plan"
grep -E "Δlogit" "$logs/tests.log" || true
grep -E "Δlogit" "$logs/tests-pdl.log" | sed "s/^/PDL: /" || true
grep -hE "^\| " "$logs/bench-gpu.log" "$logs/bench-cpu.log" || true
