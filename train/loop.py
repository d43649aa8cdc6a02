"""The training run: process groups, the trainer, data, then step, evaluate, checkpoint, repeat.

``run(cfg)`` reads top to bottom: the process groups and the run folder's lock, the trainer
(``train.trainer``: model chunks, optimizer, resume), the datasets and the sampler, then the loop on
global batches with its figures (``train.metrics``), validation, checkpoints and signals
(``train.signals``). Any error releases the lock and tears the process groups down on its way out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.dataset import build_datasets
from train import checkpoint as ckpt
from train.config import TrainConfig, to_yaml
from train.distributed import World, from_rank0, init_distributed, shutdown
from train.logger import MetricsLogger
from train.metrics import peak_flops, throughput
from train.sampler import BatchSampler
from train.signals import Signals
from train.trainer import Trainer


@dataclass
class RunResult:
    run_dir: Path
    checkpoint_dir: Path
    step: int
    preempted: bool = False
    last_validation: dict[str, float] = field(default_factory=dict)


def run(cfg: TrainConfig) -> RunResult:
    """Train as ``cfg`` says; returns where things went and the final figures. On any error the run
    folder's lock is released and the process groups are torn down before the error propagates."""
    world = init_distributed(cfg)
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING, format="%(message)s")
    # megatron.core narrates dataset and checkpoint internals at INFO; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    lock = ckpt.RunLock(_run_folders(cfg))
    failed = True
    try:
        from_rank0(lock.acquire)  # before anything is written into the run folder
        result = _run(cfg, world)
        failed = False
        return result
    finally:
        lock.release()
        shutdown(failed=failed)


def _run_folders(cfg: TrainConfig) -> list[Path]:
    """The folders one trainer owns: the run folder, and the checkpoint folder when it lies elsewhere."""
    run_dir = Path(cfg.run_dir).resolve()
    checkpoints = Path(cfg.checkpoint.dir).resolve() if cfg.checkpoint.dir else run_dir / "checkpoints"
    return [run_dir] if checkpoints.is_relative_to(run_dir) else [run_dir, checkpoints]


def _run(cfg: TrainConfig, world: World) -> RunResult:
    run_dir = Path(cfg.run_dir)
    config_yaml = to_yaml(cfg)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    dist.barrier()
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, world)
    resumed = trainer.resume()
    state = trainer.state
    valid_batches = cfg.logging.eval_iters * cfg.global_batch_size
    train_set, valid_set, _ = build_datasets(
        cfg.data,
        (cfg.steps * cfg.global_batch_size, max(valid_batches, 1), 1),
        seed=cfg.seed,
        tokenizer=trainer.tokenizer,
    )
    sampler = BatchSampler(train_set, cfg.global_batch_size, cfg.micro_batch_size, world)
    logger = MetricsLogger(
        cfg.logging,
        run_dir,
        cfg.steps,
        state.step,
        enabled=world.is_main,
        config_dict=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    )
    params = sum(p.numel() for m in trainer.modules for p in m.parameters())
    logger.message(
        f"Tandem: {cfg.model.name} model, {params / 1e6:.2f}M parameters on this rank, objective "
        f"{cfg.objective.kind.value}, world {world.size} (tp {cfg.parallel.tensor}, "
        f"pp {cfg.parallel.pipeline}, dp {world.dp_size}), run folder {run_dir}"
        + (f", {resumed}" if resumed else "")
    )
    logger.message(trainer.backends.notice(cfg.model))
    result = RunResult(run_dir=run_dir, checkpoint_dir=trainer.checkpoint_dir, step=state.step)

    def save():
        logger.message(f"saved checkpoint {trainer.save(config_yaml)}")

    def validate():
        if cfg.logging.eval_iters > 0 and valid_set is not None:
            result.last_validation = trainer.evaluate(valid_set)
            logger.validation(state.step, result.last_validation)

    # Installed only now: a signal during start-up (a launcher stopping the ranks of a failed start)
    # ends the process at once; from here on it ends the step, saves and exits.
    signals = Signals()
    peak = peak_flops(cfg.precision)
    try:
        if cfg.logging.eval_interval and state.step == 0:
            validate()
        saved_at = state.step
        while state.step < cfg.steps:
            step = state.step
            start = time.perf_counter()
            metrics = trainer.train_step(step, sampler.batches(state.consumed_samples))
            elapsed = time.perf_counter() - start
            state.step += 1
            state.consumed_samples += cfg.global_batch_size
            tokens = cfg.global_batch_size * cfg.data.seq_length
            flops = trainer.flops_per_sample * cfg.global_batch_size
            metrics.update(throughput(elapsed, tokens, flops, world.size, peak))
            if state.step % cfg.logging.interval == 0 or state.step == cfg.steps:
                logger.train(state.step, metrics)
            else:
                logger.advance(state.step)
            if cfg.logging.eval_interval and (
                state.step % cfg.logging.eval_interval == 0 or state.step == cfg.steps
            ):
                validate()
            if signals.any_rank():
                save()
                result.preempted = True
                logger.message(f"stopping at step {state.step} on a signal; resume with the same command")
                break
            if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0:
                save()
                saved_at = state.step
        if not result.preempted and saved_at != state.step:
            save()
    finally:
        signals.restore()
        logger.close()
    result.step = state.step
    return result
