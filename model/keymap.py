"""Declarative weight-name maps between megatron.core's GPTModel and Hugging Face checkpoints.

One table (``RULES``) lists every parameter of a layer-spec-local GPTModel with its Hugging Face
name(s) and how the tensor is rearranged; ``HfLayout`` says where those names live in a given
architecture (``model.*`` + ``lm_head`` for Llama/Mistral/Ministral-3/Qwen3, ``encoder.*`` +
``diffusion_head`` for Nemotron-Labs-Diffusion). State dicts here are whole (TP=1, PP=1) tensors;
dist checkpoints reshard to and from that layout.

Non-trivial rearrangements:
- ``qkv``: megatron fuses Q, K, V per query group: for each group g, its q heads, then k_g, then v_g.
- ``gate_up``: megatron's ``linear_fc1`` is ``[gate; up]`` stacked on the output dimension.
- ``vocab``: megatron pads the vocabulary rows to ``padded_vocab_size``; HF holds ``vocab_size`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig

LAYER = "{layer}"


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]  # names relative to the layout's prefix (except the output head)
    kind: str = "copy"  # copy | qkv | gate_up | vocab | head
    optional: bool = False  # present only for some configs (QK-norm)


RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("embed_tokens.weight",), "vocab"),
    Rule(f"decoder.layers.{LAYER}.input_layernorm.weight", (f"layers.{LAYER}.input_layernorm.weight",)),
    Rule(
        f"decoder.layers.{LAYER}.self_attention.linear_qkv.weight",
        tuple(f"layers.{LAYER}.self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    Rule(
        f"decoder.layers.{LAYER}.self_attention.q_layernorm.weight",
        (f"layers.{LAYER}.self_attn.q_norm.weight",),
        optional=True,
    ),
    Rule(
        f"decoder.layers.{LAYER}.self_attention.k_layernorm.weight",
        (f"layers.{LAYER}.self_attn.k_norm.weight",),
        optional=True,
    ),
    Rule(
        f"decoder.layers.{LAYER}.self_attention.linear_proj.weight",
        (f"layers.{LAYER}.self_attn.o_proj.weight",),
    ),
    Rule(
        f"decoder.layers.{LAYER}.pre_mlp_layernorm.weight",
        (f"layers.{LAYER}.post_attention_layernorm.weight",),
    ),
    Rule(
        f"decoder.layers.{LAYER}.mlp.linear_fc1.weight",
        (f"layers.{LAYER}.mlp.gate_proj.weight", f"layers.{LAYER}.mlp.up_proj.weight"),
        "gate_up",
    ),
    Rule(f"decoder.layers.{LAYER}.mlp.linear_fc2.weight", (f"layers.{LAYER}.mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("norm.weight",)),
    Rule("output_layer.weight", ("{head}",), "head"),
)


@dataclass(frozen=True)
class HfLayout:
    prefix: str  # where the decoder's weights live
    head: str  # the untied output head


LAYOUTS = {
    "llama": HfLayout(prefix="model.", head="lm_head.weight"),
    "nemotron_labs_diffusion": HfLayout(prefix="encoder.", head="diffusion_head.weight"),
}


def _qkv_to_hf(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    groups, head_dim = cfg.query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    grouped = fused.view(groups, per_group + 2, head_dim, -1)
    q = grouped[:, :per_group].reshape(cfg.num_attention_heads * head_dim, -1)
    k = grouped[:, per_group].reshape(groups * head_dim, -1)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _qkv_from_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    groups, head_dim = cfg.query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = q.shape[-1]
    grouped = torch.cat(
        (
            q.view(groups, per_group, head_dim, hidden),
            k.view(groups, 1, head_dim, hidden),
            v.view(groups, 1, head_dim, hidden),
        ),
        dim=1,
    )
    return grouped.reshape(-1, hidden).contiguous()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    padded = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
    padded[: t.shape[0]] = t
    return padded


def _expand(rule: Rule, layer: int | None) -> tuple[str, tuple[str, ...]]:
    if layer is None:
        return rule.megatron, rule.hf
    key = str(layer)
    return rule.megatron.replace(LAYER, key), tuple(name.replace(LAYER, key) for name in rule.hf)


def _instances(cfg: ModelConfig):
    for rule in RULES:
        if rule.optional and not cfg.qk_layernorm:
            continue
        layers = range(cfg.num_layers) if LAYER in rule.megatron else [None]
        for layer in layers:
            yield rule, *_expand(rule, layer)


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, layout: HfLayout) -> dict[str, torch.Tensor]:
    """Megatron (TP=1, PP=1, local-spec names) -> Hugging Face names for ``layout``."""
    out: dict[str, torch.Tensor] = {}
    for rule, megatron_name, hf_names in _instances(cfg):
        if megatron_name not in state:
            raise KeyError(f"the Megatron state dict has no {megatron_name!r} (rule {rule.megatron})")
        tensor = state[megatron_name]
        names = [layout.head if n == "{head}" else layout.prefix + n for n in hf_names]
        if rule.kind == "qkv":
            out.update(zip(names, _qkv_to_hf(tensor, cfg), strict=True))
        elif rule.kind == "gate_up":
            out.update(zip(names, (t.contiguous() for t in tensor.chunk(2, dim=0)), strict=True))
        elif rule.kind in ("vocab", "head"):
            out[names[0]] = tensor[: cfg.vocab_size].contiguous()
        else:
            out[names[0]] = tensor.contiguous()
    return out


def from_hf(
    hf_state: dict[str, torch.Tensor], cfg: ModelConfig, layout: HfLayout, tied_head: bool = False
) -> dict[str, torch.Tensor]:
    """Hugging Face -> Megatron (TP=1, PP=1, local-spec names).

    ``tied_head``: the source ties its output head to the embedding (no head tensor stored); the
    untied Megatron head is initialised from the embedding matrix, as Nemotron-Labs-Diffusion does."""
    out: dict[str, torch.Tensor] = {}
    for rule, megatron_name, hf_names in _instances(cfg):
        names = [layout.head if n == "{head}" else layout.prefix + n for n in hf_names]
        if rule.kind == "head" and tied_head:
            names = [layout.prefix + "embed_tokens.weight"]
        missing = [n for n in names if n not in hf_state]
        if missing:
            raise KeyError(
                f"the Hugging Face checkpoint has no {missing[0]!r} (needed for {megatron_name}); "
                "is it a Llama/Mistral/Qwen3-style causal LM with this config?"
            )
        tensors = [hf_state[n] for n in names]
        if rule.kind == "qkv":
            out[megatron_name] = _qkv_from_hf(*tensors, cfg)
        elif rule.kind == "gate_up":
            out[megatron_name] = torch.cat(tensors, dim=0).contiguous()
        elif rule.kind in ("vocab", "head"):
            out[megatron_name] = _pad_rows(tensors[0], cfg.padded_vocab_size)
        else:
            out[megatron_name] = tensors[0].contiguous()
    return out


_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def to_local_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Transformer Engine's fused-norm parameters to the local spec's names; drop TE extra state."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("._extra_state"):
            continue
        for fused, local in _TE_FUSED_NORMS.items():
            name = name.replace(fused, local)
        out[name] = tensor
    return out
