"""Training objectives: what the model is fed and how each token's cross-entropy is weighted.

An objective answers what only it knows: how long the model sequence of a sample of L tokens is
(``sequence_length``: L, or 2L for ``[x_t ; x_0]``), what may attend to what over it (``predicate``)
and how many (query, key) pairs that allows (``attention_pairs``, for FLOPs), and, per batch, how the
tokens are supervised. It turns a data batch into ``ModelInputs``: the token sequence, its positions,
the label of every position, the attention predicate (and the document ids it is restricted by), and
named ``LossTerm``s (per-token weights and a scale) whose supervised tokens normalise the loss. The
batch and the objective's work stay on the CPU (the data side); ``ModelInputs.to(device)`` is the one
place where all of it moves to the model's device, where the model side realises the mask and rotary
tables from the moved tensors.
The model's vocab-parallel cross-entropy over all positions is then reduced the same way for every
objective (``reduce``):

    loss = sum_k scale_k * sum_i w_k[i] * CE[i]      normalised by  sum_k #supervised_k

which for ``Joint`` is Nemotron-Labs-Diffusion's ``(1.0 * sum AR CE + 0.3 * sum masked CE / p) /
(#masked + #AR)``; megatron.core divides by the token count summed over the global batch.

Legend: B batch, L clean length, S model sequence (L or 2L).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Protocol

import torch

from model.config import ConfigError
from tandem_kernels import masks
from tandem_kernels.masks import CleanAttention, MaskMod
from tandem_kernels.noise import Masking, MaskingKind
from train.flops import block_diffusion_pairs, causal_pairs


class ObjectiveKind(enum.Enum):
    ar = "ar"  # plain causal LM over the clean sequence (length L)
    diffusion = "diffusion"  # block diffusion: only the noisy half of [x_t ; x_0] carries loss
    joint = "joint"  # AR loss on the clean half + diffusion loss on the noisy half, one forward


@dataclass
class ObjectiveConfig:
    kind: ObjectiveKind = ObjectiveKind.joint
    # Tokens per diffusion block (32 at inference in Nemotron-Labs-Diffusion, 64 in its joint recipe).
    block_size: int = 32
    # Clean-half self-attention: token-causal (NLD; the clean half is an AR LM) or block-causal (BD3-LM).
    clean_attention: CleanAttention = CleanAttention.causal
    ar_weight: float = 1.0
    diffusion_weight: float = 0.3
    # The [MASK] token id; None -> the tokenizer's mask token.
    mask_token_id: int | None = None
    # Minimum masking probability: p = (1 - eps) * t + eps, t ~ U(t_min, t_max).
    eps: float = Masking.eps
    # sequence: one t per sequence (NLD); block: one t per block (BD3-LM); position: later positions
    # masked more (Efficient-DLM); full: everything masked, p = 1 (one-pass drafter, TiDAR).
    masking: MaskingKind = MaskingKind.sequence
    # Clipped noise levels (BD3-LM); with resample, units whose realised mask rate falls outside
    # [t_min, t_max] are drawn again.
    t_min: float = Masking.t_min
    t_max: float = Masking.t_max
    resample: bool = Masking.resample
    # position masking: the mask weight halves every half_life_ratio * block_size positions.
    half_life_ratio: float = Masking.half_life_ratio
    # Fraction of sequences whose noisy copy is fully masked (trains one-pass drafting).
    drafter_fraction: float = Masking.drafter_fraction

    def validate(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"objective.block_size={self.block_size} must be >= 1")
        if not 0 < self.eps < 1:
            raise ConfigError(f"objective.eps={self.eps} must be in (0, 1)")
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ConfigError(
                f"objective.t_min={self.t_min} and objective.t_max={self.t_max} must satisfy "
                "0 <= t_min < t_max <= 1"
            )
        if not 0 <= self.drafter_fraction <= 1:
            raise ConfigError(f"objective.drafter_fraction={self.drafter_fraction} must be in [0, 1]")
        if self.half_life_ratio <= 0:
            raise ConfigError(f"objective.half_life_ratio={self.half_life_ratio} must be positive")
        if self.ar_weight < 0 or self.diffusion_weight < 0:
            raise ConfigError(
                f"objective.ar_weight={self.ar_weight} and objective.diffusion_weight="
                f"{self.diffusion_weight} must be >= 0"
            )


class Batch(Protocol):
    tokens: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, next token
    loss_mask: torch.Tensor  # [B, L] float
    position_ids: torch.Tensor  # [B, L] long
    document_ids: torch.Tensor | None  # [B, L] long, or None when documents are not separated


@dataclass
class LossTerm:
    weights: torch.Tensor  # [B, S] float; 0 where the term does not supervise
    scale: float

    @property
    def count(self) -> torch.Tensor:
        return (self.weights > 0).sum()


@dataclass
class ModelInputs:
    tokens: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S]
    mask_mod: MaskMod  # the objective's attention predicate over S (True = may attend), data-independent
    # With packed documents: the document of every position [B, S]; attention stays inside it.
    document_ids: torch.Tensor | None = None
    terms: dict[str, LossTerm] = field(default_factory=dict)
    # Diffusion bookkeeping for metrics: the masked positions, and how many tokens could be masked.
    masked: torch.Tensor | None = None  # [B, S] bool
    maskable: torch.Tensor | None = None  # scalar

    @property
    def per_sample_mask(self) -> bool:
        """True when the mask differs between rows of the batch (document masks)."""
        return self.document_ids is not None

    def predicate(self) -> MaskMod:
        """The whole attention predicate, reading the document ids where they are (their device)."""
        if self.document_ids is None:
            return self.mask_mod
        return masks.and_masks(self.mask_mod, masks.same_document(self.document_ids))

    def to(self, device: torch.device) -> ModelInputs:
        """Every tensor on ``device``: the one boundary between the data side and the model."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            tokens=move(self.tokens),
            position_ids=move(self.position_ids),
            labels=move(self.labels),
            document_ids=move(self.document_ids),
            terms={name: LossTerm(move(term.weights), term.scale) for name, term in self.terms.items()},
            masked=move(self.masked),
            maskable=move(self.maskable),
        )


@dataclass
class Reduced:
    loss_sum: torch.Tensor  # scalar, sum_k scale_k * sum(w_k * CE)
    num_tokens: torch.Tensor  # scalar int, sum_k #supervised_k
    sums: dict[str, torch.Tensor]  # per term: sum(w_k * CE), detached
    counts: dict[str, torch.Tensor]  # per term: #supervised_k
    masked_ce_sum: torch.Tensor | None = None  # sum of CE over masked positions (unweighted), detached


def reduce(per_token_ce: torch.Tensor, inputs: ModelInputs) -> Reduced:
    """Reduce the per-token cross-entropy [B, S] with the objective's terms."""
    ce = per_token_ce.float()
    loss_sum = ce.new_zeros(())
    sums, counts = {}, {}
    for name, term in inputs.terms.items():
        # where(), not multiplication: a non-finite CE at an unsupervised position must not leak in.
        weighted = torch.where(term.weights > 0, ce * term.weights, torch.zeros_like(ce)).sum()
        loss_sum = loss_sum + term.scale * weighted
        sums[name] = weighted.detach()
        counts[name] = term.count
    num_tokens = sum(counts.values(), torch.zeros((), dtype=torch.long, device=ce.device))
    masked_ce = None
    if inputs.masked is not None:
        masked_ce = torch.where(inputs.masked, ce, torch.zeros_like(ce)).sum().detach()
    return Reduced(loss_sum, num_tokens, sums, counts, masked_ce)


def _documents(document_ids: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    """Document ids over the model sequence (``copies`` halves of the clean length)."""
    return None if document_ids is None else torch.cat([document_ids] * copies, dim=1)


class CausalLM:
    """Plain next-token prediction over the clean sequence (length L)."""

    def __init__(self, ar_weight: float = 1.0):
        self.ar_weight = ar_weight

    def sequence_length(self, L: int) -> int:
        return L

    def predicate(self, L: int) -> MaskMod:
        return masks.causal()

    def attention_pairs(self, L: int) -> int:
        return causal_pairs(L)

    def prepare(self, batch: Batch, generators: list[torch.Generator]) -> ModelInputs:
        return ModelInputs(
            tokens=batch.tokens,
            position_ids=batch.position_ids,
            labels=batch.labels,
            mask_mod=self.predicate(batch.tokens.shape[1]),
            document_ids=_documents(batch.document_ids, copies=1),
            terms={"ar": LossTerm(batch.loss_mask.float(), self.ar_weight)},
        )


class BlockDiffusion:
    """Masked block diffusion over ``[x_t ; x_0]`` (length 2L): loss on the masked noisy tokens only.

    The noisy half predicts the token at the same position (no shift), weighted 1/p; the clean half
    only provides keys and values for later blocks."""

    def __init__(
        self,
        masking: Masking,
        mask_token_id: int | None,
        block_size: int,
        clean_attention: CleanAttention = CleanAttention.causal,
        diffusion_weight: float = 1.0,
    ):
        self.masking = masking
        self.mask_token_id = mask_token_id  # None: the objective can size a run but not prepare batches
        self.block_size = block_size
        self.clean_attention = clean_attention
        self.diffusion_weight = diffusion_weight

    def sequence_length(self, L: int) -> int:
        return 2 * L

    def predicate(self, L: int) -> MaskMod:
        return masks.block_diffusion(L, self.block_size, self.clean_attention)

    def attention_pairs(self, L: int) -> int:
        return block_diffusion_pairs(L, self.block_size, self.clean_attention)

    def clean_terms(self, batch: Batch) -> dict[str, LossTerm]:
        """Loss terms on the clean half (none: it carries no loss here)."""
        return {}

    def prepare(self, batch: Batch, generators: list[torch.Generator]) -> ModelInputs:
        """``generators``: one per row of the batch, the only source of the mask's randomness."""
        if self.mask_token_id is None:
            raise ValueError("the diffusion objective needs the mask token id to prepare a batch")
        tokens, L = batch.tokens, batch.tokens.shape[1]
        masked, p = self.masking(batch.loss_mask, generators)
        masked, p = masked.to(tokens.device), p.to(tokens.device)
        noisy = torch.where(masked, torch.full_like(tokens, self.mask_token_id), tokens)
        no_loss = torch.zeros_like(batch.loss_mask, dtype=torch.float32)
        diffusion_weights = torch.where(masked, 1.0 / p, torch.zeros_like(p))
        terms = {"diffusion": LossTerm(torch.cat([diffusion_weights, no_loss], dim=1), self.diffusion_weight)}
        terms.update(self.clean_terms(batch))
        return ModelInputs(
            tokens=torch.cat([noisy, tokens], dim=1),
            position_ids=torch.cat([batch.position_ids, batch.position_ids], dim=1),
            # Noisy half: the token at the same position. Clean half: the next token.
            labels=torch.cat([tokens, batch.labels], dim=1),
            mask_mod=self.predicate(L),
            document_ids=_documents(batch.document_ids, copies=2),
            terms=terms,
            masked=torch.cat([masked, torch.zeros_like(masked)], dim=1),
            maskable=(batch.loss_mask > 0).sum(),
        )


class Joint(BlockDiffusion):
    """Nemotron-Labs-Diffusion's joint objective: block diffusion on the noisy half and next-token
    prediction on the clean half, from the same forward pass."""

    def __init__(self, *args, ar_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ar_weight = ar_weight

    def clean_terms(self, batch: Batch) -> dict[str, LossTerm]:
        no_loss = torch.zeros_like(batch.loss_mask, dtype=torch.float32)
        return {"ar": LossTerm(torch.cat([no_loss, batch.loss_mask.float()], dim=1), self.ar_weight)}


def build_objective(cfg: ObjectiveConfig, mask_token_id: int | None = None) -> CausalLM | BlockDiffusion:
    """The objective named by ``cfg.kind``; without ``mask_token_id`` it answers the questions of
    sizing (sequence length, attention pairs, predicate) but prepares no batch."""
    if cfg.kind is ObjectiveKind.ar:
        return CausalLM(ar_weight=cfg.ar_weight)
    masking = Masking(
        kind=cfg.masking,
        block_size=cfg.block_size,
        eps=cfg.eps,
        t_min=cfg.t_min,
        t_max=cfg.t_max,
        resample=cfg.resample,
        half_life_ratio=cfg.half_life_ratio,
        drafter_fraction=cfg.drafter_fraction,
    )
    common = dict(
        masking=masking,
        mask_token_id=mask_token_id,
        block_size=cfg.block_size,
        clean_attention=cfg.clean_attention,
        diffusion_weight=cfg.diffusion_weight,
    )
    if cfg.kind is ObjectiveKind.diffusion:
        return BlockDiffusion(**common)
    return Joint(**common, ar_weight=cfg.ar_weight)
