#!/usr/bin/env bash
# Tandem on one machine: torchrun starts NPROC_PER_NODE trainer processes (default: one per GPU, or 1
# without GPUs) and passes every argument to `python -m train` as a Hydra override.
#
#   launch/torchrun.sh experiment=nld_8b_ar2dlm launch=1x8 checkpoint.load=/ckpt/ministral3-8b
#   NPROC_PER_NODE=2 launch/torchrun.sh experiment=quickstart parallel=tp2    # 2 CPU processes
#
# PYTHON picks the interpreter (default: python3 on PATH, e.g. the activated .venv).
set -euo pipefail

# shellcheck source=SCRIPTDIR/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

nproc=${NPROC_PER_NODE:-$(gpus_on_node)}
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m train "$@"
