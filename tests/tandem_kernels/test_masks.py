"""The mask predicates: golden pictures, properties over many shapes, and realisations that agree."""

import itertools

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from tandem_kernels import flex, masks
from tandem_kernels.masks import CleanAttention

# research/algorithms.md section 2.3, L = 6, B = 2 (t = noisy copy, c = clean copy; 1 = may attend).
NLD_PICTURE = """
1 1 . . . . . . . . . .
1 1 . . . . . . . . . .
. . 1 1 . . 1 1 . . . .
. . 1 1 . . 1 1 . . . .
. . . . 1 1 1 1 1 1 . .
. . . . 1 1 1 1 1 1 . .
. . . . . . 1 . . . . .
. . . . . . 1 1 . . . .
. . . . . . 1 1 1 . . .
. . . . . . 1 1 1 1 . .
. . . . . . 1 1 1 1 1 .
. . . . . . 1 1 1 1 1 1
"""
BD3_PICTURE = """
1 1 . . . . . . . . . .
1 1 . . . . . . . . . .
. . 1 1 . . 1 1 . . . .
. . 1 1 . . 1 1 . . . .
. . . . 1 1 1 1 1 1 . .
. . . . 1 1 1 1 1 1 . .
. . . . . . 1 1 . . . .
. . . . . . 1 1 . . . .
. . . . . . 1 1 1 1 . .
. . . . . . 1 1 1 1 . .
. . . . . . 1 1 1 1 1 1
. . . . . . 1 1 1 1 1 1
"""


def picture(text: str) -> torch.Tensor:
    rows = [line.split() for line in text.strip().splitlines()]
    return torch.tensor([[cell == "1" for cell in row] for row in rows])


def dense2d(mask_mod, q_len, kv_len=None):
    return masks.dense(mask_mod, q_len, kv_len or q_len)[0, 0]


@pytest.mark.parametrize(
    ("clean", "expected"), [(CleanAttention.causal, NLD_PICTURE), (CleanAttention.block_causal, BD3_PICTURE)]
)
def test_training_mask_matches_the_published_picture(clean, expected):
    assert torch.equal(dense2d(masks.block_diffusion(6, 2, clean), 12), picture(expected))


SHAPES = [(L, B) for L, B in itertools.product([1, 2, 4, 6, 8, 12, 16, 24], [1, 2, 3, 4, 8]) if L % B == 0]


@pytest.mark.parametrize(("L", "B"), SHAPES)
@pytest.mark.parametrize("clean", list(CleanAttention))
def test_training_mask_properties(L, B, clean):
    m = dense2d(masks.block_diffusion(L, B, clean), 2 * L)
    pos = torch.arange(L)
    block = pos // B
    noisy_to_noisy, noisy_to_clean = m[:L, :L], m[:L, L:]
    clean_to_noisy, clean_to_clean = m[L:, :L], m[L:, L:]
    # A noisy token never sees its own clean block or anything later: no answer leakage.
    assert not (noisy_to_clean & (block[None, :] >= block[:, None])).any()
    # ...and sees every strictly earlier clean block.
    assert torch.equal(noisy_to_clean, block[None, :] < block[:, None])
    # Noisy tokens see exactly their own noisy block, bidirectionally.
    assert torch.equal(noisy_to_noisy, block[None, :] == block[:, None])
    # The clean half never reads noisy tokens.
    assert not clean_to_noisy.any()
    if clean is CleanAttention.causal:
        assert torch.equal(clean_to_clean, torch.ones(L, L, dtype=torch.bool).tril())
    else:
        assert torch.equal(clean_to_clean, block[None, :] <= block[:, None])


def test_block_size_one_makes_the_block_causal_clean_half_token_causal():
    L = 7
    m = dense2d(masks.block_diffusion(L, 1, CleanAttention.block_causal), 2 * L)
    assert torch.equal(m[L:, L:], torch.ones(L, L, dtype=torch.bool).tril())


def test_one_block_makes_the_noisy_half_fully_bidirectional():
    L = 8
    m = dense2d(masks.block_diffusion(L, L), 2 * L)
    assert m[:L, :L].all() and not m[:L, L:].any()


def test_seq_len_must_be_a_multiple_of_the_block_size():
    with pytest.raises(ValueError, match="multiple of block_size"):
        masks.block_diffusion(10, 4)


def random_documents(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.rand(batch, length, generator=generator) < 0.2
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)


@pytest.mark.parametrize(("L", "B"), [(8, 2), (12, 4), (16, 4), (24, 8)])
def test_no_token_sees_another_document(L, B):
    generator = torch.Generator().manual_seed(L * 100 + B)
    docs = random_documents(3, L, generator)
    doubled = torch.cat([docs, docs], dim=1)
    mod = masks.and_masks(masks.block_diffusion(L, B), masks.same_document(doubled))
    m = masks.dense(mod, 2 * L, 2 * L, batch_size=3)[:, 0]
    same_doc = doubled[:, :, None] == doubled[:, None, :]
    assert not (m & ~same_doc).any()
    # Inside a document the rules are unchanged.
    plain = dense2d(masks.block_diffusion(L, B), 2 * L)
    assert torch.equal(m, plain[None] & same_doc)


def test_causal_document_mask_is_block_diagonal_causal():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    m = masks.dense(masks.and_masks(masks.causal(), masks.same_document(docs)), 8, 8)[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for lo, hi in [(0, 3), (3, 5), (5, 8)]:
        expected[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(m, expected)


def test_block_decode_is_causal_before_the_block_and_bidirectional_inside():
    P, B = 5, 3
    m = dense2d(masks.block_decode(P), P + B)
    assert torch.equal(m[:P, :P], torch.ones(P, P, dtype=torch.bool).tril())
    assert not m[:P, P:].any()
    assert m[P:, :].all()


def test_shifted_predicate_matches_the_rows_of_the_full_grid():
    P, B = 6, 4
    full = dense2d(masks.block_decode(P), P + B)
    rows = masks.dense(masks.shifted(masks.block_decode(P), P), B, P + B)[0, 0]
    assert torch.equal(rows, full[P:])
    causal_rows = masks.dense(masks.shifted(masks.causal(), P), B, P + B)[0, 0]
    assert torch.equal(causal_rows, dense2d(masks.causal(), P + B)[P:])


# Fused draft-and-verify pass after a prefix of 2: draft block d0 d1 (causal), then pre-draft block
# k=0 (after d0) and k=1 (after d0 d1), each bidirectional inside itself.
FUSED_PICTURE = """
1 . . . . . . .
1 1 . . . . . .
1 1 1 . . . . .
1 1 1 1 . . . .
1 1 1 . 1 1 . .
1 1 1 . 1 1 . .
1 1 1 1 . . 1 1
1 1 1 1 . . 1 1
"""


def test_fused_speculation_mask_matches_its_picture_and_positions():
    assert torch.equal(dense2d(masks.speculate_fused(2, 2), 8), picture(FUSED_PICTURE))
    # d0 d1 at 2 3; pre-draft k=0 at 3 4 (right after d0), k=1 at 4 5.
    assert masks.speculate_fused_positions(2, 2).tolist() == [2, 3, 3, 4, 4, 5]


@pytest.mark.parametrize("P,D", [(0, 2), (1, 3), (5, 4), (3, 8)])
def test_each_fused_pre_draft_block_sees_what_a_separate_draft_pass_would(P, D):
    m = dense2d(masks.speculate_fused(P, D), P + D + D * D)
    assert torch.equal(m[: P + D, : P + D], dense2d(masks.causal(), P + D))  # prefix + draft: causal
    assert not m[: P + D, P + D :].any()  # nothing sees a pre-draft
    for k in range(D):
        rows = m[P + D + k * D : P + D + (k + 1) * D]
        # A separate pass over prefix + d0..dk + D masks (block_decode) lets each mask see exactly these.
        separate = dense2d(masks.block_decode(P + k + 1), P + k + 1 + D)[P + k + 1 :]
        assert torch.equal(rows[:, : P + k + 1], separate[:, : P + k + 1])
        assert not rows[:, P + k + 1 : P + D].any()
        own = torch.zeros(D * D, dtype=torch.bool)
        own[k * D : (k + 1) * D] = True
        assert torch.equal(rows[:, P + D :], own.expand(D, -1))


@pytest.mark.parametrize(
    "mask_mod",
    [
        masks.speculate_fused(3, 3),
        masks.causal(),
        masks.block_diffusion(8, 4),
        masks.block_diffusion(8, 2, CleanAttention.block_causal),
        masks.block_decode(5),
    ],
    ids=lambda m: m.__name__,
)
def test_dense_equals_torch_create_mask(mask_mod):
    n = 16
    ours = masks.dense(mask_mod, n, n)
    reference = create_mask(mask_mod, 1, 1, n, n, device="cpu")
    assert torch.equal(ours, reference)


def test_dense_document_mask_equals_torch_create_mask():
    docs = random_documents(2, 12, torch.Generator().manual_seed(3))
    mod = masks.and_masks(masks.causal(), masks.same_document(docs))
    assert torch.equal(masks.dense(mod, 12, 12, batch_size=2), create_mask(mod, 2, 1, 12, 12, device="cpu"))


def test_only_data_independent_predicates_get_a_cache_key():
    assert masks.cache_key(masks.block_diffusion(8, 4)) == "block_diffusion_n8_b4_causal"
    assert masks.cache_key(masks.same_document(torch.zeros(1, 4, dtype=torch.long))) is None
    docs = masks.same_document(torch.zeros(1, 4, dtype=torch.long))
    assert masks.cache_key(masks.and_masks(masks.causal(), docs)) is None


@pytest.mark.parametrize(("L", "B"), [(64, 16), (96, 32)])
def test_flex_block_mask_forward_equals_dense_sdpa(L, B):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2 * L, 16) for _ in range(3))
    mod = masks.block_diffusion(L, B)
    dense_mask = masks.dense(mod, 2 * L, 2 * L)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
    out = flex.attention(q, k, v, flex.block_mask(mod, 2 * L, 2 * L))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_is_built_once_per_shape():
    mod = masks.block_diffusion(32, 8)
    assert flex.block_mask(mod, 64, 64) is flex.block_mask(masks.block_diffusion(32, 8), 64, 64)


def test_flex_gqa_and_document_mask_forward_equals_dense_sdpa():
    torch.manual_seed(1)
    L = 40
    docs = random_documents(2, L, torch.Generator().manual_seed(5))
    mod = masks.and_masks(masks.causal(), masks.same_document(docs))
    q = torch.randn(2, 4, L, 8)
    k, v = torch.randn(2, 2, L, 8), torch.randn(2, 2, L, 8)
    dense_mask = masks.dense(mod, L, L, batch_size=2)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask, enable_gqa=True
    )
    out = flex_attention(q, k, v, block_mask=flex.block_mask(mod, L, L, batch_size=2), enable_gqa=True)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
