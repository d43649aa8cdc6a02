"""Model configs to and from Hugging Face ``config.json``: Tandem's NLD export, and the causal LMs
Tandem imports (Llama, Mistral, Ministral-3, Qwen3, and Nemotron-Labs-Diffusion itself)."""

from __future__ import annotations

from typing import Protocol

from model.config import ConfigError, Dtype, ModelConfig, RopeConfig, RopeType
from tandem_kernels.masks import CleanAttention
from tandem_kernels.noise import MaskingKind

# The weight dtypes an export is written or loaded in, by their Hugging Face names ("bfloat16", ...).
HF_DTYPES = {str(dtype.torch).removeprefix("torch."): dtype.torch for dtype in Dtype}
ARCHITECTURE = "NemotronLabsDiffusionModel"
MODEL_TYPE = "nemotron_labs_diffusion"
AUTO_MAP = {
    "AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
    "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel",
}
# model_type -> what it is; all share the Llama layout (model.* + lm_head) except NLD (encoder.*).
IMPORTABLE = {
    "llama": "Llama",
    "mistral": "Mistral",
    "ministral": "Ministral",
    "ministral3": "Ministral-3",
    "qwen3": "Qwen3",
    MODEL_TYPE: "Nemotron-Labs-Diffusion",
}


# The options of tandem_noise.Masking an export records (its kind as ``kind``, its block size as
# ``block_size``); the objective's fields of the same names.
MASKING_OPTIONS = ("eps", "t_min", "t_max", "resample", "half_life_ratio", "drafter_fraction")


class Objective(Protocol):
    """What an export records of the objective its checkpoint trained with (an ``ObjectiveConfig``)."""

    block_size: int
    clean_attention: CleanAttention
    ar_weight: float
    diffusion_weight: float
    masking: MaskingKind
    eps: float
    t_min: float
    t_max: float
    resample: bool
    half_life_ratio: float
    drafter_fraction: float


def nld_config(
    model: ModelConfig,
    objective: Objective,
    *,
    mask_token_id: int,
    eos_token_id: int | None,
    bos_token_id: int | None,
    pad_token_id: int | None,
    dtype: str,
) -> dict:
    """The ``config.json`` of an export of a model trained with ``objective``."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_parameters": nld_rope_parameters(model),
        "qk_layernorm": model.qk_layernorm,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "attn_implementation": "sdpa",
        "sliding_window": None,
        "dp_varying_mask_ratio": False,
        "tie_word_embeddings": False,
        "initializer_range": model.init_method_std,
        "mask_token_id": mask_token_id,
        "block_size": objective.block_size,
        "dlm_paradigm": "bidirectional",
        "clean_attention": objective.clean_attention.value,
        "dlm_loss_weight": objective.diffusion_weight,
        "ar_loss_weight": objective.ar_weight,
        # The noise of the export's training call: the trainer's own.
        "masking": {"kind": objective.masking.value, **{k: getattr(objective, k) for k in MASKING_OPTIONS}},
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
    }


def nld_objective(hf: dict) -> dict:
    """The objective an NLD ``config.json`` records, as ``ObjectiveConfig`` field values (the inverse
    of ``nld_config``). It is read through the export's own configuration class, so a key the file
    leaves out means what it means to the export's code: NLD's choices."""
    from model.hf.configuration_nemotron_labs_diffusion import NemotronLabsDiffusionConfig

    config = NemotronLabsDiffusionConfig(**hf)
    noise = config.noise()
    return {
        "block_size": config.block_size,
        "clean_attention": CleanAttention(config.clean_attention),
        "ar_weight": config.ar_loss_weight,
        "diffusion_weight": config.dlm_loss_weight,
        "masking": noise.kind,
        **{name: getattr(noise, name) for name in MASKING_OPTIONS},
    }


def nld_rope_parameters(model: ModelConfig) -> dict:
    """``rope_parameters`` with every key NLD's code reads: it divides by
    ``original_max_position_embeddings`` and scales queries by ``llama_4_scaling_beta``, so a model
    without long-context scaling gets the values that mean none (beta 0, the model's own context)."""
    params = model.rope.to_hf()
    params.setdefault("llama_4_scaling_beta", 0.0)
    params.setdefault("original_max_position_embeddings", model.max_position_embeddings)
    return params


def _rope(hf: dict) -> RopeConfig:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in {t.value for t in RopeType}:
        raise ConfigError(f"rope_type {kind!r} is not supported (default, llama3, yarn)")
    values = {k: params[k] for k in RopeConfig.scaling_fields() if params.get(k) is not None}
    if not values.get("llama_4_scaling_beta"):  # 0 (an NLD export without long-context scaling): none
        values.pop("llama_4_scaling_beta", None)
    if kind == "default":  # the key NLD's code needs means nothing for plain RoPE
        values.pop("original_max_position_embeddings", None)
    if kind == "yarn" and "original_max_position_embeddings" not in values:
        values["original_max_position_embeddings"] = hf.get("original_max_position_embeddings")
    return RopeConfig(rope_type=RopeType(kind), rope_theta=float(theta), **values)


def model_from_hf(hf: dict, name: str) -> ModelConfig:
    """A ModelConfig for a Hugging Face ``config.json`` dict of an importable architecture."""
    model_type = hf.get("model_type")
    if model_type not in IMPORTABLE:
        raise ConfigError(
            f"model_type {model_type!r} cannot be imported; supported: {', '.join(sorted(IMPORTABLE))}"
        )
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        value = hf.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.json {key}={value!r}: expected a positive integer")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{model_type} with linear biases is not supported (Tandem's layers have none)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
    cfg = ModelConfig(
        name=name,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_epsilon=hf.get("rms_norm_eps", 1e-5),
        qk_layernorm=model_type == "qwen3" or bool(hf.get("qk_layernorm", False)),
        rope=_rope(hf),
        init_method_std=hf.get("initializer_range", 0.02),
    )
    cfg.validate()
    return cfg
