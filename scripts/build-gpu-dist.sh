#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain: the
# bitnetc binary and the CUDA test binary, stripped, in dist/ (carry it to that machine).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin bitnetc
test_bin=$(cargo test --release --locked -p bitnetc-tests --test cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "cuda" and m.get("executable"):
        print(m["executable"])')
mkdir -p dist
cp target/release/bitnetc dist/bitnetc
cp "$test_bin" dist/cuda-tests
strip dist/bitnetc dist/cuda-tests
# A tiny plan with its kernels compiled ahead to PTX, which the GPU machine runs with no NVRTC
# (needs NVRTC here: NVRTC_DIR names its lib folder if the loader does not find it).
[ -n "${NVRTC_DIR:-}" ] && export LD_LIBRARY_PATH="$NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
dist/bitnetc compile tests/fixtures/tiny/bitnetcpp-tiny-i2_s.gguf --target cuda \
  --cuda-arch sm_80,sm_90 -o dist/tiny-cuda.bplan ||
  echo "no NVRTC here: dist/ has no ahead-compiled plan"
ls -la dist
