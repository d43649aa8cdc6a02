"""Flex-attention realisation of the predicates in ``tandem_kernels.masks``.

A BlockMask is built once per (predicate, shape, device) for data-independent predicates (the
training mask depends only on the sequence length and block size) and per batch for
data-dependent ones (document masks). On CUDA, ``flex_attention`` is compiled once; on CPU it runs
eagerly and supports the forward pass only, so CPU training uses the dense SDPA path instead.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tandem_kernels.masks import MaskMod, cache_key, shifted

_STATIC_CACHE: dict[tuple, BlockMask] = {}


def block_mask(
    mask_mod: MaskMod,
    q_len: int,
    kv_len: int,
    batch_size: int | None = None,
    q_offset: int = 0,
    device: torch.device | str = "cpu",
) -> BlockMask:
    """BlockMask for ``mask_mod`` over a [q_len, kv_len] grid whose first query sits at ``q_offset``.

    ``batch_size=None`` broadcasts one mask over the batch (predicates that ignore ``b``).
    Named (data-independent) predicates are cached, so the mask is built once per shape."""
    mask_mod = shifted(mask_mod, q_offset)
    key = None
    if cache_key(mask_mod):
        key = (cache_key(mask_mod), q_len, kv_len, batch_size, str(device))
        cached = _STATIC_CACHE.get(key)
        if cached is not None:
            return cached
    built = create_block_mask(mask_mod, batch_size, None, q_len, kv_len, device=device)
    if key is not None:
        _STATIC_CACHE[key] = built
    return built


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask, scale: float | None = None
) -> torch.Tensor:
    """flex_attention on [B, N, S, H] tensors (GQA allowed); compiled on CUDA, eager on CPU."""
    fn = _compiled_flex() if query.is_cuda else flex_attention
    return fn(query, key, value, block_mask=mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1])
