# The environment of a Tandem run, sourced by launch/torchrun.sh and launch/slurm.sbatch.
# Every value can be overridden by exporting it before launching. Nothing here is a hyperparameter.
# shellcheck shell=bash

# megatron.core's tensor/sequence parallelism needs one hardware queue, so that a communication kernel
# is scheduled before the GEMM that waits on it.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Free NCCL's buffers when the collective ends instead of when the caching allocator notices.
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Flex attention compiles Triton kernels on first use: keep the caches on node-local disk, one per user
# (a cache on a shared filesystem is raced by every node).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/tandem-triton-${USER:-user}}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/tandem-inductor-${USER:-user}}
# torch >= 2.12: how long torchrun waits, after forwarding SIGTERM, for the trainer to save before it
# kills it (30 s otherwise, too short for a large checkpoint).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}
# Log lines reach the job's output as they are written.
export PYTHONUNBUFFERED=1

# Processes to start on this node: one per GPU the job may use, or 1 without GPUs.
gpus_on_node() {
  local ids
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}
