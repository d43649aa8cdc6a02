"""The model's typed knobs: architecture, parallel layout and numeric precision.

Field names follow megatron.core's TransformerConfig where one exists, so ``model.megatron`` reads as
a one-to-one translation. ``validate()`` methods raise ``ConfigError`` naming the offending key; the
cross-group checks (heads vs tensor parallelism, ...) live in ``train.config.TrainConfig.validate``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

import torch
from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


class RopeType(enum.Enum):
    default = "default"  # plain RoPE with base theta
    llama3 = "llama3"  # Llama-3.1 frequency scaling
    yarn = "yarn"  # YaRN (Peng et al., 2023), as in Ministral-3 / Nemotron-Labs-Diffusion


class AttentionBackend(enum.Enum):
    auto = "auto"  # flex attention on CUDA, dense-mask SDPA on CPU
    flex = "flex"  # flex attention with a BlockMask (forward only on CPU)
    sdpa = "sdpa"  # scaled_dot_product_attention with a dense boolean mask


class TransformerImpl(enum.Enum):
    auto = "auto"  # Transformer Engine layers when it imports, else megatron.core's local layers
    local = "local"
    transformer_engine = "transformer_engine"


@dataclass
class RopeConfig:
    """Rotary embedding; field names match Hugging Face ``rope_parameters``."""

    rope_type: RopeType = RopeType.default
    rope_theta: float = 10000.0
    # llama3 and yarn: context extension factor.
    factor: float | None = None
    # llama3 and yarn: the context length the base model was trained at.
    original_max_position_embeddings: int | None = None
    # llama3 only.
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # yarn only.
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # Query scaling 1 + beta * log(1 + floor(pos / original_max_position_embeddings)) (Llama 4,
    # Ministral-3); None disables it.
    llama_4_scaling_beta: float | None = None

    def validate(self, prefix: str = "model.rope") -> None:
        needs = {
            RopeType.default: [],
            RopeType.llama3: [
                "factor",
                "original_max_position_embeddings",
                "low_freq_factor",
                "high_freq_factor",
            ],
            RopeType.yarn: ["factor", "original_max_position_embeddings"],
        }[self.rope_type]
        for name in needs:
            if getattr(self, name) is None:
                raise ConfigError(
                    f"{prefix}.{name} must be set for {prefix}.rope_type={self.rope_type.value}"
                )
        if self.rope_theta <= 0:
            raise ConfigError(f"{prefix}.rope_theta={self.rope_theta} must be positive")
        if self.llama_4_scaling_beta is not None and self.original_max_position_embeddings is None:
            raise ConfigError(
                f"{prefix}.llama_4_scaling_beta needs {prefix}.original_max_position_embeddings"
            )

    @classmethod
    def scaling_fields(cls) -> tuple[str, ...]:
        """The optional fields, shared with Hugging Face ``rope_parameters``."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("rope_type", "rope_theta"))

    def to_hf(self) -> dict:
        """The Hugging Face ``rope_parameters`` dict (keys that are None are left out)."""
        out = {"rope_type": self.rope_type.value, "rope_theta": self.rope_theta}
        out.update(
            {name: getattr(self, name) for name in self.scaling_fields() if getattr(self, name) is not None}
        )
        return out


@dataclass
class ModelConfig:
    """A decoder-only transformer: RMSNorm, SwiGLU, GQA, RoPE, no linear bias, untied output head."""

    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    # Key/value heads (GQA); None -> num_attention_heads (plain multi-head attention).
    num_query_groups: int | None = None
    # Per-head dimension; None -> hidden_size // num_attention_heads (needs divisibility).
    kv_channels: int | None = None
    # Tokenizer vocabulary; the embedding is padded to a multiple of make_vocab_size_divisible_by.
    vocab_size: int = MISSING
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    # RMSNorm on queries and keys per head before RoPE (Qwen3).
    qk_layernorm: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    init_method_std: float = 0.02
    attention_backend: AttentionBackend = AttentionBackend.auto
    transformer_impl: TransformerImpl = TransformerImpl.auto

    @property
    def head_dim(self) -> int:
        return (
            self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads
        )

    @property
    def query_groups(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        # Independent of the tensor-parallel size, so checkpoints reshard across TP without resizing.
        multiple = self.make_vocab_size_divisible_by
        return math.ceil(self.vocab_size / multiple) * multiple

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels "
                "(the per-head dimension) explicitly"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.kv_channels={self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_query_groups={self.query_groups}"
            )
        if self.make_vocab_size_divisible_by <= 0:
            raise ConfigError(
                f"model.make_vocab_size_divisible_by={self.make_vocab_size_divisible_by} must be positive"
            )
        self.rope.validate()


class Dtype(enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return {Dtype.fp32: torch.float32, Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}[self]


class Fp8Recipe(enum.Enum):
    none = "none"
    delayed = "delayed"  # delayed (amax-history) scaling, Hopper
    tensorwise = "tensorwise"  # current per-tensor scaling, Hopper
    mxfp8 = "mxfp8"  # MX block scaling, Blackwell (B200)
    blockwise = "blockwise"  # DeepSeek-style 1x128 / 128x128 blocks, Hopper


class Recompute(enum.Enum):
    none = "none"
    selective = "selective"  # recompute core attention only (cheap, frees the S x S activations)
    full = "full"  # recompute whole layers (recompute_method / recompute_num_layers)


class RecomputeMethod(enum.Enum):
    uniform = "uniform"  # checkpoint groups of recompute_num_layers layers
    block = "block"  # checkpoint the first recompute_num_layers layers of each pipeline stage


class Fp8Format(enum.Enum):
    e4m3 = "e4m3"
    hybrid = "hybrid"  # e4m3 forward, e5m2 gradients


@dataclass
class PrecisionConfig:
    # Compute and parameter dtype of the model (the optimizer keeps fp32 master weights).
    dtype: Dtype = Dtype.fp32
    # FP8 GEMMs through Transformer Engine (attention stays in bf16); needs dtype=bf16 and CUDA.
    fp8: Fp8Recipe = Fp8Recipe.none
    fp8_format: Fp8Format = Fp8Format.hybrid
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # Keep the first and last N layers in bf16 under FP8 (helps convergence at small scale).
    fp8_bf16_first_last_layers: int = 0
    grad_reduce_in_fp32: bool = True

    def validate(self) -> None:
        if self.fp8 is not Fp8Recipe.none and self.dtype is not Dtype.bf16:
            raise ConfigError(
                f"precision.fp8={self.fp8.value} needs precision.dtype=bf16 (got {self.dtype.value})"
            )
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            raise ConfigError(
                f"precision.fp8_amax_compute_algo={self.fp8_amax_compute_algo!r}; allowed: max, most_recent"
            )


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism is what remains of the world size."""

    tensor: int = 1
    pipeline: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B); None -> not interleaved.
    virtual_pipeline: int | None = None
    context: int = 1
    # Shard LayerNorm/dropout activations along the sequence across the tensor-parallel group.
    sequence_parallel: bool = False
    # Shard optimizer states across data-parallel ranks (ZeRO-1); GPU runs.
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Activation recompute trades compute for memory (the doubled sequence doubles activations).
    recompute: Recompute = Recompute.none
    recompute_method: RecomputeMethod = RecomputeMethod.uniform
    recompute_num_layers: int = 1

    def validate(self) -> None:
        for name in ("tensor", "pipeline", "context"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.context != 1:
            raise ConfigError(
                f"parallel.context={self.context}: context parallelism is not supported yet for the "
                "block-diffusion masks; use parallel.context=1"
            )
        if self.virtual_pipeline is not None and (self.virtual_pipeline < 1 or self.pipeline < 2):
            raise ConfigError(
                f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline >= 2 "
                "and a value >= 1 (or null)"
            )
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1")
        if self.recompute is Recompute.full and self.recompute_num_layers < 1:
            raise ConfigError(f"parallel.recompute_num_layers={self.recompute_num_layers} must be >= 1")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true")
