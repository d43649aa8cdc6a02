"""LR schedules and FLOP counts against closed forms and hand counts."""

import math

import pytest

from model.config import Recompute
from tandem_kernels import masks
from tandem_kernels.masks import CleanAttention
from tests.factories import tiny_model
from train.config import LrSchedule, OptimConfig
from train.flops import (
    block_diffusion_pairs,
    causal_pairs,
    forward_flops,
    gpu_peak_flops,
    training_flops_per_sample,
)
from train.objectives import ObjectiveConfig, ObjectiveKind, build_objective
from train.schedule import lr_at


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, schedule=LrSchedule.cosine, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    midpoint = 10 + (109 - 10) / 2
    assert lr_at(int(midpoint), cfg, 110) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99))
    )
    assert lr_at(109, cfg, 110) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly_in_the_last_fraction():
    cfg = OptimConfig(lr=1e-5, min_lr=1e-6, schedule=LrSchedule.wsd, warmup_fraction=0.01, decay_fraction=0.2)
    total = 1000
    assert lr_at(0, cfg, total) == pytest.approx(1e-6)  # 10 warmup steps: 1/10 of lr
    assert lr_at(10, cfg, total) == lr_at(799, cfg, total) == pytest.approx(1e-5)
    assert lr_at(800, cfg, total) == pytest.approx(1e-5)
    assert lr_at(999, cfg, total) == pytest.approx(1e-6)
    assert lr_at(900, cfg, total) == pytest.approx(1e-5 - 9e-6 * 100 / 199)


def test_constant_schedule():
    cfg = OptimConfig(lr=2e-4, schedule=LrSchedule.constant, warmup_steps=0)
    assert {lr_at(s, cfg, 50) for s in range(50)} == {2e-4}


@pytest.mark.parametrize(("L", "B"), [(8, 2), (16, 4), (24, 8), (32, 32)])
@pytest.mark.parametrize("clean", list(CleanAttention))
def test_attention_pair_counts_equal_the_mask(L, B, clean):
    dense = masks.dense(masks.block_diffusion(L, B, clean), 2 * L, 2 * L)
    assert block_diffusion_pairs(L, B, clean) == int(dense.sum())
    assert causal_pairs(L) == int(masks.dense(masks.causal(), L, L).sum())


def test_forward_flops_by_hand():
    cfg = tiny_model(
        hidden_size=8,
        ffn_hidden_size=16,
        num_attention_heads=2,
        num_query_groups=1,
        vocab_size=128,
        kv_channels=4,
    )
    tokens, pairs = 10, 30
    # Per layer: q (8x8), k and v (8x4 each, 64 together), out (8x8): 2*10*(64+64+64); MLP 2*10*3*8*16;
    # attention 2 heads * (QK^T + PV) = 2*2*2*4*30. Head: 2*10*8*128.
    per_layer = 2 * 10 * (64 + 64 + 64) + 2 * 10 * 3 * 8 * 16 + 2 * 2 * 2 * 4 * 30
    assert forward_flops(cfg, tokens, pairs) == {"layers": 2 * per_layer, "head": 2 * 10 * 8 * 128}
    forward = 2 * per_layer + 2 * 10 * 8 * 128
    assert training_flops_per_sample(cfg, tokens, pairs) == 3 * forward
    assert training_flops_per_sample(cfg, tokens, pairs, Recompute.full) == 3 * forward + 2 * per_layer


def test_joint_objective_costs_about_twice_ar_in_gemms():
    cfg = tiny_model(
        num_layers=4, hidden_size=256, ffn_hidden_size=704, num_query_groups=None, vocab_size=4096
    )
    L, B = 128, 16
    costs = {}
    for kind in (ObjectiveKind.ar, ObjectiveKind.joint):
        objective = build_objective(ObjectiveConfig(kind=kind, block_size=B))
        sequence, pairs = objective.sequence_length(L), objective.attention_pairs(L)
        costs[kind] = training_flops_per_sample(cfg, sequence, pairs)
    assert costs[ObjectiveKind.ar] == training_flops_per_sample(cfg, L, causal_pairs(L))
    assert 1.9 < costs[ObjectiveKind.joint] / costs[ObjectiveKind.ar] < 2.2


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA GB200", 2.5e15),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_the_peak_is_the_named_gpus_own(name, peak):
    assert gpu_peak_flops(name) == peak
    assert gpu_peak_flops(name, fp8=True) == (None if peak is None else 2 * peak)
