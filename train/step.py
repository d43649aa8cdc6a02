"""One step's micro-batches through megatron.core's schedule: the device boundary, the forward, the loss.

The data side (batch, masking, loss weights) works on the CPU; ``forward`` moves everything the model
reads to the model's device in one call (``ModelInputs.to``) and hands the model the objective's
predicate, which the model side realises as its attention backend's mask (``AttentionRealiser``), so
no tensor of a step is created on a default device. megatron.core's schedule calls the forward-step
function once per micro-batch; its loss function reduces the model's per-token cross-entropy with
the objective's terms (``train.objectives.reduce``). Loss normalisation is per token over the global
batch (megatron's ``calculate_per_token_loss``): each micro-batch returns its weighted CE sum and
supervised-token count, and megatron divides the summed gradients by the count summed over
micro-batches and data-parallel ranks. ``run`` returns the step's figures summed over micro-batches
and data-parallel ranks, on every rank (``train.metrics.summarise`` makes them per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from model import megatron
from model.attention import AttentionRealiser
from tandem_kernels.noise import mask_seed
from train.distributed import collective_device
from train.metrics import summarise
from train.objectives import ModelInputs, reduce


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides the model and the batch."""

    objective: object  # train.objectives: CausalLM, BlockDiffusion or Joint
    device: torch.device  # the model's
    attention: AttentionRealiser
    seed: int
    rank: int  # for messages
    micro_batch_size: int
    sequence_length: int  # positions one sample feeds the model (the objective's)


def forward(context: StepContext, model, batch, split: str, sample_ids: list[int]):
    """The model's per-token cross-entropy [B, S] (on the last pipeline stage; the hidden states on
    others) for ``batch`` under the objective, and the device-resident inputs it was computed from."""
    generators = [torch.Generator().manual_seed(mask_seed(context.seed, split, i)) for i in sample_ids]
    inputs = context.objective.prepare(batch, generators).to(context.device)
    attention = context.attention(inputs.position_ids, inputs.predicate(), inputs.per_sample_mask)
    output = megatron.forward(model, inputs.tokens, inputs.position_ids, attention, labels=inputs.labels)
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


def _loss(context: StepContext, split, step, micro_index, sample_ids, inputs, per_token_ce):
    loss_sum, num_tokens, figures = metrics(inputs, per_token_ce)
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(
            f"non-finite {split} loss ({loss_sum.item()}) at step {step + 1}, "
            f"micro-batch {micro_index} (samples {sample_ids[0]}..{sample_ids[-1]}, rank "
            f"{context.rank}); lower optim.lr or check the data of these samples"
        )
    return loss_sum, num_tokens, figures


def _forward_step(context: StepContext, split: str, step: int, data_iterator, model):
    micro_index, (batch, sample_ids) = next(data_iterator)
    output, inputs = forward(context, model, batch, split, sample_ids)
    return output, partial(_loss, context, split, step, micro_index, sample_ids, inputs)


def run(
    context: StepContext, models: list, split: str, step: int, batches: list, forward_only: bool
) -> dict[str, float]:
    """``batches`` (this rank's micro-batches, each (Batch, global sample ids)) through the schedule,
    forward and backward unless ``forward_only``; the per-token figures of the global batch."""
    iterators = [iter(list(enumerate(batches))) for _ in models]
    outputs = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, context, split, step),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=models,
        num_microbatches=len(batches),
        seq_length=context.sequence_length,
        micro_batch_size=context.micro_batch_size,
        forward_only=forward_only,
    )
    return summarise(_sum_over_ranks(outputs))


def _sum_over_ranks(outputs: list[dict]) -> dict[str, float]:
    """Per-micro-batch metrics (they exist on the last pipeline stage) summed over micro-batches and
    data-parallel ranks, on every rank."""
    last_stage = parallel_state.get_pipeline_model_parallel_last_rank()
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    names = [sorted({k for o in outputs for k in o}) if outputs else []]
    dist.broadcast_object_list(names, src=last_stage, group=pipeline)
    keys = names[0]
    group = parallel_state.get_data_parallel_group()
    totals = torch.zeros(len(keys), dtype=torch.float64, device=collective_device(group))
    for output in outputs:
        for i, key in enumerate(keys):
            totals[i] += output[key].double().to(totals.device)
    dist.all_reduce(totals, group=group)
    dist.broadcast(totals, src=last_stage, group=pipeline)
    return dict(zip(keys, totals.tolist(), strict=True))
