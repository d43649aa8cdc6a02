"""Objectives and masking against hand computations and an independent cross-entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tandem_kernels import masks
from tandem_kernels.masks import CleanAttention
from tandem_kernels.noise import Masking, MaskingKind, mask_seed
from tests.factories import tiny_model
from train.objectives import (
    BlockDiffusion,
    CausalLM,
    Joint,
    ObjectiveConfig,
    ObjectiveKind,
    build_objective,
    reduce,
)

MASK = 3


@dataclass
class HandBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor | None = None


def generators(rows: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(rows)]


def hand_batch() -> HandBatch:
    tokens = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    labels = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    return HandBatch(tokens, labels, loss_mask, torch.arange(4).expand(2, 4))


class FixedMasking:
    """Masks chosen by hand: row 0 masks positions 1 and 3 at p = 0.5; row 1 masks position 0 at p = 0.25."""

    masked = torch.tensor([[False, True, False, True], [True, False, False, False]])
    p = torch.tensor([[0.5] * 4, [0.25] * 4])

    def __call__(self, loss_mask, row_generators):
        return self.masked.clone(), self.p.clone()


def test_joint_inputs_are_noisy_then_clean_with_shared_positions():
    objective = Joint(FixedMasking(), mask_token_id=MASK, block_size=2, diffusion_weight=0.3, ar_weight=1.0)
    inputs = objective.prepare(hand_batch(), generators(2))
    assert inputs.tokens.tolist() == [
        [10, MASK, 12, MASK, 10, 11, 12, 13],
        [MASK, 21, 22, 23, 20, 21, 22, 23],
    ]
    assert inputs.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] * 2
    # Noisy half: the token at the same position; clean half: the next token.
    assert inputs.labels.tolist() == [[10, 11, 12, 13, 11, 12, 13, 14], [20, 21, 22, 23, 21, 22, 23, 24]]
    assert masks.cache_key(inputs.mask_mod) == "block_diffusion_n4_b2_causal"


def test_joint_loss_equals_the_hand_computation():
    objective = Joint(FixedMasking(), mask_token_id=MASK, block_size=2, diffusion_weight=0.3, ar_weight=1.0)
    inputs = objective.prepare(hand_batch(), generators(2))
    ce = torch.arange(16, dtype=torch.float32).view(2, 8) / 10 + 0.05  # a made-up per-token CE
    reduced = reduce(ce, inputs)
    # Diffusion: masked (0,1), (0,3) at p = 0.5 and (1,0) at p = 0.25, weighted 1/p.
    diffusion = ce[0, 1] / 0.5 + ce[0, 3] / 0.5 + ce[1, 0] / 0.25
    # AR: every clean position with loss_mask 1 (row 1, position 2 is excluded).
    ar = ce[0, 4:].sum() + ce[1, 4] + ce[1, 5] + ce[1, 7]
    n_masked, n_ar = 3, 7
    assert reduced.sums["diffusion"].item() == pytest.approx(diffusion.item())
    assert reduced.sums["ar"].item() == pytest.approx(ar.item())
    assert reduced.counts["diffusion"].item() == n_masked and reduced.counts["ar"].item() == n_ar
    assert reduced.num_tokens.item() == n_masked + n_ar
    expected = (1.0 * ar + 0.3 * diffusion) / (n_masked + n_ar)
    assert (reduced.loss_sum / reduced.num_tokens).item() == pytest.approx(expected.item())
    assert reduced.masked_ce_sum.item() == pytest.approx((ce[0, 1] + ce[0, 3] + ce[1, 0]).item())


def test_diffusion_objective_puts_no_loss_on_the_clean_half():
    objective = BlockDiffusion(FixedMasking(), mask_token_id=MASK, block_size=2)
    inputs = objective.prepare(hand_batch(), generators(2))
    assert set(inputs.terms) == {"diffusion"}
    assert not inputs.terms["diffusion"].weights[:, 4:].any()


def test_non_finite_ce_at_unsupervised_positions_does_not_leak_into_the_loss():
    objective = Joint(FixedMasking(), mask_token_id=MASK, block_size=2)
    inputs = objective.prepare(hand_batch(), generators(2))
    ce = torch.ones(2, 8)
    ce[0, 0] = float("nan")  # unmasked noisy position: no term supervises it
    ce[1, 6] = float("inf")  # loss_mask 0 on the clean half
    assert torch.isfinite(reduce(ce, inputs).loss_sum)


def test_document_ids_add_a_document_mask_over_both_halves():
    batch = hand_batch()
    batch.document_ids = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    inputs = Joint(FixedMasking(), mask_token_id=MASK, block_size=2).prepare(batch, generators(2))
    dense = masks.dense(inputs.predicate(), 8, 8, batch_size=2)[:, 0]
    # Row 0: noisy block 1 (doc 1) may not see clean block 0 (doc 0).
    assert not dense[0, 2:4, 4:6].any()
    assert dense[1, 2:4, 4:6].all()


# ---- through the real model: megatron's vocab-parallel CE vs torch's cross_entropy on full logits ----


def tiny_built_model():
    from model.config import ParallelConfig, PrecisionConfig
    from model.megatron import build_model

    # A vocabulary that needs no padding: megatron's cross-entropy runs over the padded vocabulary.
    cfg = tiny_model(vocab_size=128)
    torch.manual_seed(0)
    return cfg, build_model(cfg, ParallelConfig(), PrecisionConfig()).eval()


def model_outputs(cfg, model, inputs):
    from model.attention import AttentionRealiser
    from model.config import AttentionBackend
    from model.megatron import forward

    attention = AttentionRealiser(cfg, AttentionBackend.sdpa)(
        inputs.position_ids, inputs.predicate(), inputs.per_sample_mask
    )
    with torch.no_grad():
        per_token = forward(model, inputs.tokens, inputs.position_ids, attention, labels=inputs.labels)
        logits = forward(model, inputs.tokens, inputs.position_ids, attention, runtime_gather_output=True)
    return per_token, logits[..., : cfg.vocab_size]


def random_batch(vocab: int, batch: int = 2, length: int = 16) -> HandBatch:
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(4, vocab, (batch, length + 1), generator=g)
    return HandBatch(
        seq[:, :-1], seq[:, 1:], torch.ones(batch, length), torch.arange(length).expand(batch, length)
    )


def test_joint_loss_through_the_model_equals_an_independent_computation(megatron_single):
    cfg, model = tiny_built_model()
    batch = random_batch(cfg.vocab_size)
    masking = Masking(MaskingKind.sequence, block_size=4)
    objective = Joint(masking, mask_token_id=MASK, block_size=4, diffusion_weight=0.3, ar_weight=1.0)
    inputs = objective.prepare(batch, generators(2))
    per_token, logits = model_outputs(cfg, model, inputs)
    reduced = reduce(per_token, inputs)

    L = batch.tokens.shape[1]
    noisy_logits, clean_logits = logits[:, :L], logits[:, L:]
    masked = inputs.masked[:, :L]
    p = torch.where(masked, 1.0 / inputs.terms["diffusion"].weights[:, :L], torch.ones(2, L))
    diffusion = sum(
        F.cross_entropy(noisy_logits[b, i], batch.tokens[b, i]) / p[b, i]
        for b in range(2)
        for i in range(L)
        if masked[b, i]
    )
    ar = F.cross_entropy(clean_logits.reshape(-1, cfg.vocab_size), batch.labels.reshape(-1), reduction="sum")
    expected = (ar + 0.3 * diffusion) / (masked.sum() + 2 * L)
    torch.testing.assert_close(reduced.loss_sum / reduced.num_tokens, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reduced.sums["ar"], ar, atol=1e-4, rtol=1e-5)


def test_ar_objective_is_the_plain_causal_lm_loss(megatron_single):
    cfg, model = tiny_built_model()
    batch = random_batch(cfg.vocab_size)
    inputs = CausalLM().prepare(batch, generators(2))
    per_token, logits = model_outputs(cfg, model, inputs)
    reduced = reduce(per_token, inputs)
    expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch.labels.reshape(-1))
    torch.testing.assert_close(reduced.loss_sum / reduced.num_tokens, expected, atol=1e-5, rtol=1e-5)
    # ...and equals the clean half of the joint forward, which is the same causal model.
    joint = Joint(Masking(MaskingKind.sequence, block_size=4), mask_token_id=MASK, block_size=4)
    joint_inputs = joint.prepare(batch, generators(2, seed=1))
    joint_reduced = reduce(model_outputs(cfg, model, joint_inputs)[0], joint_inputs)
    torch.testing.assert_close(
        joint_reduced.sums["ar"] / joint_reduced.counts["ar"], expected, atol=1e-5, rtol=1e-5
    )


# ---- masking schemes ------------------------------------------------------------------------------


def test_sequence_masking_rate_follows_p_and_respects_the_loss_mask():
    masking = Masking(MaskingKind.sequence, block_size=8, eps=1e-3)
    loss_mask = torch.ones(512, 64)
    loss_mask[:, :8] = 0
    masked, p = masking(loss_mask, generators(512))
    assert not masked[:, :8].any()
    assert torch.all(p == p[:, :1])  # one p per sequence
    assert p.min() >= 1e-3 and p.max() <= 1
    realised = masked[:, 8:].float().mean(dim=1)
    assert (realised - p[:, 0]).abs().mean() < 0.06
    assert p[:, 0].mean().item() == pytest.approx(0.5, abs=0.05)  # t ~ U(0, 1)


def test_block_masking_draws_one_p_per_block():
    masking = Masking(MaskingKind.block, block_size=4)
    _, p = masking(torch.ones(8, 16), generators(8))
    blocks = p.view(8, 4, 4)
    assert torch.all(blocks == blocks[..., :1])
    assert blocks[..., 0].std() > 0.1


def test_clipped_masking_with_resampling_keeps_rates_in_range():
    masking = Masking(MaskingKind.block, block_size=16, t_min=0.3, t_max=0.8, resample=True)
    masked, p = masking(torch.ones(256, 64), generators(256))
    assert p.min() >= 0.3 * (1 - 1e-3) and p.max() <= 0.8
    rates = masked.view(256, 4, 16).float().mean(-1)
    assert ((rates >= 0.3) & (rates <= 0.8)).float().mean() > 0.97


def test_position_masking_masks_exact_counts_and_prefers_late_positions():
    masking = Masking(MaskingKind.position, block_size=8)
    masked, p = masking(torch.ones(4000, 8), generators(4000))
    k = torch.round(p[:, 0] * 8).clamp(min=1)
    assert torch.equal(masked.sum(1).float(), k)
    light = p[:, 0] < 0.3  # few masks: they should sit late in the block
    per_position = masked[light].float().mean(0)
    assert per_position[-1] > 2 * per_position[0]


def test_full_masking_and_drafter_fraction():
    loss_mask = torch.ones(1000, 8)
    masked, p = Masking(MaskingKind.full, block_size=4)(loss_mask, generators(1000))
    assert masked.all() and torch.all(p == 1)
    masked, p = Masking(MaskingKind.sequence, block_size=4, drafter_fraction=0.25)(
        loss_mask, generators(1000)
    )
    drafted = (p == 1).all(dim=1) & masked.all(dim=1)
    assert drafted.float().mean().item() == pytest.approx(0.25, abs=0.05)


def test_a_sample_mask_depends_only_on_its_own_generator():
    masking = Masking(MaskingKind.sequence, block_size=4)
    a = masking(torch.ones(4, 16), generators(4, seed=7))
    b = masking(torch.ones(4, 16), generators(4, seed=7))
    c = masking(torch.ones(4, 16), generators(4, seed=8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # Row 2 alone, in a batch of one, gets the same mask as inside the batch of four.
    alone = masking(torch.ones(1, 16), [generators(4, seed=7)[2]])
    assert torch.equal(alone[0][0], a[0][2]) and torch.equal(alone[1][0], a[1][2])


def test_mask_seed_is_a_function_of_the_sample():
    assert mask_seed(1, "train", 40) == mask_seed(1, "train", 40)  # every rank holding sample 40
    assert mask_seed(1, "train", 40) != mask_seed(1, "train", 41)  # another sample (another DP rank)
    assert mask_seed(1, "train", 40) != mask_seed(1, "valid", 40)
    assert mask_seed(1, "train", 40) != mask_seed(2, "train", 40)


def test_block_causal_clean_attention_is_passed_to_the_mask():
    objective = Joint(
        FixedMasking(), mask_token_id=MASK, block_size=2, clean_attention=CleanAttention.block_causal
    )
    inputs = objective.prepare(hand_batch(), generators(2))
    assert masks.cache_key(inputs.mask_mod) == "block_diffusion_n4_b2_block_causal"
    assert math.isclose(inputs.terms["ar"].scale, 1.0)


@pytest.mark.parametrize(
    "objective",
    [
        ObjectiveConfig(kind=ObjectiveKind.ar),
        ObjectiveConfig(kind=ObjectiveKind.joint, block_size=4),
        ObjectiveConfig(kind=ObjectiveKind.diffusion, block_size=8),
        ObjectiveConfig(kind=ObjectiveKind.joint, block_size=4, clean_attention=CleanAttention.block_causal),
    ],
    ids=["ar", "joint", "diffusion", "joint_block_causal"],
)
def test_an_objective_answers_its_sequence_predicate_and_pairs_as_its_batches_have_them(objective):
    """What the planner and the FLOP count ask the objective (no mask id, no batch) is what its prepared
    batches hold: the model sequence length, the predicate, and that predicate's allowed pairs."""
    L = 16
    sizing = build_objective(objective)
    inputs = build_objective(objective, mask_token_id=MASK).prepare(
        HandBatch(
            torch.arange(L)[None] + 10,
            torch.arange(L)[None] + 11,
            torch.ones(1, L),
            torch.arange(L)[None],
        ),
        generators(1),
    )
    S = sizing.sequence_length(L)
    assert inputs.tokens.shape == (1, S) == (1, L if objective.kind is ObjectiveKind.ar else 2 * L)
    predicate = masks.dense(sizing.predicate(L), S, S)
    assert torch.equal(predicate, masks.dense(inputs.mask_mod, S, S))
    assert sizing.attention_pairs(L) == int(predicate.sum())
    if objective.kind is not ObjectiveKind.ar:
        with pytest.raises(ValueError, match="needs the mask token id"):
            sizing.prepare(
                HandBatch(
                    inputs.tokens[:, :L], inputs.tokens[:, :L], torch.ones(1, L), torch.arange(L)[None]
                ),
                generators(1),
            )
