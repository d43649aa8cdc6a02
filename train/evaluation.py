"""Evaluation of exports and checkpoints: the harness model ``tandem`` and held-out losses.

``Tandem`` is ``model.evaluation.TandemLM`` registered with lm-evaluation-harness as ``tandem``
(importing this module registers it); its ``pretrained`` may also be a Tandem checkpoint (a run
folder, its checkpoints/ folder or one iter_* folder), exported on the fly into a temporary folder
removed with the object.

``held_out_losses`` scores an export on the held-out split of a run's indexed data exactly as the
trainer's validation does (the same samples, the same masks drawn from the same per-sample seeds,
the same reductions, ``train.metrics.summarise``): AR cross-entropy per token and its perplexity, and
the block-diffusion NELBO per token, computed here with the export's own weights and remote code.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from omegaconf import OmegaConf

from data.dataset import build_datasets, collate
from data.tokenizer import load_tokenizer_info
from model.evaluation import TandemLM
from tandem_kernels import masks
from tandem_kernels.noise import mask_seed
from train.config import TrainConfig
from train.convert import export_checkpoint
from train.metrics import summarise
from train.objectives import ObjectiveKind, build_objective, reduce


def is_export(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


@register_model("tandem")
class Tandem(TandemLM):
    """``TandemLM`` over an export folder or a Tandem checkpoint (exported on the fly; ``export_dtype``
    picks the exported weights' dtype, default the run's)."""

    def __init__(self, pretrained: str, export_dtype: str | None = None, **kwargs):
        if not is_export(pretrained):
            folder = Path(tempfile.mkdtemp(prefix="tandem-eval-"))
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
            pretrained = str(export_checkpoint(pretrained, folder / "hf", dtype=export_dtype))
        super().__init__(pretrained=pretrained, **kwargs)


def run_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a run (its folder, a checkpoint folder, or a config.yaml), with dotted
    ``key=value`` overrides (e.g. ``logging.eval_iters=4``)."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "config.yaml", *sorted(path.glob("**/config.yaml"))]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{path} holds no config.yaml (give a run folder or its config.yaml)")
    saved = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), OmegaConf.load(found), OmegaConf.from_dotlist(overrides or [])
    )
    return OmegaConf.to_object(saved)


@torch.no_grad()
def held_out_losses(model, cfg: TrainConfig) -> dict[str, float]:
    """The trainer's validation figures for ``model`` (a loaded export) on ``cfg``'s held-out data:
    ``cfg.logging.eval_iters`` global batches of the valid split, averaged per batch as the trainer
    averages them. The objective is the run's with the joint kind, so both the AR loss and the
    diffusion NELBO are reported whatever the run trained (each term is reduced on its own)."""
    if cfg.logging.eval_iters < 1:
        raise ValueError("logging.eval_iters must be >= 1 to score held-out batches")
    tokenizer = load_tokenizer_info(cfg.data.tokenizer)
    mask_id = cfg.objective.mask_token_id if cfg.objective.mask_token_id is not None else tokenizer.mask_id
    if mask_id != model.config.mask_token_id:
        raise ValueError(f"the data's mask id {mask_id} is not the export's ({model.config.mask_token_id})")
    gbs, iters = cfg.global_batch_size, cfg.logging.eval_iters
    _, valid, _ = build_datasets(
        cfg.data, (cfg.steps * gbs, max(iters * gbs, 1), 1), seed=cfg.seed, tokenizer=tokenizer
    )
    if valid is None:
        raise ValueError("this data config has no held-out split (data.split or data.valid_prefixes)")
    objective = build_objective(dataclasses.replace(cfg.objective, kind=ObjectiveKind.joint), mask_id)
    device = model.diffusion_head.weight.device
    total: dict[str, float] = {}
    for it in range(iters):
        ids = list(range(it * gbs, (it + 1) * gbs))
        sums: dict[str, float] = {}
        for k in range(0, gbs, cfg.micro_batch_size):
            chunk = ids[k : k + cfg.micro_batch_size]
            batch = collate([valid[i % len(valid)] for i in chunk])
            generators = [torch.Generator().manual_seed(mask_seed(cfg.seed, "valid", i)) for i in chunk]
            inputs = objective.prepare(batch, generators).to(device)
            B, S = inputs.tokens.shape
            mask = masks.dense(inputs.predicate(), S, S, batch_size=B, device=device)
            logits = model(inputs.tokens, attention_mask=mask, position_ids=inputs.position_ids).logits
            ce = F.cross_entropy(logits.float().transpose(1, 2), inputs.labels, reduction="none")
            reduced = reduce(ce, inputs)
            parts = {"loss_sum": reduced.loss_sum, "num_tokens": reduced.num_tokens}
            parts |= {f"{n}_sum": v for n, v in reduced.sums.items()}
            parts |= {f"{n}_count": v for n, v in reduced.counts.items()}
            parts |= {"masked_ce_sum": reduced.masked_ce_sum, "maskable_count": inputs.maskable}
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        for key, value in summarise(sums).items():
            total[key] = total.get(key, 0.0) + value / iters
    total["ar_perplexity"] = math.exp(total["ar_loss"])
    return total
