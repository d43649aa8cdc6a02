"""Attention-mask predicates, defined once for training, decoding and the exported model.

A predicate has flex-attention's ``mask_mod`` signature ``(b, h, q_idx, kv_idx) -> bool tensor``
and returns True where query ``q_idx`` MAY attend to key ``kv_idx``. Indices are absolute
positions in the sequence the keys live in (a KV cache included); ``shifted`` adapts a predicate
to a query tensor that starts at a later position. Every realisation (the dense boolean masks of
SDPA here, the flex BlockMasks in ``tandem_kernels.flex``, the copy shipped with the Hugging Face export)
is computed from these functions. This module imports nothing but torch so that it can be copied
verbatim into the export folder.

The joint training sequence is ``[x_t ; x_0]`` of length 2n (noisy copy first, clean copy second);
the block of an index is ``(index mod n) // block_size`` (Nemotron-Labs-Diffusion, BD3-LM Alg. 1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CleanAttention(enum.Enum):
    """How the clean half of the training sequence attends to itself."""

    causal = "causal"  # token-causal: the clean half is an exact causal LM (Nemotron-Labs-Diffusion)
    block_causal = "block_causal"  # bidirectional inside a block, causal across blocks (BD3-LM, SDAR)


def _named(mask_mod: MaskMod, name: str) -> MaskMod:
    # Only data-independent predicates get a cache key: tandem_kernels.flex builds their BlockMask once.
    mask_mod.__name__ = name
    mask_mod.cache_key = name
    return mask_mod


def cache_key(mask_mod: MaskMod) -> str | None:
    """The stable name of a data-independent predicate; None for data-dependent ones."""
    return getattr(mask_mod, "cache_key", None)


def causal() -> MaskMod:
    """Token-causal attention: key position <= query position."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return _named(mask_mod, "causal")


def bidirectional() -> MaskMod:
    """Every query sees every key."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    return _named(mask_mod, "bidirectional")


def block_diffusion(seq_len: int, block_size: int, clean: CleanAttention = CleanAttention.causal) -> MaskMod:
    """The joint training mask over ``[x_t ; x_0]`` (length ``2 * seq_len``).

    - noisy -> noisy: same block only (bidirectional inside the block);
    - noisy -> clean: clean blocks strictly earlier than the query's block (never its own);
    - clean -> clean: token-causal (``CleanAttention.causal``) or block-causal;
    - clean -> noisy: never.
    """
    if seq_len % block_size:
        raise ValueError(f"seq_len={seq_len} must be a multiple of block_size={block_size}")
    n = seq_len

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean, kv_clean = q_idx >= n, kv_idx >= n
        q_pos = torch.where(q_clean, q_idx - n, q_idx)
        kv_pos = torch.where(kv_clean, kv_idx - n, kv_idx)
        q_block, kv_block = q_pos // block_size, kv_pos // block_size
        noisy_same_block = ~q_clean & ~kv_clean & (q_block == kv_block)
        noisy_sees_earlier_clean = ~q_clean & kv_clean & (kv_block < q_block)
        if clean is CleanAttention.causal:
            clean_sees_clean = q_clean & kv_clean & (kv_pos <= q_pos)
        else:
            clean_sees_clean = q_clean & kv_clean & (kv_block <= q_block)
        return noisy_same_block | noisy_sees_earlier_clean | clean_sees_clean

    return _named(mask_mod, f"block_diffusion_n{seq_len}_b{block_size}_{clean.value}")


def block_decode(block_start: int) -> MaskMod:
    """Decoding a block bidirectionally over a causal prefix.

    Positions before ``block_start`` (prompt and committed blocks) are causal; every position from
    ``block_start`` on sees the whole prefix and the whole block, including later masked slots.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | ((q_idx >= block_start) & (kv_idx >= block_start))

    return _named(mask_mod, f"block_decode_s{block_start}")


def speculate_fused(block_start: int, block: int) -> MaskMod:
    """One pass that verifies a draft block and pre-drafts the next one for every outcome.

    Keys/queries from ``block_start`` on are laid out as the draft block (``block`` tokens, read
    causally: its AR logits verify the draft), then ``block`` pre-draft blocks of ``block`` slots each.
    Pre-draft block k is the next block as it would be drafted after keeping draft tokens 0..k: it
    sees the prefix before ``block_start``, draft tokens 0..k and itself (bidirectionally), nothing
    else. Positions before ``block_start`` are causal. (TiDAR's fused draft-and-verify layout.)
    Indices are slots of the pass, not RoPE positions: ``speculate_fused_positions`` gives those.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        q_rel, kv_rel = q_idx - block_start, kv_idx - block_start
        q_draft = q_rel >= block  # a pre-draft query
        kept = torch.div(q_rel - block, block, rounding_mode="floor")  # its k
        plain = (kv_idx <= q_idx) & ~q_draft  # prefix and draft block: causal
        from_draft = q_draft & (kv_rel <= kept)  # the prefix and draft tokens 0..k
        same_block = (
            q_draft & (kv_rel >= block) & (torch.div(kv_rel - block, block, rounding_mode="floor") == kept)
        )
        return plain | from_draft | same_block

    return _named(mask_mod, f"speculate_fused_s{block_start}_b{block}")


def speculate_fused_positions(
    block_start: int, block: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """RoPE positions of ``speculate_fused``'s slots from ``block_start`` on: the draft block at
    ``block_start + i``; slot j of pre-draft block k right after draft token k, at
    ``block_start + k + 1 + j``."""
    slots = torch.arange(block, device=device)
    predraft = (slots[:, None] + 1 + slots[None, :]).flatten()
    return block_start + torch.cat([slots, predraft])


def same_document(document_ids: torch.Tensor) -> MaskMod:
    """Tokens attend only inside their own document. ``document_ids``: [B, S] over the key sequence
    (for ``[x_t ; x_0]`` pass the ids of both halves concatenated)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return mask_mod


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """Intersection of predicates; named when all parts are."""
    if not mask_mods:
        raise ValueError("and_masks needs at least one predicate")

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = mask_mods[0](b, h, q_idx, kv_idx)
        for other in mask_mods[1:]:
            allowed = allowed & other(b, h, q_idx, kv_idx)
        return allowed

    keys = [cache_key(m) for m in mask_mods]
    if all(keys):
        return _named(mask_mod, "&".join(keys))
    return mask_mod


def shifted(mask_mod: MaskMod, q_offset: int) -> MaskMod:
    """The predicate for a query tensor whose first row is absolute position ``q_offset``."""
    if q_offset == 0:
        return mask_mod

    def shifted_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_offset, kv_idx)

    key = cache_key(mask_mod)
    return _named(shifted_mod, f"{key}@q{q_offset}") if key else shifted_mod


def dense(
    mask_mod: MaskMod,
    q_len: int,
    kv_len: int,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Evaluate a predicate on the whole grid: a bool mask [B, 1, q_len, kv_len] (True = attend).

    The predicate is called once with broadcast index tensors, so the batch dimension stays 1 when
    it does not depend on ``b``; SDPA broadcasts it."""
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q_idx = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    allowed = mask_mod(b, h, q_idx, kv_idx)
    return allowed.expand(allowed.shape[0], 1, q_len, kv_len)
