#!/usr/bin/env bash
# Wheels of the dependencies a GPU machine's PyTorch image usually lacks (megatron-core, Hydra,
# OmegaConf), for a GPU machine that cannot reach a package registry. Run it where pip can download:
#
#   bash scripts/offline_wheels.sh [DIR] [PYTHON_VERSION]      # default .whl/ (git-ignored), 3.12
#
# then, on the GPU machine, with the repository and DIR copied over:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:. python3 scripts/gpu_check.py --report gpu_check.json
#
# Everything else Tandem imports on that path (torch, transformers, tokenizers, safetensors, numpy,
# psutil, tqdm, matplotlib) is part of common PyTorch images. Transformer Engine is not fetched: it
# builds against the machine's torch and CUDA; without it gpu_check skips the FP8 stages and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PYV=${2:-3.12}
mkdir -p "$OUT"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT" \
  "megatron-core==0.16.1" "hydra-core==1.3.2" "omegaconf==2.3.0"
# antlr4 4.9.3 (what OmegaConf 2.3 pins) is published as a source archive only: build its pure-Python wheel.
python3 -m pip wheel --quiet --no-deps -w "$OUT" "antlr4-python3-runtime==4.9.3"
ls -1 "$OUT"
