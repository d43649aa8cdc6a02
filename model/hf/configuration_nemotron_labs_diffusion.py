"""Configuration of a Tandem export in the Nemotron-Labs-Diffusion (NLD) format (Tandem's own code).

The field names follow the published NLD config (``mask_token_id``, ``block_size``, ``dlm_paradigm``,
``dlm_loss_weight``, ``ar_loss_weight``, ``rope_parameters``, GQA fields, an untied head); Tandem adds
``qk_layernorm`` (Qwen3-style models), ``clean_attention`` (how the clean half of the training
sequence attends to itself: "causal" as in NLD, or "block_causal" as in BD3-LM) and ``masking`` (the
noise of the training call: ``kind`` and the other fields of ``tandem_noise.Masking`` but its block
size, which is ``block_size``). What a config leaves out means what it means in NLD.
"""

from dataclasses import fields

from transformers import PretrainedConfig

from .tandem_noise import Masking, MaskingKind

DLM_PARADIGMS = ("bidirectional", "autoregressive", "block_diff")
# NLD's weight of the diffusion loss, for a config that leaves it out (or null).
DLM_LOSS_WEIGHT = 0.3
# NLD's noise: one level per sequence; every other option at ``Masking``'s default (eps 1e-3, t in [0, 1]).
NLD_MASKING = {"kind": MaskingKind.sequence.value}


class NemotronLabsDiffusionConfig(PretrainedConfig):
    model_type = "nemotron_labs_diffusion"

    def __init__(
        self,
        vocab_size: int = 131072,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 34,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        head_dim: int | None = 128,
        max_position_embeddings: int = 262144,
        rms_norm_eps: float = 1e-5,
        rope_parameters: dict | None = None,
        qk_layernorm: bool = False,
        mask_token_id: int = 100,
        block_size: int = 32,
        dlm_paradigm: str = "bidirectional",
        clean_attention: str = "causal",
        dlm_loss_weight: float | None = DLM_LOSS_WEIGHT,
        ar_loss_weight: float = 1.0,
        masking: dict | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if dlm_paradigm not in DLM_PARADIGMS:
            raise ValueError(f"dlm_paradigm={dlm_paradigm!r}; allowed: {', '.join(DLM_PARADIGMS)}")
        if clean_attention not in ("causal", "block_causal"):
            raise ValueError(f"clean_attention={clean_attention!r}; allowed: causal, block_causal")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        # NLD's code reads these for every RoPE type (an export without long-context scaling writes the
        # values that mean none); transformers would call them unknown keys of plain RoPE.
        self.ignore_keys_at_rope_validation = {"llama_4_scaling_beta"}
        if self.rope_parameters.get("rope_type", "default") == "default":
            self.ignore_keys_at_rope_validation.add("original_max_position_embeddings")
        self.qk_layernorm = qk_layernorm
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.dlm_paradigm = dlm_paradigm
        self.clean_attention = clean_attention
        self.dlm_loss_weight = DLM_LOSS_WEIGHT if dlm_loss_weight is None else dlm_loss_weight
        self.ar_loss_weight = ar_loss_weight
        self.masking = {**NLD_MASKING, **(masking or {})}
        self.noise()  # a bad masking kind or option fails here, naming it
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def noise(self) -> Masking:
        """The noise scheme of the training call, as the trainer builds it from its objective."""
        options = dict(self.masking)
        kind = options.pop("kind")
        kinds = [k.value for k in MaskingKind]
        others = [f.name for f in fields(Masking) if f.name not in ("kind", "block_size")]
        if kind not in kinds or not set(options) <= set(others):
            raise ValueError(
                f"masking={self.masking}: kind is one of {', '.join(kinds)}; the other keys are among "
                f"{', '.join(others)}"
            )
        return Masking(kind=MaskingKind(kind), block_size=self.block_size, **options)
