"""The trainer's GPU path, run on the simulated accelerator (tests/device_strict.py): every tensor of a
training step, a validation pass and the collectives around them must sit where a CUDA run puts them.

Each test builds the trainer as a GPU machine does (``torch.cuda.is_available()`` true: weights, DDP
buffers and the optimizer on the device, NCCL-style groups), gives it the weights of a CPU trainer of
the same config, and runs one real step (megatron schedule, DDP, optimizer, clipping) on both. The
step must not mix devices, and its losses and gradient norm must equal the CPU trainer's: the CPU run
is the independent reference for the values."""

from __future__ import annotations

import pytest
import torch
from megatron.core import tensor_parallel

from tests.device_strict import GPU, simulated_gpu
from tests.factories import SMALL_MODEL
from train import checkpoint as ckpt
from train.config import compose_config
from train.distributed import World

SMALL = [
    *SMALL_MODEL,
    "model.attention_backend=sdpa",  # flex needs the compiler; its masks are the same predicates
    "global_batch_size=4",
    "micro_batch_size=2",
    "steps=2",
    "logging.eval_iters=1",
]

PATTERNS = {
    "causal": ["objective=ar"],
    "nld_joint": [],
    "bd3_block_causal": ["objective.clean_attention=block_causal"],
    "document_masks": ["data.document_masks=true"],
    "bf16": ["precision=bf16"],
    "distributed_optimizer": [
        "parallel.distributed_optimizer=true",
        "parallel.overlap_grad_reduce=true",
        "parallel.overlap_param_gather=true",
    ],
}


def world(device: torch.device) -> World:
    return World(rank=0, size=1, dp_rank=0, dp_size=1, device=device)


def build(cfg, device: torch.device, weights: list[dict] | None = None):
    """A trainer built on ``device`` (with ``weights``, if given, in its model chunks)."""
    from train.trainer import Trainer

    torch.manual_seed(cfg.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    trainer = Trainer(cfg, world(device))
    for module, state in zip(trainer.modules, weights, strict=True) if weights is not None else []:
        missing, unexpected = module.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    return trainer


def one_step(cfg, trainer):
    """(train metrics of the first step, validation metrics before it)."""
    from data.dataset import build_datasets
    from train.sampler import BatchSampler

    train_set, valid_set, _ = build_datasets(
        cfg.data, (cfg.steps * cfg.global_batch_size, cfg.global_batch_size, 1), cfg.seed, trainer.tokenizer
    )
    sampler = BatchSampler(train_set, cfg.global_batch_size, cfg.micro_batch_size, trainer.world)
    validation = trainer.evaluate(valid_set)  # first: Adam's first update amplifies rounding differences
    return trainer.train_step(0, sampler.batches(0)), validation


def host_state(module) -> dict:
    return {
        k: v.detach().cpu().clone() for k, v in module.state_dict().items() if not k.endswith("_extra_state")
    }


@pytest.fixture
def demo_env(demo_data, monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_DATA", str(demo_data))
    return tmp_path


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_training_step_keeps_every_tensor_on_the_device(megatron_single, demo_env, pattern):
    cfg = compose_config([*SMALL, *PATTERNS[pattern], f"run_dir={demo_env / 'run'}"])
    reference = build(cfg, torch.device("cpu"))
    weights = [host_state(m) for m in reference.modules]
    expected, expected_valid = one_step(cfg, reference)
    with simulated_gpu(nccl=True, cuda_available=True):
        trainer = build(cfg, torch.device("cuda", 0), weights)
        assert next(trainer.modules[0].parameters()).device == GPU
        metrics, valid = one_step(cfg, trainer)
    # The same kernels on the same values; in bf16 the kernels may round differently for the other
    # memory layouts of the simulated tensors (one bf16 ulp is 2^-8 relative).
    rel = 1e-3 if pattern == "bf16" else 1e-5
    for key in ("loss", "grad_norm", *(k for k in expected if k.endswith("_loss"))):
        assert metrics[key] == pytest.approx(expected[key], rel=rel), key
    for key, value in expected_valid.items():
        assert valid[key] == pytest.approx(value, rel=rel), key


def test_checkpoint_agreement_and_signals_use_the_groups_device(megatron_single):
    """The all-reduces that decide whether every rank loaded a checkpoint, and whether any rank got a
    signal, run on NCCL groups on a GPU: their flags must be device tensors."""
    from train.signals import Signals

    with simulated_gpu(nccl=True, cuda_available=True):
        assert ckpt._all_ok(True) is True
        signals = Signals()
        try:
            assert signals.any_rank() is False
        finally:
            signals.restore()
