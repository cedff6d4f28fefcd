#!/usr/bin/env bash
# llama.cpp's own `llama-perplexity` on SmolLM2-135M-Instruct Q4_1 and Hamlet, built twice from
# the llama.cpp sources vendored in the PyPI sdist of llama-cpp-python 0.3.10 (llama.cpp
# 8846aace, June 2025): a native build (AMX on hosts that have it) and one with AMX off.
# Usage: tools/llama-cpp-perplexity.sh [WORK_DIR] [bench]   (needs gcc/g++, python3 -m pip,
# ../shared). With `bench`, builds llama-bench without AMX instead and runs BENCHMARKS.md's
# SmolLM2 test (-p 128 -n 128 -t 1,2 -r 5).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-${TMPDIR:-/tmp}/bitnetc-llama-cpp}
model=$root/../shared/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
text=$root/../shared/fixtures/text/hamlet-60k.txt
mkdir -p "$work" && cd "$work"
if [ ! -d llama_cpp_python-0.3.10 ]; then
  curl -sSLO https://files.pythonhosted.org/packages/37/de/d5d9544b13f0e26dfcd56af3cdfd99355cdf52fa51b6bfb25cf43267f6bf/llama_cpp_python-0.3.10.tar.gz
  tar xzf llama_cpp_python-0.3.10.tar.gz
fi
if ! command -v cmake >/dev/null; then
  python3 -m pip install --quiet --target "$work/cmake" cmake
  export PYTHONPATH="$work/cmake${PYTHONPATH:+:$PYTHONPATH}" PATH="$work/cmake/bin:$PATH"
fi
src=$work/llama_cpp_python-0.3.10/vendor/llama.cpp
common=(-DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF)
cmake -S "$src" -B "$work/native" -DGGML_NATIVE=ON "${common[@]}" >/dev/null
cmake -S "$src" -B "$work/noamx" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON \
  -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_INT8=OFF "${common[@]}" >/dev/null
if [ "${2:-}" = bench ]; then
  cmake --build "$work/noamx" --target llama-bench -j"$(nproc)" >/dev/null
  "$work/noamx/bin/llama-bench" -m "$model" -p 128 -n 128 -t 1,2 -r 5
  exit
fi
for build in native noamx; do
  cmake --build "$work/$build" --target llama-perplexity -j"$(nproc)" >/dev/null
  echo "== $build"
  "$work/$build/bin/llama-perplexity" -m "$model" -f "$text" -c 512 -t "$(nproc)" 2>&1 |
    grep -E "model buffer size|^\[1\]|Final estimate"
done
