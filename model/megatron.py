"""Build a megatron.core GPTModel from Tandem's typed config. The only module that makes Megatron models.

Conventions fixed here:
- Tandem's ``CoreAttention`` fills the layer spec's core-attention slot; megatron's own rotary
  embedding is off (``position_embedding_type="none"``) because RoPE runs inside it on explicit
  per-token positions, and megatron's ``attention_mask`` argument is unused: a model is called
  through ``forward``, which hands it ``AttentionInputs`` (mask, True = may attend, and rotary tables).
- The backends are decided once per model (``Backends``): Transformer Engine layers when
  ``transformer_impl`` asks for them (or ``auto`` and TE imports on a CUDA machine), megatron.core's
  local layers otherwise (both save the same dist-checkpoint keys); flex attention on CUDA, dense SDPA
  elsewhere (``model.attention_backend``).
- The embedding is padded to ``ModelConfig.padded_vocab_size``, independent of the TP size.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from model.attention import AttentionInputs, CoreAttention, resolve_backend
from model.config import (
    AttentionBackend,
    ConfigError,
    Dtype,
    Fp8Recipe,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    Recompute,
    TransformerImpl,
)


@functools.cache
def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (it needs CUDA); never raises."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _apex_wgrad_fusion_available() -> bool:
    # megatron's own ColumnParallelLinear (the output layer) refuses gradient_accumulation_fusion
    # without apex's fused_weight_gradient_mlp_cuda, even when Transformer Engine is installed.
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.transformer_impl is TransformerImpl.local:
        return False
    if model.transformer_impl is TransformerImpl.transformer_engine:
        if not transformer_engine_available():
            raise ConfigError(
                "model.transformer_impl=transformer_engine but Transformer Engine does not import here "
                "(it needs CUDA and `pip install -e .[gpu]`); use model.transformer_impl=local or auto"
            )
        return True
    return transformer_engine_available()


@dataclass(frozen=True)
class Backends:
    """How a model computes, decided once from its config and device: Transformer Engine or
    megatron.core's local layers, and flex or dense-SDPA attention."""

    transformer_engine: bool
    attention: AttentionBackend  # flex or sdpa, never auto

    @classmethod
    def resolve(cls, model: ModelConfig, device: torch.device | None = None) -> Backends:
        """``device``: where the model runs (default: the GPU when there is one, else the CPU)."""
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(use_transformer_engine(model), resolve_backend(model.attention_backend, device))

    def notice(self, model: ModelConfig) -> str:
        """One line saying which layers, optimizer and attention a run gets, and why."""
        attention = f"attention: {self.attention.value}"
        if self.transformer_engine:
            return f"layers: Transformer Engine; {attention}"
        if model.transformer_impl is TransformerImpl.local:
            reason = "model.transformer_impl=local"
        elif not torch.cuda.is_available():
            reason = "no CUDA"
        else:
            reason = "Transformer Engine not installed (pip install -e .[gpu])"
        return f"layers: megatron.core local modules and torch AdamW ({reason}); {attention}"


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, backends: Backends
) -> TransformerConfig:
    """Translate Tandem's config into megatron.core's TransformerConfig."""
    dtype = precision.dtype.torch
    on_gpu = torch.cuda.is_available()
    te = backends.transformer_engine
    if precision.fp8 is not Fp8Recipe.none and not te:
        raise ConfigError(
            f"precision.fp8={precision.fp8.value} needs Transformer Engine on a CUDA machine "
            "(model.transformer_impl=transformer_engine or auto with TE installed)"
        )
    fp8 = {}
    if precision.fp8 is not Fp8Recipe.none:
        fp8 = dict(
            fp8=precision.fp8_format.value,
            fp8_recipe=precision.fp8.value,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            first_last_layers_bf16=precision.fp8_bf16_first_last_layers > 0,
            num_layers_at_start_in_bf16=max(precision.fp8_bf16_first_last_layers, 1),
            num_layers_at_end_in_bf16=max(precision.fp8_bf16_first_last_layers, 1),
        )
    recompute = {}
    if parallel.recompute is Recompute.selective:
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif parallel.recompute is Recompute.full:
        recompute = dict(
            recompute_granularity="full",
            recompute_method=parallel.recompute_method.value,
            recompute_num_layers=parallel.recompute_num_layers,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        qk_layernorm=model.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.dtype is Dtype.bf16,
        fp16=precision.dtype is Dtype.fp16,
        # Random init on CPU draws the full weight and slices it, so any TP size starts from the
        # same weights (tested TP=2 == TP=1); on GPU each rank draws its shard from megatron's RNG.
        use_cpu_initialization=not on_gpu,
        # These fusions need apex or Transformer Engine kernels.
        gradient_accumulation_fusion=te and _apex_wgrad_fusion_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        **recompute,
        **fp8,
    )


def layer_spec(model: ModelConfig, backends: Backends) -> ModuleSpec:
    """megatron.core's GPT layer spec with Tandem's CoreAttention in the core-attention slot."""
    if backends.transformer_engine:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    attention.submodules.core_attention = CoreAttention
    return spec


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    backends: Backends | None = None,
    vp_stage: int | None = None,
    meta: bool = False,
) -> GPTModel:
    """One pipeline stage (or virtual stage ``vp_stage``) of the model on this rank, computing as
    ``backends`` says (default: resolved for this machine).

    Needs megatron's process groups (``parallel_state.initialize_model_parallel``). Logits stay split
    over the tensor-parallel group (the loss is vocab-parallel); pass ``runtime_gather_output=True``
    to ``forward`` for whole logits. ``meta``: on the meta device, never on a GPU: every key, shape
    and checkpoint offset of the model and no memory (weight conversion builds its checkpoint on it)."""
    model.validate()
    parallel.validate()
    precision.validate()
    backends = backends or Backends.resolve(model)
    config = transformer_config(model, parallel, precision, backends)
    if meta:
        config.use_cpu_initialization = True  # megatron's CPU initialisation honours a device context
    pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    with torch.device("meta") if meta else contextlib.nullcontext():
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(model, backends),
            vocab_size=model.padded_vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="none",
            vp_stage=vp_stage,
        )
    if meta or not torch.cuda.is_available():
        return gpt
    return gpt.cuda(torch.cuda.current_device())


def forward(
    gpt, tokens: torch.Tensor, position_ids: torch.Tensor, attention: AttentionInputs, labels=None, **kwargs
) -> torch.Tensor:
    """``gpt`` (a GPTModel, or one wrapped by DDP / Float16Module) on ``tokens`` [B, S] at RoPE
    ``position_ids`` [B, S], attending as ``attention`` says: the per-token cross-entropy [B, S] against
    ``labels``, else the logits [B, S, V / TP] (``runtime_gather_output=True``: all of V). On a later
    pipeline stage: the stage's hidden states."""
    return gpt(
        tokens, position_ids, None, labels=labels, extra_block_kwargs={"attention_bias": attention}, **kwargs
    )
