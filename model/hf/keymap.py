"""Declarative weight-name maps between megatron.core's GPTModel and Hugging Face checkpoints.

One table (``RULES``) lists every parameter of a layer-spec-local GPTModel with its Hugging Face
name(s) and how the tensor is rearranged; ``HfLayout`` says where those names live in a given
architecture (``model.*`` + ``lm_head`` for Llama/Mistral/Ministral-3/Qwen3, ``encoder.*`` +
``diffusion_head`` for Nemotron-Labs-Diffusion). State dicts here are whole (TP=1, PP=1) tensors;
dist checkpoints reshard to and from that layout. ``entries`` expands the table for one model into
``Entry``s (one whole Megatron tensor each, with its Hugging Face names and its dist-checkpoint key),
so that conversions can stream a tensor at a time (``entry_to_hf`` / ``entry_from_hf``);
``to_hf`` / ``from_hf`` convert whole state dicts.

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


@dataclass(frozen=True)
class Entry:
    """One whole Megatron tensor of a given model and the Hugging Face tensor(s) it is made of."""

    rule: Rule
    megatron: str  # local-spec state-dict name, e.g. decoder.layers.3.mlp.linear_fc1.weight
    hf: tuple[str, ...]  # full Hugging Face names in the layout
    layer: int | None  # the decoder layer, None for the embedding, final norm and head

    @property
    def checkpoint_key(self) -> str:
        """The key megatron.core's dist checkpoints store this tensor under.

        A block's layers share one key and are stacked on a leading dimension (``layer`` indexes it),
        and the local spec saves its layer norms under Transformer Engine's fused names, so that either
        spec loads the other's checkpoints."""
        key = self.rule.megatron.replace(f"{LAYER}.", "")
        for fused, local in _TE_FUSED_NORMS.items():
            key = key.replace(local, fused)
        return key


def entries(cfg: ModelConfig, layout: HfLayout, tied_head: bool = False) -> list[Entry]:
    """Every tensor of ``cfg``, layer by layer (embedding, layer 0, ..., final norm, head), so that a
    conversion can stream them. ``tied_head``: the source stores no head; it is read from the embedding."""

    def entry(rule: Rule, layer: int | None) -> Entry:
        key = "" if layer is None else str(layer)
        names = tuple(name.replace(LAYER, key) for name in rule.hf)
        if rule.kind == "head":
            names = (layout.prefix + "embed_tokens.weight",) if tied_head else (layout.head,)
        else:
            names = tuple(layout.prefix + name for name in names)
        return Entry(rule, rule.megatron.replace(LAYER, key), names, layer)

    rules = [rule for rule in RULES if cfg.qk_layernorm or not rule.optional]
    per_layer = [rule for rule in rules if LAYER in rule.megatron]
    # RULES lists the embedding before the layer rules and the final norm and head after them.
    before, after = rules[: rules.index(per_layer[0])], rules[rules.index(per_layer[-1]) + 1 :]
    return [
        *(entry(rule, None) for rule in before),
        *(entry(rule, layer) for layer in range(cfg.num_layers) for rule in per_layer),
        *(entry(rule, None) for rule in after),
    ]


def entry_to_hf(entry: Entry, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of one whole Megatron tensor, in ``entry.hf`` order."""
    kind = entry.rule.kind
    if kind == "qkv":
        parts = _qkv_to_hf(tensor, cfg)
    elif kind == "gate_up":
        parts = tuple(t.contiguous() for t in tensor.chunk(2, dim=0))
    elif kind in ("vocab", "head"):
        parts = (tensor[: cfg.vocab_size].contiguous(),)
    else:
        parts = (tensor.contiguous(),)
    return dict(zip(entry.hf, parts, strict=True))


def entry_from_hf(entry: Entry, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """One whole Megatron tensor from its Hugging Face tensors (given in ``entry.hf`` order)."""
    kind = entry.rule.kind
    if kind == "qkv":
        return _qkv_from_hf(*tensors, cfg)
    if kind == "gate_up":
        return torch.cat(tensors, dim=0).contiguous()
    if kind in ("vocab", "head"):
        return _pad_rows(tensors[0], cfg.padded_vocab_size)
    return tensors[0].contiguous()


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, layout: HfLayout) -> dict[str, torch.Tensor]:
    """Megatron (TP=1, PP=1, local-spec names) -> Hugging Face names for ``layout``."""
    out: dict[str, torch.Tensor] = {}
    for entry in entries(cfg, layout):
        if entry.megatron not in state:
            raise KeyError(f"the Megatron state dict has no {entry.megatron!r} (rule {entry.rule.megatron})")
        out.update(entry_to_hf(entry, state[entry.megatron], cfg))
    return out


def from_hf(
    hf_state: dict[str, torch.Tensor], cfg: ModelConfig, layout: HfLayout, tied_head: bool = False
) -> dict[str, torch.Tensor]:
    """Hugging Face -> Megatron (TP=1, PP=1, local-spec names).

    ``tied_head``: the source ties its output head to the embedding (no head tensor stored); the
    untied Megatron head is initialised from the embedding matrix, as Nemotron-Labs-Diffusion does."""
    out: dict[str, torch.Tensor] = {}
    for entry in entries(cfg, layout, tied_head):
        missing = [n for n in entry.hf if n not in hf_state]
        if missing:
            raise KeyError(missing_hf_message(missing[0], entry))
        out[entry.megatron] = entry_from_hf(entry, [hf_state[n] for n in entry.hf], cfg)
    return out


def missing_hf_message(name: str, entry: Entry) -> str:
    return (
        f"the Hugging Face checkpoint has no {name!r} (needed for {entry.megatron}); "
        "is it a Llama/Mistral/Qwen3-style causal LM with this config?"
    )


_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def without_extra_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a (local-spec) model's state dict that the key map converts: its parameters,
    without the ``_extra_state`` entries megatron keeps beside them."""
    return {name: tensor for name, tensor in state.items() if not name.endswith("._extra_state")}
