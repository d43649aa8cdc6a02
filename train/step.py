"""One micro-batch through the model: the device boundary, the forward, and the loss reduction.

The data side (batch, masking, loss weights) works on the CPU; ``forward`` moves everything the
model reads to the model's device in one call (``ModelInputs.to``) and realises the attention mask
and rotary tables from the moved tensors, so no tensor of a step is created on a default device.
megatron.core's schedule calls the trainer's forward-step function, which is ``forward`` plus the
closure ``loss`` that reduces the model's per-token cross-entropy with the objective's terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.attention import realise
from model.config import AttentionBackend, ModelConfig
from tandem_kernels.noise import mask_seed
from train.objectives import ModelInputs, reduce


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides the batch: where the model is and how its attention is realised."""

    model: ModelConfig
    device: torch.device
    backend: AttentionBackend  # resolved (flex or sdpa)
    dtype: torch.dtype  # of the rotary tables (the model's compute dtype)
    seed: int


def forward(
    context: StepContext, objective, model, batch, split: str, sample_ids: list[int]
) -> tuple[torch.Tensor, ModelInputs]:
    """The model's per-token cross-entropy [B, S] (on the last pipeline stage; the hidden states on
    others) for ``batch`` under ``objective``, and the device-resident inputs it was computed from."""
    generators = [torch.Generator().manual_seed(mask_seed(context.seed, split, i)) for i in sample_ids]
    inputs = objective.prepare(batch, generators).to(context.device)
    attention = realise(
        context.model,
        inputs.position_ids,
        inputs.predicate(),
        context.backend,
        inputs.per_sample_mask,
        context.dtype,
    )
    output = model(
        inputs.tokens, inputs.position_ids, None, labels=inputs.labels, packed_seq_params=attention
    )
    return output, inputs


def metrics(inputs: ModelInputs, per_token_ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss sum, supervised-token count, detached metric sums) for megatron's per-token loss."""
    reduced = reduce(per_token_ce, inputs)
    out = {"loss_sum": reduced.loss_sum.detach().clone(), "num_tokens": reduced.num_tokens.float()}
    for name in reduced.sums:
        out[f"{name}_sum"] = reduced.sums[name]
        out[f"{name}_count"] = reduced.counts[name].float()
    if reduced.masked_ce_sum is not None:
        out["masked_ce_sum"] = reduced.masked_ce_sum
        out["maskable_count"] = inputs.maskable.float()
    return reduced.loss_sum, reduced.num_tokens.to(torch.int), out
