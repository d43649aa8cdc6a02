"""Process groups from torchrun's environment: gloo on CPU, NCCL on GPU, then megatron's TP/PP/DP groups.

A plain ``python -m train`` (no torchrun) runs as a world of one. The configuration is validated
against the world size (``train.config.validate``) before any group is made.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from model import cpu
from train.config import TrainConfig, validate

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on the loopback interface (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainConfig) -> World:
    """Join (or create) the process group and build megatron's parallel groups for ``cfg.parallel``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    validate(cfg, world_size=size)
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu.enable()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(local_rank)
        # A world of one started without torchrun rendezvous on a fresh local port (every time: a
        # process may run several trainings one after another).
        local = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            init_method=local,
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(minutes=int(os.environ.get("TANDEM_DIST_TIMEOUT_MIN", "30"))),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    return World(
        rank=rank,
        size=size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=torch.device("cuda", local_rank) if on_gpu else torch.device("cpu"),
    )


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors for a collective on ``group`` (default: the world) must live: the current CUDA
    device for an NCCL group, the CPU for gloo."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_rank0(work: Callable[[], T]) -> T:
    """``work()`` run on rank 0, its result (or the exception it raised) on every rank; collective. Rank
    0's file-system work then cannot leave the other ranks waiting in a collective for a rank that
    failed."""
    outcome: tuple = (None, None)
    if dist.get_rank() == 0:
        try:
            outcome = (work(), None)
        except Exception as err:
            try:
                pickle.dumps(err)
            except Exception:
                err = RuntimeError(f"{type(err).__name__}: {err}")
            outcome = (None, err)
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def shutdown(failed: bool = False) -> None:
    """Destroy the process groups. ``failed``: this rank is leaving on an error, and peers may be
    blocked in a collective: NCCL groups are aborted rather than torn down politely (a polite teardown
    waits for them)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if failed and abort is not None and "nccl" in str(dist.get_backend()):
        abort()
    else:
        dist.destroy_process_group()


@contextmanager
def single_process() -> Iterator[None]:
    """megatron.core's process groups for one process (TP = PP = 1), for conversion tools; reuses a
    group that already exists."""
    owned = not dist.is_initialized()
    if not torch.cuda.is_available():
        cpu.enable()
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    initialized_here = not parallel_state.model_parallel_is_initialized()
    if initialized_here:
        parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        if initialized_here:
            parallel_state.destroy_model_parallel()
        if owned:
            dist.destroy_process_group()
