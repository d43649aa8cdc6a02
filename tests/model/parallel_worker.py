"""Ranks for the tensor/pipeline-parallel parity tests (forked by test_parallel.py, as torchrun would
start them).

``run(out, save=True)``: at TP=PP=1, build the model, save it as a dist checkpoint and the reference
logits and per-micro-batch losses. ``run(out, tp=N, pp=M)``: load that checkpoint into the N x M layout
and write this layout's logits (TP) and losses (PP) next to it for the test to compare.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def run(out: Path, save: bool = False, tp: int = 1, pp: int = 1) -> None:
    from model import cpu

    cpu.enable()
    dist.init_process_group("gloo")
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model.attention import AttentionRealiser
    from model.config import AttentionBackend, ParallelConfig, PrecisionConfig
    from model.megatron import build_model, forward
    from tandem_kernels import masks
    from tests.factories import tiny_model

    parallel_state.initialize_model_parallel(tp, pp)
    cfg = tiny_model(num_layers=4, max_position_embeddings=128, qk_layernorm=True)
    # A different init per rank: the weights must come from the checkpoint.
    torch.manual_seed(1234 + dist.get_rank())
    model = build_model(cfg, ParallelConfig(tensor=tp, pipeline=pp), PrecisionConfig())
    if save:
        (out / "ckpt").mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(out / "ckpt"))
    else:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(out / "ckpt"))
        model.load_state_dict(state)

    L, micro_batches, micro_batch_size = 16, 4, 2
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batches, micro_batch_size, 2 * L), generator=generator)
    labels = torch.randint(0, cfg.vocab_size, (micro_batches, micro_batch_size, 2 * L), generator=generator)
    positions = torch.arange(L).repeat(2).expand(micro_batch_size, 2 * L)
    inputs = AttentionRealiser(cfg, AttentionBackend.sdpa)(
        positions, masks.block_diffusion(L, 4), per_sample=False
    )

    results = {}
    if pp == 1:
        with torch.no_grad():
            logits = forward(model.eval(), tokens[0], positions, inputs, runtime_gather_output=True)
        results["logits"] = logits[..., : cfg.vocab_size]

    model.train()
    batches = iter(zip(tokens, labels, strict=True))

    def forward_step(data_iterator, stage):
        micro_tokens, micro_labels = next(data_iterator)
        per_token = forward(stage, micro_tokens, positions, inputs, labels=micro_labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # megatron scales `loss` in place

        return per_token, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=micro_batches,
        seq_length=2 * L,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    if parallel_state.is_pipeline_last_stage():
        results["losses"] = torch.stack([m["loss"] for m in losses])
        results["has_grads"] = torch.tensor(any(p.grad is not None for p in model.parameters()))
    if parallel_state.get_tensor_model_parallel_rank() == 0 and results:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        name = "reference" if save else f"tp{tp}_pp{pp}_stage{stage}"
        torch.save(results, out / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()
