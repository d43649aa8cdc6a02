"""Ranks for the parameter-sync test (forked by test_param_sync.py, as torchrun would start them): DP=2
with the distributed optimizer, one real training step of the trainer, then the trainer's own checkpoint
save. The weights the checkpoint holds are loaded back into a fresh model and written to
``<out>/saved.pt`` by rank 0.

``overlap``: ``parallel.overlap_param_gather=true`` (the recipes' setting), which leaves the
all-gather of updated parameter shards to the next forward pass."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def run(out: Path, overlap: bool) -> None:
    """The step and the save on this rank; $TANDEM_DATA holds the demo data."""
    from model import cpu

    cpu.enable()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel

    from data.dataset import build_datasets
    from tests.factories import SMALL_MODEL
    from train import checkpoint as ckpt
    from train.config import compose_config
    from train.distributed import World
    from train.sampler import BatchSampler
    from train.trainer import Trainer

    cfg = compose_config(
        [
            *SMALL_MODEL,
            "model.attention_backend=sdpa",
            "global_batch_size=8",
            "micro_batch_size=2",
            "steps=1",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
            "parallel.distributed_optimizer=true",
            "parallel.overlap_grad_reduce=true",
            f"parallel.overlap_param_gather={str(overlap).lower()}",
            f"run_dir={out / 'run'}",
        ]
    )
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    rank = dist.get_rank()
    world = World(
        rank=rank,
        size=2,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=2,
        device=torch.device("cpu"),
    )
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, world)
    train_set, _, _ = build_datasets(cfg.data, (8, 8, 1), cfg.seed, trainer.tokenizer)
    sampler = BatchSampler(train_set, cfg.global_batch_size, cfg.micro_batch_size, world)
    trainer.train_step(0, sampler.batches(0))
    trainer.state.step = 1
    # megatron cannot shard the distributed optimizer's state of its CPU fallback (torch AdamW) for a
    # checkpoint; the weights are what this test is about, so the optimizer's part is left out.
    trainer.optimizer.sharded_state_dict = lambda *args, **kwargs: {}
    folder = trainer.save("{}")

    fresh = Trainer(cfg, world)
    assert ckpt.load(folder.parent, fresh.modules, None, weights_only=True, only=folder) is not None
    if rank == 0:
        state = {k: v.detach().clone() for k, v in fresh.modules[0].state_dict().items() if "_extra" not in k}
        torch.save(state, out / "saved.pt")
    dist.barrier()
    dist.destroy_process_group()
