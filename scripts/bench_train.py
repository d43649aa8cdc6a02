"""Training-step benchmark, measured side by side in one process (interleaved, medians over repeats).

    python scripts/bench_train.py [--repeats 15] [hydra overrides, e.g. model.num_layers=8]

Prints, on the same model and sequence length:
- joint step / AR step: the joint objective runs every GEMM over [x_t ; x_0] (2L tokens), so about
  2x is the floor; the ratio says how close Tandem gets;
- Tandem AR step / plain PyTorch step: the same architecture written directly in torch (SDPA, AdamW,
  gradient clipping), i.e. the cost of megatron.core's machinery (DDP buffers, schedules, optimizer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.corpora import default_demo_dir, prepare_demo
from data.dataset import build_datasets
from train.config import compose_config
from train.distributed import init_distributed, shutdown
from train.sampler import BatchSampler
from train.trainer import Trainer


class PlainBlock(nn.Module):
    def __init__(self, hidden, ffn, heads, groups, head_dim, eps):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.attn_norm = nn.RMSNorm(hidden, eps=eps)
        self.qkv = nn.Linear(hidden, (heads + 2 * groups) * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden, eps=eps)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1
        )
        q = q.view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.groups, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.groups, self.head_dim).transpose(1, 2)

        def rotate(t):
            a, b = t.chunk(2, dim=-1)
            return t * cos + torch.cat((-b, a), dim=-1) * sin

        attn = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True, enable_gqa=True)
        x = x + self.out(attn.transpose(1, 2).reshape(B, S, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainModel(nn.Module):
    """The same decoder as Tandem's GPTModel (RMSNorm, RoPE, GQA, SwiGLU, untied head), in plain torch."""

    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        self.embed = nn.Embedding(m.padded_vocab_size, m.hidden_size)
        self.blocks = nn.ModuleList(
            PlainBlock(
                m.hidden_size,
                m.ffn_hidden_size,
                m.num_attention_heads,
                m.query_groups,
                m.head_dim,
                m.norm_epsilon,
            )
            for _ in range(m.num_layers)
        )
        self.norm = nn.RMSNorm(m.hidden_size, eps=m.norm_epsilon)
        self.head = nn.Linear(m.hidden_size, m.padded_vocab_size, bias=False)
        inv_freq = 1.0 / m.rope.rope_theta ** (torch.arange(0, m.head_dim, 2).float() / m.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens):
        angles = torch.arange(tokens.shape[1]).float()[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def plain_step(model, optimizer, batches, clip):
    optimizer.zero_grad(set_to_none=True)
    total = sum(int(b.loss_mask.sum()) for b, _ in batches)
    for batch, _ in batches:
        logits = model(batch.tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none")
        ((loss * batch.loss_mask.flatten()).sum() / total).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    prepare_demo(default_demo_dir(), progress=False)
    common = ["experiment=quickstart", "logging.tensorboard=false", *overrides]
    joint_cfg = compose_config([*common, "objective=joint", "objective.block_size=16"])
    ar_cfg = compose_config([*common, "objective=ar"])
    world = init_distributed(joint_cfg)
    try:
        joint, ar = Trainer(joint_cfg, world), Trainer(ar_cfg, world)
        train_set, _, _ = build_datasets(
            joint_cfg.data, (1000 * joint_cfg.global_batch_size, 1, 1), joint_cfg.seed, joint.tokenizer
        )
        sampler = BatchSampler(train_set, joint_cfg.global_batch_size, joint_cfg.micro_batch_size, world)
        torch.manual_seed(0)
        plain = PlainModel(ar_cfg)
        plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        times = {"joint": [], "ar": [], "plain": []}
        for repeat in range(args.warmup + args.repeats):
            batches = sampler.batches(repeat * joint_cfg.global_batch_size)
            step_times = {
                "joint": timed(partial(joint.train_step, repeat, batches)),
                "ar": timed(partial(ar.train_step, repeat, batches)),
                "plain": timed(partial(plain_step, plain, plain_optimizer, batches, ar_cfg.optim.clip_grad)),
            }
            if repeat >= args.warmup:
                for key, value in step_times.items():
                    times[key].append(value)
        median = {k: statistics.median(v) for k, v in times.items()}
        m, L = joint_cfg.model, joint_cfg.data.seq_length
        print(
            f"model {m.name}: {m.num_layers} layers, hidden {m.hidden_size}, seq {L}, global batch "
            f"{joint_cfg.global_batch_size}, {torch.get_num_threads()} threads, {args.repeats} repeats"
        )
        for key, trainer in (("joint", joint), ("ar", ar)):
            flops = trainer.flops_per_sample * joint_cfg.global_batch_size / median[key]
            print(f"  {key:6s} step median {median[key] * 1000:8.1f} ms   {flops / 1e9:7.2f} GFLOP/s")
        print(f"  plain  step median {median['plain'] * 1000:8.1f} ms")
        print(
            f"joint / AR step time:           {median['joint'] / median['ar']:.2f}x  "
            "(2L tokens: ~2x is the floor)"
        )
        print(f"Tandem AR / plain PyTorch step: {median['ar'] / median['plain']:.2f}x  (framework overhead)")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
