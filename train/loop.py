"""The training run: build everything from a TrainConfig, then step, evaluate, checkpoint, repeat.

``run(cfg)`` reads top to bottom: process groups, data, model chunks wrapped in megatron DDP, the
megatron optimizer, resume, then the loop on megatron.core's ``get_forward_backward_func`` schedule.
Loss normalisation is per token over the global batch (megatron's ``calculate_per_token_loss``): each
micro-batch returns its weighted CE sum and supervised-token count, and megatron divides the summed
gradients by the count summed over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, rerun_state_machine
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from omegaconf import OmegaConf

from data.dataset import build_datasets, check_data, collate
from data.tokenizer import load_tokenizer_info
from model.attention import resolve_backend
from model.config import Dtype
from model.megatron import TORCH_DTYPES, backend_notice, build_model
from train import checkpoint as ckpt
from train import step as model_step
from train.config import OnUnreadable, TrainConfig, to_yaml
from train.distributed import World, collective_device, from_rank0, init_distributed, shutdown
from train.flops import block_diffusion_pairs, causal_pairs, gpu_peak_flops, training_flops_per_sample
from train.logger import MetricsLogger
from train.objectives import CausalLM, ModelInputs, build_objective
from train.schedule import lr_at

log = logging.getLogger("tandem")


@dataclass
class RunResult:
    run_dir: Path
    checkpoint_dir: Path
    step: int
    preempted: bool = False
    train_losses: list[float] = field(default_factory=list)
    last_validation: dict[str, float] = field(default_factory=dict)


class _Signals:
    """SIGTERM / SIGUSR1 (SLURM preemption, walltime) and SIGINT (Ctrl-C) ask for a checkpoint and a
    clean exit after the current step; a second Ctrl-C stops at once (``KeyboardInterrupt``)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def any_rank(self) -> bool:
        flag = torch.tensor(
            [1 if self.received is not None else 0], dtype=torch.int64, device=collective_device()
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: TrainConfig, world: World):
        self.cfg = cfg
        self.world = world
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.dtype = TORCH_DTYPES[cfg.precision.dtype]
        if (
            cfg.checkpoint.load
            and not Path(cfg.checkpoint.load).exists()
            and not ckpt.candidates(self.checkpoint_dir)
        ):
            # Fail before building a model that may take minutes to materialise.
            raise FileNotFoundError(
                f"checkpoint.load={cfg.checkpoint.load} does not exist; import a Hugging Face model with "
                "scripts/import_hf.py or point it at a run's checkpoints/ folder"
            )
        self.tokenizer = load_tokenizer_info(cfg.data.tokenizer)
        # What a checkpoint must share with this run to be resumed from (finetune: the shapes only).
        self.identity = ckpt.RunIdentity(cfg.model, cfg.objective.kind, self.tokenizer.fingerprint)
        # False after a fresh start over a folder that held checkpoints: nothing of it is ever deleted.
        self.prune = True
        mask_id = (
            cfg.objective.mask_token_id if cfg.objective.mask_token_id is not None else self.tokenizer.mask_id
        )
        check_data(cfg.data, cfg.model.vocab_size, mask_id)
        self.objective = build_objective(cfg.objective, mask_id)
        self.step_context = model_step.StepContext(
            model=cfg.model,
            device=world.device,
            backend=resolve_backend(cfg.model.attention_backend, world.device),
            dtype=self.dtype,
            seed=cfg.seed,
        )
        self.models = self._build_models()
        self.optimizer = self._build_optimizer()
        self.state = ckpt.TrainState()
        L = cfg.data.seq_length
        if isinstance(self.objective, CausalLM):
            pairs = causal_pairs(L)
        else:
            pairs = block_diffusion_pairs(L, cfg.objective.block_size, cfg.objective.clean_attention)
        self.model_tokens = cfg.model_sequence_length
        self.flops_per_sample = training_flops_per_sample(
            cfg.model, self.model_tokens, pairs, cfg.parallel.recompute
        )

    # ---- construction -------------------------------------------------------------------------

    def _build_models(self) -> list:
        cfg = self.cfg
        chunks = []
        for vp_stage in range(cfg.parallel.virtual_pipeline or 1):
            model = build_model(
                cfg.model,
                cfg.parallel,
                cfg.precision,
                vp_stage=vp_stage if cfg.parallel.virtual_pipeline else None,
            )
            model.config.calculate_per_token_loss = True
            if cfg.precision.dtype is not Dtype.fp32:
                # As megatron expects for bf16/fp16: every parameter in the half dtype (norms included),
                # floating inputs cast on the first stage and outputs back to fp32 on the last.
                model = Float16Module(model.config, model)
            chunks.append(model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            check_for_nan_in_grad=True,
        )
        wrapped = [
            DistributedDataParallel(chunk.config, ddp_config, module=chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]
        config = chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads
        if cfg.parallel.overlap_grad_reduce:
            no_sync = [w.no_sync for w in wrapped]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            grad_sync = [w.start_grad_sync for w in wrapped]
            config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
        return wrapped

    def _build_optimizer(self):
        cfg = self.cfg
        optim = cfg.optim
        return get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.beta1,
                adam_beta2=optim.beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=cfg.precision.dtype is Dtype.bf16,
                fp16=cfg.precision.dtype is Dtype.fp16,
                params_dtype=self.dtype,
                use_distributed_optimizer=cfg.parallel.distributed_optimizer,
                overlap_param_gather=cfg.parallel.overlap_param_gather,
            ),
            self.models,
        )

    @property
    def modules(self) -> list:
        """The unwrapped GPTModel chunks (what checkpoints hold)."""
        unwrapped = [m.module for m in self.models]
        return [m.module if isinstance(m, Float16Module) else m for m in unwrapped]

    # ---- checkpoints ------------------------------------------------------------------------

    def sync_params(self) -> None:
        """Make every rank's parameters this step's. With ``parallel.overlap_param_gather`` the
        distributed optimizer leaves the all-gather of updated parameter shards to the next forward
        pass; a checkpoint (or export) taken before it would hold other ranks' shards one step stale."""
        for model in self.models:
            if getattr(model, "use_forward_hook", False):
                model.disable_forward_pre_hook(param_sync=True)
                model.enable_forward_pre_hook()

    def save(self, config_yaml: str) -> Path:
        """A checkpoint of the current state (collective); returns its folder."""
        self.sync_params()
        return ckpt.save(
            self.checkpoint_dir,
            self.modules,
            self.optimizer,
            self.state,
            config_yaml,
            self.cfg.checkpoint.keep,
            tokenizer=Path(self.tokenizer.path),
            tokenizer_fingerprint=self.tokenizer.fingerprint,
            prune=self.prune,
        )

    # ---- resume -----------------------------------------------------------------------------

    def resume(self) -> str | None:
        """Continue from this run's own checkpoints, else start from checkpoint.load (weights only when
        checkpoint.finetune). Returns what was loaded, for the log.

        The run's own folder is read with ``checkpoint.on_unreadable`` and its damaged checkpoints are
        moved aside; another configuration's checkpoint there is a ``CheckpointMismatch``."""
        policy = self.cfg.checkpoint.on_unreadable
        held = from_rank0(lambda: ckpt.has_checkpoints(self.checkpoint_dir))
        found = ckpt.load(
            self.checkpoint_dir,
            self.modules,
            self.optimizer,
            on_unreadable=policy,
            expect=self.identity,
            move_damaged=True,
        )
        if found is not None:
            self.state, folder = found
            return f"resumed from {folder} at step {self.state.step}"
        if held:
            self.prune = False
        source = self.cfg.checkpoint.load
        if source is None:
            return "started fresh over unreadable checkpoints (kept; no pruning this run)" if held else None
        source_path = Path(source)
        one_folder = (source_path / ckpt.MANIFEST).is_file()  # an iter_* folder: exactly that one
        root = source_path.parent if one_folder else source_path
        found = ckpt.load(
            root,
            self.modules,
            self.optimizer,
            weights_only=self.cfg.checkpoint.finetune,
            only=source_path if one_folder else None,
            # Another folder's checkpoints are never moved, nor replaced by a fresh start.
            on_unreadable=OnUnreadable.error if policy is OnUnreadable.error else OnUnreadable.previous,
            expect=self.identity,
        )
        if found is None:
            raise FileNotFoundError(
                f"checkpoint.load={source} holds no usable checkpoint (expected iter_*/ folders with "
                f"{ckpt.MANIFEST}, as written by the trainer or scripts/import_hf.py)"
            )
        if not self.cfg.checkpoint.finetune:
            self.state = found[0]
            return f"resumed from {found[1]} at step {self.state.step}"
        return f"weights from {found[1]} (checkpoint.finetune: fresh optimizer, step 0)"

    # ---- one step ---------------------------------------------------------------------------

    def _forward_step(self, split: str, step: int, data_iterator, model):
        micro_index, (batch, sample_ids) = next(data_iterator)
        output, inputs = model_step.forward(
            self.step_context, self.objective, model, batch, split, sample_ids
        )
        return output, partial(self._loss, split, step, micro_index, sample_ids, inputs)

    def _loss(self, split, step, micro_index, sample_ids, inputs: ModelInputs, per_token_ce: torch.Tensor):
        loss_sum, num_tokens, metrics = model_step.metrics(inputs, per_token_ce)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(
                f"non-finite {split} loss ({loss_sum.item()}) at step {step + 1}, "
                f"micro-batch {micro_index} (samples {sample_ids[0]}..{sample_ids[-1]}, rank "
                f"{self.world.rank}); lower optim.lr or check the data of these samples"
            )
        return loss_sum, num_tokens, metrics

    def _run_batches(self, split: str, step: int, batches: list, forward_only: bool) -> dict[str, float]:
        """``batches``: this rank's micro-batches, each (Batch, global sample ids)."""
        iterators = [iter(list(enumerate(batches))) for _ in self.models]
        outputs = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, split, step),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.models,
            num_microbatches=len(batches),
            seq_length=self.model_tokens,
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=forward_only,
        )
        return self._aggregate(outputs)

    def _aggregate(self, outputs: list[dict]) -> dict[str, float]:
        """Sum per-micro-batch metrics over micro-batches and data-parallel ranks, on every rank."""
        keys = sorted({k for o in outputs for k in o}) if outputs else []
        names = [keys]
        dist.broadcast_object_list(
            names,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        keys = names[0]
        group = parallel_state.get_data_parallel_group()
        totals = torch.zeros(len(keys), dtype=torch.float64, device=collective_device(group))
        for output in outputs:
            for i, key in enumerate(keys):
                totals[i] += output[key].double().to(totals.device)
        dist.all_reduce(totals, group=group)
        dist.broadcast(
            totals,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        sums = dict(zip(keys, totals.tolist(), strict=True))
        return summarise(sums)

    def train_step(self, step: int, batches: list) -> dict[str, float]:
        lr = lr_at(step, self.cfg.optim, self.cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        for model in self.models:
            model.train()
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            metrics = self._run_batches("train", step, batches, forward_only=False)
        except RuntimeError as err:
            # megatron's DDP checks the local gradients for NaN/Inf before reducing them.
            if "NaN" not in str(err) and "Inf" not in str(err):
                raise
            raise FloatingPointError(
                f"non-finite gradients at step {step + 1} (rank {self.world.rank}): {err}; lower optim.lr "
                "or check the data of this step"
            ) from err
        update_successful, grad_norm, _ = self.optimizer.step()
        if grad_norm is not None and not torch.isfinite(torch.tensor(grad_norm)):
            raise FloatingPointError(
                f"non-finite gradient norm at step {step + 1}; lower optim.lr or check the data"
            )
        metrics.update(lr=lr, grad_norm=float(grad_norm or 0.0), skipped=float(not update_successful))
        return metrics

    @torch.no_grad()
    def evaluate(self, valid_dataset) -> dict[str, float]:
        for model in self.models:
            model.eval()
        cfg = self.cfg
        sampler = BatchSampler(valid_dataset, cfg.global_batch_size, cfg.micro_batch_size, self.world)
        total: dict[str, float] = {}
        for it in range(cfg.logging.eval_iters):
            # The same samples and masks at every evaluation, so validation curves compare like with like.
            metrics = self._run_batches(
                "valid", it, sampler.batches(it * cfg.global_batch_size), forward_only=True
            )
            for key, value in metrics.items():
                total[key] = total.get(key, 0.0) + value / cfg.logging.eval_iters
        return total


def summarise(sums: dict[str, float]) -> dict[str, float]:
    """Per-token losses from summed metrics: the objective, AR CE, diffusion NELBO terms, masked CE."""
    out = {"loss": sums.get("loss_sum", 0.0) / max(sums.get("num_tokens", 0.0), 1.0)}
    if sums.get("ar_count"):
        out["ar_loss"] = sums["ar_sum"] / sums["ar_count"]
    if sums.get("diffusion_count"):
        # sum(CE / p) over masked tokens per maskable token: the diffusion NELBO (nats/token).
        out["diffusion_loss"] = sums["diffusion_sum"] / max(sums.get("maskable_count", 0.0), 1.0)
        out["masked_ce"] = sums["masked_ce_sum"] / sums["diffusion_count"]
    return out


class BatchSampler:
    """Deterministic global batches: the batch after ``consumed`` samples holds global samples
    [consumed, consumed + GBS); data-parallel rank r takes its contiguous slice, cut into micro-batches.
    Resuming at a step replays exactly the samples (and, seeded by sample, the masks) of that step."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, world: World):
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.per_rank = global_batch_size // world.dp_size
        self.dp_rank = world.dp_rank

    def batches(self, consumed_samples: int) -> list:
        start = consumed_samples + self.dp_rank * self.per_rank
        ids = list(range(start, start + self.per_rank))
        micro = [ids[k : k + self.mbs] for k in range(0, self.per_rank, self.mbs)]
        return [(collate([self.dataset[i % len(self.dataset)] for i in chunk]), chunk) for chunk in micro]


def _peak_flops(cfg: TrainConfig) -> float | None:
    if torch.cuda.is_available():
        from model.config import Fp8Recipe

        return gpu_peak_flops(torch.cuda.get_device_name(), fp8=cfg.precision.fp8 is not Fp8Recipe.none)
    return measured_matmul_flops()


def measured_matmul_flops(size: int = 512, repeats: int = 5) -> float:
    """This CPU's fp32 matmul rate (FLOP/s), the ceiling MFU is measured against on CPU runs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run(cfg: TrainConfig) -> RunResult:
    """Train as ``cfg`` says; returns where things went and the final figures. On any error the run
    folder's lock is released and the process groups are torn down before the error propagates."""
    world = init_distributed(cfg)
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING, format="%(message)s")
    # megatron.core narrates dataset and checkpoint internals at INFO; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    _init_rerun_state_machine()
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


def _init_rerun_state_machine() -> None:
    """megatron.core's schedules ask for the rerun state machine; created here, disabled, it stays
    quiet instead of warning about an implicit initialisation on the first step. Idempotent."""
    if getattr(rerun_state_machine, "_GLOBAL_RERUN_STATE_MACHINE", None) is not None:
        return
    rerun_logger = logging.getLogger(rerun_state_machine.__name__)
    level = rerun_logger.level
    rerun_logger.setLevel(logging.ERROR)
    try:
        rerun_state_machine.initialize_rerun_state_machine(mode=rerun_state_machine.RerunMode.DISABLED)
    finally:
        rerun_logger.setLevel(level)


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
    logger.message(backend_notice(cfg.model))
    result = RunResult(run_dir=run_dir, checkpoint_dir=trainer.checkpoint_dir, step=state.step)

    def save():
        logger.message(f"saved checkpoint {trainer.save(config_yaml)}")

    def validate():
        if cfg.logging.eval_iters > 0 and valid_set is not None:
            result.last_validation = trainer.evaluate(valid_set)
            logger.validation(state.step, result.last_validation)

    # Installed only now: a signal during start-up (a launcher stopping the ranks of a failed start)
    # ends the process at once; from here on it ends the step, saves and exits.
    signals = _Signals()
    peak = _peak_flops(cfg)
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
            achieved = trainer.flops_per_sample * cfg.global_batch_size / elapsed / world.size
            metrics.update(
                step_time=elapsed, tokens_per_s=tokens / elapsed, tflops_per_device=achieved / 1e12
            )
            if peak:
                metrics["mfu"] = achieved / peak
            result.train_losses.append(metrics["loss"])
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
