"""The trainer: the model chunks in megatron DDP, the megatron optimizer, checkpoints, and a step.

``Trainer(cfg, world)`` builds everything a run trains (process groups come first,
``train.distributed.init_distributed``); ``resume`` loads what the run folder or ``checkpoint.load``
holds; ``train_step`` and ``evaluate`` run global batches through ``train.step``; ``save`` writes a
checkpoint. The run loop around it is ``train.loop.run``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from megatron.core import rerun_state_machine
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from data.dataset import check_data
from data.tokenizer import load_tokenizer_info
from model.attention import AttentionRealiser
from model.config import Dtype
from model.megatron import Backends, build_model
from train import checkpoint as ckpt
from train import step as model_step
from train.config import OnUnreadable, TrainConfig
from train.distributed import World, from_rank0
from train.flops import training_flops_per_sample
from train.objectives import build_objective
from train.sampler import BatchSampler
from train.schedule import lr_at


class Trainer:
    def __init__(self, cfg: TrainConfig, world: World):
        _init_rerun_state_machine()
        self.cfg = cfg
        self.world = world
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.dtype = cfg.precision.dtype.torch
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
        self.backends = Backends.resolve(cfg.model, world.device)
        L = cfg.data.seq_length
        self.step_context = model_step.StepContext(
            objective=self.objective,
            device=world.device,
            attention=AttentionRealiser(cfg.model, self.backends.attention, self.dtype),
            seed=cfg.seed,
            rank=world.rank,
            micro_batch_size=cfg.micro_batch_size,
            sequence_length=self.objective.sequence_length(L),
        )
        self.models = self._build_models()
        self.optimizer = self._build_optimizer()
        self.state = ckpt.TrainState()
        self.flops_per_sample = training_flops_per_sample(
            cfg.model,
            self.objective.sequence_length(L),
            self.objective.attention_pairs(L),
            cfg.parallel.recompute,
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
                backends=self.backends,
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

    # ---- steps -------------------------------------------------------------------------------

    def train_step(self, step: int, batches: list) -> dict[str, float]:
        lr = lr_at(step, self.cfg.optim, self.cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        for model in self.models:
            model.train()
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            metrics = model_step.run(
                self.step_context, self.models, "train", step, batches, forward_only=False
            )
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
            batches = sampler.batches(it * cfg.global_batch_size)
            metrics = model_step.run(self.step_context, self.models, "valid", it, batches, forward_only=True)
            for key, value in metrics.items():
                total[key] = total.get(key, 0.0) + value / cfg.logging.eval_iters
        return total


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
