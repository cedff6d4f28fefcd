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
ls -la dist
