"""Rotary position embeddings from explicit per-token positions.

Both halves of the joint training sequence ``[x_t ; x_0]`` carry positions 0..L-1, so positions are
given per token rather than derived from the index. Parameters are the Hugging Face
``rope_parameters`` dict (rope_type default / llama3 / yarn), which keeps training, the exported model
and ``transformers`` in agreement. Rotation is the half-split (non-interleaved) form used by
Llama/Mistral and megatron.core's default. Imports nothing but torch: it is copied into the export.

Legend: B batch, N heads, S sequence, H head_dim.
"""

from __future__ import annotations

import math

import torch


def _yarn(head_dim: int, params: dict) -> tuple[torch.Tensor, float]:
    # YaRN, Peng et al. 2023 ("YaRN: Efficient Context Window Extension"), Sec. 3.2-3.4.
    base, factor = params["rope_theta"], params["factor"]
    original = params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast") or 32.0, params.get("beta_slow") or 1.0

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = math.floor(correction_dim(beta_fast)), math.ceil(correction_dim(beta_slow))
    if params.get("truncate", True) is False:
        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, float(attention_factor)


def _llama3(head_dim: int, params: dict) -> torch.Tensor:
    # Llama 3.1 frequency-dependent scaling (Meta, "The Llama 3 Herd of Models", Sec. 3.3).
    inv_freq = 1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    factor, original = params["factor"], params["original_max_position_embeddings"]
    low_freq_wavelen = original / params["low_freq_factor"]
    high_freq_wavelen = original / params["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - params["low_freq_factor"]) / (
        params["high_freq_factor"] - params["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def inverse_frequencies(head_dim: int, params: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq [H/2], attention_factor) for a ``rope_parameters`` dict."""
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / params["rope_theta"] ** exponents, 1.0
    if rope_type == "llama3":
        return _llama3(head_dim, params), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, params)
    raise ValueError(f"rope_type={rope_type!r} is not supported; allowed: default, llama3, yarn")


def cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, S, H] for integer positions [B, S], computed in fp32 then cast."""
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # [B, S, H/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, S, H]
    cos = (angles.cos() * attention_factor).to(dtype)
    sin = (angles.sin() * attention_factor).to(dtype)
    return cos[:, None], sin[:, None]


def query_scale(
    position_ids: torch.Tensor, beta: float, original_max_position_embeddings: int
) -> torch.Tensor:
    """Llama-4 / Ministral-3 long-context query scale [B, 1, S, 1]."""
    positions = position_ids.to(torch.float32)
    scale = 1 + beta * torch.log(1 + torch.floor(positions / original_max_position_embeddings))
    return scale[:, None, :, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation to x [B, N, S, H] (half-split pairs)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return x * cos + rotated_half * sin
