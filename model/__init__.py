"""The network: config, megatron.core model, attention, rotary embeddings, HF format (hf/), CPU support."""

import warnings

# megatron.core warns once per module at import when Transformer Engine or apex is missing; Tandem
# prints one line instead when it builds a model (model.megatron.Backends.notice).
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed.*")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
# megatron.core 0.19: get_megatron_optimizer imports its experimental MiMo model, which warns on import.
warnings.filterwarnings("ignore", message=r"MimoModelConfig is experimental")
# Selective recompute of core attention: megatron.core warns that TE's fused attention makes it
# pointless, but the core-attention slot always holds Tandem's own (unfused) CoreAttention.
warnings.filterwarnings("ignore", message=r"If you are using transformer_engine as the transformer")
