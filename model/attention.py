"""Tandem's core attention for megatron.core's ``core_attention`` slot: RoPE inside, mask per call.

megatron.core hands the core attention query/key/value after the QKV projection (and QK-norm) and
before the output projection. Per-batch attention data travels in ``AttentionInputs``, a
``PackedSeqParams`` with ``qkv_format="sbhd"``: megatron passes that object untouched from
``GPTModel.forward`` to every layer's core attention, also through activation recompute, where only
tensors may be saved. It carries:

- the rotary tables for explicit per-token positions (both halves of ``[x_t ; x_0]`` use 0..L-1),
- the mask: a dense bool tensor (True = may attend; SDPA) or a flex ``BlockMask``.

Legend: B batch, N heads, G key/value groups, S sequence, H head_dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.flex_attention import BlockMask

from model import rope
from model.config import AttentionBackend, ConfigError, ModelConfig
from tandem_kernels import flex, masks
from tandem_kernels.masks import MaskMod


@dataclass
class AttentionInputs(PackedSeqParams):
    """Per-forward attention data; build it with ``attention_inputs``."""

    mask: torch.Tensor | BlockMask | None = None  # [B|1, 1, S, S] bool (True = attend) or BlockMask
    cos: torch.Tensor | None = None  # [B, 1, S, H]
    sin: torch.Tensor | None = None  # [B, 1, S, H]
    query_scale: torch.Tensor | None = None  # [B, 1, S, 1] (Llama-4 scaling) or None

    def __post_init__(self):
        if self.qkv_format is None:
            self.qkv_format = "sbhd"


@functools.lru_cache(maxsize=16)
def _inverse_frequencies(head_dim: int, rope_items: tuple) -> tuple[torch.Tensor, float]:
    return rope.inverse_frequencies(head_dim, dict(rope_items))


def attention_inputs(
    config: ModelConfig,
    position_ids: torch.Tensor,
    mask: torch.Tensor | BlockMask,
    dtype: torch.dtype = torch.float32,
) -> AttentionInputs:
    """Rotary tables for ``position_ids`` [B, S] plus the mask, ready for ``GPTModel.forward``."""
    params = config.rope.to_hf()
    inv_freq, attention_factor = _inverse_frequencies(config.head_dim, tuple(sorted(params.items())))
    cos, sin = rope.cos_sin(position_ids, inv_freq, attention_factor, dtype)
    scale = None
    if config.rope.llama_4_scaling_beta is not None:
        scale = rope.query_scale(
            position_ids, config.rope.llama_4_scaling_beta, config.rope.original_max_position_embeddings
        ).to(dtype)
    return AttentionInputs(mask=mask, cos=cos, sin=sin, query_scale=scale)


def resolve_backend(backend: AttentionBackend, device: torch.device) -> AttentionBackend:
    """The attention backend for a model on ``device``: ``auto`` is flex on CUDA, dense SDPA elsewhere."""
    if backend is AttentionBackend.auto:
        return AttentionBackend.flex if device.type == "cuda" else AttentionBackend.sdpa
    if backend is AttentionBackend.flex and device.type != "cuda":
        raise ConfigError(
            "model.attention_backend=flex cannot train on CPU (flex attention has no CPU backward); "
            "use model.attention_backend=sdpa or auto"
        )
    return backend


def realise(
    config: ModelConfig,
    position_ids: torch.Tensor,
    predicate: MaskMod,
    backend: AttentionBackend,
    per_sample: bool,
    dtype: torch.dtype = torch.float32,
) -> AttentionInputs:
    """The mask of ``predicate`` and the rotary tables of ``position_ids`` [B, S], on the device of
    ``position_ids`` (the model's, after ``ModelInputs.to``). ``per_sample``: the predicate reads
    per-row data (document ids), so the mask has a batch dimension; otherwise one mask serves all rows
    (and flex builds its BlockMask once per shape)."""
    batch, S = position_ids.shape
    device = position_ids.device
    if backend is AttentionBackend.flex:
        mask = flex.block_mask(predicate, S, S, batch_size=batch if per_sample else None, device=device)
    else:
        mask = masks.dense(predicate, S, S, batch_size=batch if per_sample else 1, device=device)
    return attention_inputs(config, position_ids, mask, dtype)


class CoreAttention(MegatronModule):
    """SDPA over a dense mask or flex attention over a BlockMask, after rotary embedding."""

    def __init__(
        self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self", **_: Any
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.dropout_p = config.attention_dropout
        self.softmax_scale = config.softmax_scale

    def forward(
        self,
        query: torch.Tensor,  # [S, B, N, H]
        key: torch.Tensor,  # [S, B, G, H]
        value: torch.Tensor,  # [S, B, G, H]
        attention_mask: Any = None,
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: AttentionInputs | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if not isinstance(packed_seq_params, AttentionInputs):
            raise TypeError(
                "Tandem's CoreAttention needs model.attention.AttentionInputs passed to GPTModel.forward "
                "as packed_seq_params (rotary tables and mask); build it with attention_inputs()"
            )
        inputs = packed_seq_params
        q_BNSH, k_BGSH, v_BGSH = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        q_BNSH = rope.rotate(q_BNSH, inputs.cos, inputs.sin)
        k_BGSH = rope.rotate(k_BGSH, inputs.cos, inputs.sin)
        if inputs.query_scale is not None:
            q_BNSH = q_BNSH * inputs.query_scale
        if isinstance(inputs.mask, BlockMask):
            out_BNSH = flex.attention(q_BNSH, k_BGSH, v_BGSH, inputs.mask, scale=self.softmax_scale)
        else:
            out_BNSH = F.scaled_dot_product_attention(
                q_BNSH,
                k_BGSH,
                v_BGSH,
                attn_mask=inputs.mask,
                dropout_p=self.dropout_p if self.training else 0.0,
                scale=self.softmax_scale,
                enable_gqa=k_BGSH.shape[1] != q_BNSH.shape[1],
            )
        S, B = query.shape[:2]
        return out_BNSH.permute(2, 0, 1, 3).reshape(S, B, -1)  # [S, B, N*H]
