"""Noise for the diffusion half: which clean tokens become [MASK], and with what probability p.

Every scheme returns ``(masked [B, L] bool, p [B, L] float)``; the diffusion loss weighs the
cross-entropy of a masked token by 1/p (MDLM / LLaDA linear schedule: Sahoo et al. 2024, Sec. 3;
Nie et al. 2025, Eq. 3). Tokens with ``loss_mask == 0`` are never masked. Randomness comes only from
one generator per sample, which the trainer seeds from the sample's global index (``mask_seed``).
Imports nothing but torch and the standard library, so that it can be copied verbatim into the export
folder, whose training forward draws its noise with it.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass

import torch


def mask_seed(seed: int, *parts) -> int:
    """A 63-bit generator seed for one sample's mask, from (seed, split, global sample index): the
    tensor- and pipeline-parallel ranks of a replica draw the same mask, data-parallel replicas (which
    hold other samples) different ones, any layout draws the same mask for the same sample, and a
    resumed run redraws exactly the masks it would have drawn."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MaskingKind(enum.Enum):
    sequence = "sequence"  # one t ~ U(t_min, t_max) per sequence, i.i.d. masking (NLD, LLaDA)
    block = "block"  # one t per block (BD3-LM), lower gradient variance
    position = "position"  # per-block rate, later positions masked more often (Efficient-DLM)
    full = "full"  # every supervised token masked, p = 1 (TiDAR-style one-step drafter)


@dataclass(frozen=True)
class Masking:
    """A masking scheme; build with ``make_masking``."""

    kind: MaskingKind
    block_size: int
    eps: float = 1e-3
    # Clipped noise (BD3-LM Sec. 5.2): t ~ U(t_min, t_max); with `resample`, units whose realised
    # mask fraction falls outside [t_min, t_max] are drawn again (up to 8 times).
    t_min: float = 0.0
    t_max: float = 1.0
    resample: bool = False
    # Position-dependent masking: the mask weight halves every half_life_ratio * block_size positions.
    half_life_ratio: float = 0.25
    # Probability that a whole sequence is fully masked instead (trains one-pass drafting).
    drafter_fraction: float = 0.0

    def __call__(
        self, loss_mask: torch.Tensor, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for a batch [B, L]; row i draws only from ``generators[i]``, so a sample's mask does
        not depend on which micro-batch or data-parallel rank it lands on."""
        if len(generators) != loss_mask.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {loss_mask.shape[0]} rows")
        rows = [self._row(loss_mask[i : i + 1], g) for i, g in enumerate(generators)]
        return torch.cat([m for m, _ in rows]), torch.cat([p for _, p in rows])

    def _row(self, loss_mask: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        maskable = loss_mask > 0
        if self.kind is MaskingKind.full:
            masked, p = maskable.clone(), torch.ones(loss_mask.shape, dtype=torch.float32)
        elif self.kind is MaskingKind.position:
            masked, p = self._position_dependent(maskable, generator)
        else:
            masked, p = self._iid(maskable, generator)
        if self.drafter_fraction > 0:
            draft = torch.rand(loss_mask.shape[0], 1, generator=generator) < self.drafter_fraction
            masked = torch.where(draft, maskable, masked)
            p = torch.where(draft, torch.ones_like(p), p)
        return masked & maskable, p

    def _noise_levels(self, count: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(count, generator=generator)
        return (1 - self.eps) * t + self.eps

    def _iid(self, maskable: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = maskable.shape
        unit = length if self.kind is MaskingKind.sequence else self.block_size
        units = length // unit
        p_units = self._noise_levels((batch, units), generator)  # [B, U]
        draws = torch.rand(batch, units, unit, generator=generator)
        masked = draws < p_units[..., None]
        if self.resample and (self.t_min > 0 or self.t_max < 1):
            for _ in range(8):
                fraction = masked.float().mean(dim=-1)
                bad = (fraction < self.t_min) | (fraction > self.t_max)
                if not bad.any():
                    break
                fresh_p = self._noise_levels((batch, units), generator)
                fresh = torch.rand(batch, units, unit, generator=generator) < fresh_p[..., None]
                masked = torch.where(bad[..., None], fresh, masked)
                p_units = torch.where(bad, fresh_p, p_units)
        p = p_units[..., None].expand(batch, units, unit).reshape(batch, length)
        return masked.reshape(batch, length), p

    def _position_dependent(
        self, maskable: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Per block: rate m ~ U(eps, 1), exactly round(m * B) masks chosen by Gumbel-top-k over
        # log-weights lambda * (1 - m) * offset, lambda = ln 2 / (half_life_ratio * B): at small m
        # the few masks sit late in the block, at m -> 1 they spread uniformly.
        batch, length = maskable.shape
        B = self.block_size
        blocks = length // B
        m = self._noise_levels((batch, blocks), generator)  # [B, nb]
        k = torch.round(m * B).clamp(min=1).long()
        lam = math.log(2) / (self.half_life_ratio * B)
        offsets = torch.arange(B, dtype=torch.float32)
        log_weights = lam * (1 - m)[..., None] * offsets  # [B, nb, B]
        uniform = torch.rand(batch, blocks, B, generator=generator).clamp_(1e-20, 1.0)
        keys = log_weights - torch.log(-torch.log(uniform))
        ranks = keys.argsort(dim=-1, descending=True).argsort(dim=-1)
        masked = ranks < k[..., None]
        p = m[..., None].expand(batch, blocks, B).reshape(batch, length)
        return masked.reshape(batch, length), p
