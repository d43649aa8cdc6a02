"""Tandem's core attention for megatron.core's ``core_attention`` slot: RoPE inside, mask per call.

megatron.core hands the core attention query/key/value after the QKV projection (and QK-norm) and
before the output projection. What a forward pass attends to comes in ``AttentionInputs``, Tandem's
own type: the rotary tables of explicit per-token positions (both halves of ``[x_t ; x_0]`` use
0..L-1) and the mask, realised for the backend chosen once per model (``AttentionRealiser``): a dense
boolean mask for SDPA, or a flex ``BlockMask``. megatron.core carries it from ``GPTModel.forward``
(``extra_block_kwargs={"attention_bias": ...}``) to every layer's core attention untouched, also
through activation recompute, which saves only tensors and passes this argument by closure.

Legend: B batch, N heads, G key/value groups, S sequence, H head_dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.flex_attention import BlockMask

from model import rope
from model.config import AttentionBackend, ConfigError, ModelConfig
from tandem_kernels import flex, masks
from tandem_kernels.masks import MaskMod


@dataclass(frozen=True)
class DenseMask:
    """A boolean mask [B|1, 1, S, S] (True = may attend) for scaled_dot_product_attention."""

    allowed: torch.Tensor

    def attend(self, q_BNSH, k_BGSH, v_BGSH, scale: float | None, dropout_p: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q_BNSH,
            k_BGSH,
            v_BGSH,
            attn_mask=self.allowed,
            dropout_p=dropout_p,
            scale=scale,
            enable_gqa=k_BGSH.shape[1] != q_BNSH.shape[1],
        )


@dataclass(frozen=True)
class FlexMask:
    """A flex-attention BlockMask: only the allowed blocks are computed."""

    block_mask: BlockMask

    def attend(self, q_BNSH, k_BGSH, v_BGSH, scale: float | None, dropout_p: float) -> torch.Tensor:
        return flex.attention(q_BNSH, k_BGSH, v_BGSH, self.block_mask, scale=scale)


@dataclass(frozen=True)
class Rotary:
    cos: torch.Tensor  # [B, 1, S, H]
    sin: torch.Tensor  # [B, 1, S, H]
    query_scale: torch.Tensor | None  # [B, 1, S, 1] (Llama-4 scaling) or None


@dataclass(frozen=True)
class AttentionInputs:
    """What one forward pass attends to; made by ``AttentionRealiser``."""

    mask: DenseMask | FlexMask
    rotary: Rotary


@functools.lru_cache(maxsize=16)
def _inverse_frequencies(head_dim: int, rope_items: tuple) -> tuple[torch.Tensor, float]:
    return rope.inverse_frequencies(head_dim, dict(rope_items))


def rotary_tables(config: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> Rotary:
    """The rotary tables of ``position_ids`` [B, S], on their device."""
    params = config.rope.to_hf()
    inv_freq, attention_factor = _inverse_frequencies(config.head_dim, tuple(sorted(params.items())))
    cos, sin = rope.cos_sin(position_ids, inv_freq, attention_factor, dtype)
    scale = None
    if config.rope.llama_4_scaling_beta is not None:
        scale = rope.query_scale(
            position_ids, config.rope.llama_4_scaling_beta, config.rope.original_max_position_embeddings
        ).to(dtype)
    return Rotary(cos, sin, scale)


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


@dataclass(frozen=True)
class AttentionRealiser:
    """Turns "what may attend to what" (a predicate of ``tandem_kernels.masks``) into the mask of the
    model's backend (``model.megatron.Backends``, decided once per model) and adds the rotary tables."""

    config: ModelConfig
    backend: AttentionBackend  # resolved: flex or sdpa
    dtype: torch.dtype = torch.float32  # of the rotary tables (the model's compute dtype)

    def __call__(self, position_ids: torch.Tensor, predicate: MaskMod, per_sample: bool) -> AttentionInputs:
        """The mask of ``predicate`` and the rotary tables of ``position_ids`` [B, S], on the device of
        ``position_ids``. ``per_sample``: the predicate reads per-row data (document ids), so the mask
        has a batch dimension; otherwise one mask serves all rows (and flex builds its BlockMask once
        per shape)."""
        batch, S = position_ids.shape
        device = position_ids.device
        if self.backend is AttentionBackend.flex:
            rows = batch if per_sample else None
            mask = FlexMask(flex.block_mask(predicate, S, S, batch_size=rows, device=device))
        else:
            rows = batch if per_sample else 1
            mask = DenseMask(masks.dense(predicate, S, S, batch_size=rows, device=device))
        return AttentionInputs(mask, rotary_tables(self.config, position_ids, self.dtype))


class CoreAttention(MegatronModule):
    """The mask's attention (SDPA or flex) after rotary embedding."""

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
        attention_bias: AttentionInputs | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if not isinstance(attention_bias, AttentionInputs):
            raise TypeError(
                "Tandem's CoreAttention needs model.attention.AttentionInputs: call the model through "
                "model.megatron.forward (or pass extra_block_kwargs={'attention_bias': inputs})"
            )
        inputs = attention_bias
        rotary = inputs.rotary
        q_BNSH, k_BGSH, v_BGSH = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        q_BNSH = rope.rotate(q_BNSH, rotary.cos, rotary.sin)
        k_BGSH = rope.rotate(k_BGSH, rotary.cos, rotary.sin)
        if rotary.query_scale is not None:
            q_BNSH = q_BNSH * rotary.query_scale
        dropout_p = self.dropout_p if self.training else 0.0
        out_BNSH = inputs.mask.attend(q_BNSH, k_BGSH, v_BGSH, self.softmax_scale, dropout_p)
        S, B = query.shape[:2]
        return out_BNSH.permute(2, 0, 1, 3).reshape(S, B, -1)  # [S, B, N*H]
