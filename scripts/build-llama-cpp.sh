#!/usr/bin/env bash
# Build the pinned llama.cpp tools gguf-surgeon drives, into a cache folder outside the repo.
# Source: the PyPI sdist of llama-cpp-python, which vendors llama.cpp's whole tree.
# Reused when present; prints the bin folder on its last line.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${GGUF_SURGEON_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-surgeon}"
# Portable x86-64 flags: no -march=native, and no AMX (its kernels crash on small matrices in
# sandboxes that do not grant AMX tile state); the cache folder name records the flag set.
if [ "$(uname -m)" = x86_64 ]; then
  CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
  FLAVOR=avx2
else
  CPU_FLAGS=(-DGGML_NATIVE=ON)
  FLAVOR=native
fi
ROOT="$CACHE/llama.cpp-$VERSION-$FLAVOR"
BIN="$ROOT/build/bin"
TOOLS=(llama-quantize llama-perplexity llama-imatrix llama-server llama-completion)

have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }

if have_all; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$ROOT"
# Two builds into one cache at once corrupt each other: hold a lock on the cache folder; a
# second caller waits, then finds the finished build.
exec 9>"$ROOT.lock"
flock 9
if have_all; then
  echo "$BIN"
  exit 0
fi
if [ ! -d "$ROOT/src/vendor/llama.cpp" ]; then
  tmp="$(mktemp -d "$CACHE/dl.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION" >&2
  rm -rf "$ROOT/src"
  mkdir -p "$ROOT/src"
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$ROOT/src" --strip-components=1
fi

if ! command -v cmake >/dev/null 2>&1; then
  # no system cmake: PyPI's cmake wheel carries the binary
  python3 -m pip install --quiet --target "$CACHE/cmake" cmake >&2
  export PATH="$(dirname "$(find "$CACHE/cmake" -path '*/bin/cmake' -type f | head -n 1)"):$PATH"
fi

cmake -S "$ROOT/src/vendor/llama.cpp" -B "$ROOT/build" \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF "${CPU_FLAGS[@]}" >&2
cmake --build "$ROOT/build" -j"$(nproc)" --target "${TOOLS[@]}" >&2
have_all || { echo "Error: llama.cpp build finished without all of: ${TOOLS[*]}" >&2; exit 1; }
echo "$BIN"
