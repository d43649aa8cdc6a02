"""Ranks for test_dataset.py (forked, in torchrun's environment): every rank builds the same datasets
inside one gloo group.

Each writes ``rank<N>.pt`` with its first samples and whether it built the sample indices itself:
megatron.core should build them on rank 0 only, the other ranks reading rank 0's cache after a barrier.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.datasets import helpers

from data.config import DataConfig
from data.dataset import build_datasets
from data.tokenizer import load_tokenizer_info


def run(out: Path, tokenizer: str, prefixes: list[str]) -> None:
    builds = []
    build_sample_idx = helpers.build_sample_idx
    helpers.build_sample_idx = lambda *a: builds.append(1) or build_sample_idx(*a)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = DataConfig(
        prefixes=prefixes, seq_length=64, tokenizer=tokenizer, cache_dir=str(out / "cache"), split="1"
    )
    train, _, _ = build_datasets(cfg, (200, 0, 0), seed=7, tokenizer=load_tokenizer_info(tokenizer))
    sample = {"tokens": torch.stack([train[i]["tokens"] for i in range(50)]), "built": bool(builds)}
    torch.save(sample, out / f"rank{rank}.pt")
    dist.destroy_process_group()
