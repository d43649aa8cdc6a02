"""A Tandem export in the Nemotron-Labs-Diffusion (NLD) format: the model and its three decoding modes.

Tandem's own implementation of the published interface: ``AutoModel.from_pretrained(dir,
trust_remote_code=True)`` gives ``NemotronLabsDiffusionModel`` with weights ``encoder.*`` (a
Llama/Mistral-style decoder: RMSNorm, GQA attention with RoPE, SwiGLU) and an untied
``diffusion_head``, and the entry points

- ``ar_generate``: autoregressive decoding with a KV cache;
- ``generate``: block diffusion (``block_length``, ``threshold``, ``steps``, ``temperature``);
- ``linear_spec_generate``: self-speculation, diffusion drafts verified by the same model's AR pass;
- ``fused_spec_generate``: self-speculation with drafting and verifying in one pass per iteration
  (Tandem's addition, TiDAR's layout; same output as ``linear_spec_generate`` at temperature 0);

each returning ``(ids, nfe)``: prompt plus generated ids, and the number of forward passes. They are
thin wrappers over ``decode``, which takes the mode (``tandem_decoding.MODES``) and its options.
``forward`` also takes the NLD training call (``labels`` with ``dlm_paradigm="block_diff"``) and
returns the joint loss Tandem's trainer computes, drawing the noise (unless given) with the trainer's
own schemes (``tandem_noise``, configured by ``config.masking``), from one generator per row when
given: the trainer's generators draw the trainer's masks. Attention masks come from ``tandem_masks``
and rotary tables from ``tandem_rope``: the modules Tandem trains with, copied into the folder.

Legend: B batch, S sequence, T keys (cache + sequence), N heads, G key/value groups, H head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

# `from .module import names` is the form transformers recognises to copy sibling files of remote code.
from .configuration_nemotron_labs_diffusion import NemotronLabsDiffusionConfig
from .tandem_decoding import DIFFUSION_THRESHOLD, KVCache, Mode, Pass, decode_batch, mode_named
from .tandem_masks import CleanAttention, MaskMod, bidirectional, block_diffusion, causal, dense, shifted
from .tandem_rope import cos_sin, inverse_frequencies, query_scale, rotate


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class Rotary:
    cos: torch.Tensor  # [B, 1, S, H]
    sin: torch.Tensor  # [B, 1, S, H]
    query_scale: torch.Tensor | None  # [B, 1, S, 1]


class Attention(nn.Module):
    def __init__(self, config: NemotronLabsDiffusionConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.groups, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        if config.qk_layernorm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # NLD's per-layer switch, read by ``Encoder.forward``: bidirectional (True) or causal attention.
        self.diffusion_lm = config.dlm_paradigm != "autoregressive"

    def forward(self, x, rotary: Rotary, mask: torch.Tensor | None, cache):
        B, S, _ = x.shape
        q_BNSH = self.q_proj(x).view(B, S, self.heads, self.head_dim)
        k_BGSH = self.k_proj(x).view(B, S, self.groups, self.head_dim)
        v_BGSH = self.v_proj(x).view(B, S, self.groups, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q_BNSH, k_BGSH = self.q_norm(q_BNSH), self.k_norm(k_BGSH)
        q_BNSH = rotate(q_BNSH.transpose(1, 2), rotary.cos, rotary.sin)
        k_BGSH = rotate(k_BGSH.transpose(1, 2), rotary.cos, rotary.sin)
        if rotary.query_scale is not None:
            q_BNSH = q_BNSH * rotary.query_scale
        if cache is not None:
            k_BGSH, v_BGSH = cache.attend(self.layer, k_BGSH, v_BGSH)
        # GQA inside the kernel: the cached keys are read in place, not repeated per query head.
        out_BNSH = F.scaled_dot_product_attention(
            q_BNSH, k_BGSH, v_BGSH, attn_mask=mask, enable_gqa=self.groups != self.heads
        )
        return self.o_proj(out_BNSH.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, config: NemotronLabsDiffusionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: NemotronLabsDiffusionConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rotary, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Encoder(nn.Module):
    def __init__(self, config: NemotronLabsDiffusionConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Rotary:
        params = self.config.rope_parameters
        inv_freq, attention_factor = inverse_frequencies(self.config.head_dim, params)
        cos, sin = cos_sin(position_ids, inv_freq, attention_factor, dtype)
        scale = None
        if params.get("llama_4_scaling_beta"):  # None or 0: no scaling
            scale = query_scale(
                position_ids, params["llama_4_scaling_beta"], params["original_max_position_embeddings"]
            ).to(dtype)
        return Rotary(cos, sin, scale)

    def run(self, input_ids, position_ids, mask, cache=None, masks=None):
        """Hidden states [B, S, D] of ``input_ids`` at RoPE ``position_ids``, attending as ``mask`` (or
        per layer as ``masks``) allows, to ``cache`` (anything with ``attend(layer, key, value)``) too."""
        x = self.embed_tokens(input_ids)
        rotary = self.rotary(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotary, masks[i] if masks is not None else mask, cache)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        use_causal_mask: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """NLD's encoder call, for scripts written for NLD's HF model: ``input_ids`` [B, S] after the
        tokens of ``past_key_values`` (a transformers ``DynamicCache``, or None), at positions that
        continue it. Each layer attends bidirectionally to the cache and the new tokens when its
        ``self_attn.diffusion_lm`` is True, causally when it is False or ``use_causal_mask`` is True;
        ``use_cache`` appends the new keys and values to ``past_key_values``, else it is only read."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padding masks are not supported here; use the *_generate methods for batches")
        B, S = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=device).expand(B, S)
        causal_mask = dense(shifted(causal(), past), S, past + S, device=device)
        masks = [
            causal_mask if use_causal_mask is True or not layer.self_attn.diffusion_lm else None
            for layer in self.layers
        ]
        cache = _TransformersCache(past_key_values, use_cache) if past_key_values is not None else None
        hidden = self.run(input_ids, position_ids, None, cache, masks=masks)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_FIELD: past_key_values})


# transformers 5.17 renamed the cache field of its outputs from ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class _TransformersCache:
    """A transformers ``Cache`` (NLD scripts pass ``DynamicCache``) seen through ``attend``: the cached
    keys/values then this pass's, stored in it when ``write``."""

    def __init__(self, cache, write: bool):
        self.cache, self.write = cache, write

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        if self.write:
            return self.cache.update(key, value, layer)
        if self.cache.get_seq_length(layer) == 0:
            return key, value
        if hasattr(self.cache, "layers"):  # transformers >= 4.56
            old_key, old_value = self.cache.layers[layer].keys, self.cache.layers[layer].values
        else:
            old_key, old_value = self.cache.key_cache[layer], self.cache.value_cache[layer]
        return torch.cat([old_key, key], dim=2), torch.cat([old_value, value], dim=2)


@dataclass
class NemotronLabsDiffusionOutput(ModelOutput):
    loss: torch.Tensor | None = None  # the joint loss, (ar_w * sum AR CE + dlm_w * sum CE/p) / tokens
    logits: torch.Tensor | None = None  # [B, S, V]; the noisy (diffusion) half in block_diff training
    causal_logits: torch.Tensor | None = None  # [B, L, V]; the clean (AR) half in block_diff training
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    masked_indices: torch.Tensor | None = None  # [B, L] bool; the noise of block_diff training
    p_mask: torch.Tensor | None = None  # [B, L]; the masking probability of each position
    cache: object | None = None  # the transformers Cache of NLD's cached call

    @property
    def past_key_values(self):  # NLD's name for it (transformers >= 5.17 calls it ``cache``)
        return self.cache


def training_mask(config: NemotronLabsDiffusionConfig, seq_len: int) -> MaskMod:
    """The joint training mask over [x_t ; x_0] of a clean sequence of ``seq_len`` tokens."""
    return block_diffusion(seq_len, config.block_size, CleanAttention(config.clean_attention))


# dlm_paradigm -> the attention of a call without a mask over ``length`` tokens ("block_diff": the
# training sequence [x_t ; x_0], each half at positions 0 .. length/2 - 1).
PARADIGM_MASKS = {
    "autoregressive": lambda config, length: causal(),
    "bidirectional": lambda config, length: bidirectional(),
    "block_diff": lambda config, length: training_mask(config, length // 2),
}


class NemotronLabsDiffusionModel(PreTrainedModel):
    config_class = NemotronLabsDiffusionConfig
    base_model_prefix = "encoder"
    _supports_sdpa = True  # its attention is scaled_dot_product_attention (NLD configs ask for "sdpa")
    _no_split_modules = ("DecoderLayer",)

    def __init__(self, config: NemotronLabsDiffusionConfig):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    # ---- forward ------------------------------------------------------------------------------

    def _logits(self, input_ids, position_ids, mask, cache=None):
        return self.diffusion_head(self.encoder.run(input_ids, position_ids, mask, cache))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        masked_indices: torch.BoolTensor | None = None,
        p_mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        ar_labels: torch.LongTensor | None = None,
        skip_loss: bool = False,
        dlm_paradigm: str | None = None,
        generators: list[torch.Generator] | None = None,
        past_key_values=None,
        use_cache: bool = False,
        use_causal_mask: bool | None = None,
        **kwargs,
    ) -> NemotronLabsDiffusionOutput:
        """Logits of ``input_ids`` [B, S].

        With ``past_key_values`` (a transformers ``DynamicCache``) or ``use_causal_mask``: NLD's cached
        call, as ``Encoder.forward`` (each layer's ``self_attn.diffusion_lm`` picks bidirectional or
        causal attention); the output carries ``past_key_values``.

        ``attention_mask``: a boolean [B|1, 1, S, S] mask (True = may attend) overrides the paradigm;
        a 2-D padding mask is not supported (decode one sequence at a time).
        Without labels the paradigm (``dlm_paradigm`` or the config's) picks the mask: "autoregressive"
        (causal), "bidirectional", or "block_diff" (``input_ids`` is ``[x_t ; x_0]``).
        With ``labels`` and "block_diff": NLD's training call. ``input_ids`` is the clean sequence x_0;
        ``masked_indices`` [B, L] and ``p_mask`` [B, L] (or per row [B, 1]) give the noise; when absent
        it is drawn by ``config.noise()`` (the trainer's scheme), row i from ``generators[i]`` (CPU
        generators; default: seeded from torch's global generator), never where ``loss_mask`` [B, L] is 0.
        The model runs ``[x_t ; x_0]`` once and returns the joint loss and the noise it used. The AR
        part predicts ``labels[:, 1:]`` from positions 0..L-2 (NLD); pass ``ar_labels`` [B, L] (the next
        token at every position, Megatron's convention) to score all L positions as Tandem's trainer does.
        """
        if past_key_values is not None or use_causal_mask is not None:
            out = self.encoder(
                input_ids,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                use_causal_mask=use_causal_mask,
                attention_mask=attention_mask,
            )
            return NemotronLabsDiffusionOutput(
                logits=self.diffusion_head(out.last_hidden_state), cache=past_key_values
            )
        paradigm = dlm_paradigm or self.config.dlm_paradigm
        if paradigm not in PARADIGM_MASKS:
            raise ValueError(f"dlm_paradigm={paradigm!r}; allowed: {', '.join(PARADIGM_MASKS)}")
        if labels is not None and paradigm == "block_diff":
            if masked_indices is None:
                masked_indices, p_mask = self._draw_noise(input_ids, loss_mask, generators)
            return self._joint_forward(
                input_ids, labels, masked_indices, p_mask, loss_mask, ar_labels, skip_loss
            )
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
            if paradigm == "block_diff" and attention_mask is None:
                position_ids = torch.arange(S // 2, device=input_ids.device).repeat(2).expand(B, S)
        if attention_mask is None:
            mask = dense(PARADIGM_MASKS[paradigm](self.config, S), S, S, device=input_ids.device)
        elif attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            raise ValueError(
                "attention_mask must be a boolean [B, 1, S, S] mask (True = may attend); padded batches "
                "are not supported: run sequences one at a time"
            )
        return NemotronLabsDiffusionOutput(logits=self._logits(input_ids, position_ids, mask))

    def _draw_noise(self, clean, loss_mask, generators):
        """(masked [B, L], p [B, L]) drawn as the trainer draws them, on the CPU (the data side)."""
        loss_mask = torch.ones(clean.shape) if loss_mask is None else loss_mask.cpu()
        if generators is None:
            seeds = torch.randint(2**62, (len(clean),)).tolist()
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        masked, p = self.config.noise()(loss_mask, generators)
        return masked.to(clean.device), p.to(clean.device)

    def _joint_forward(self, clean, labels, masked_indices, p_mask, loss_mask, ar_labels, skip_loss):
        B, L = clean.shape
        device = clean.device
        if loss_mask is None:
            loss_mask = torch.ones(B, L, device=device)
        masked_indices = masked_indices.bool() & (loss_mask > 0)
        p_mask = p_mask.expand(B, L) if p_mask.dim() == 2 else p_mask.view(B, 1).expand(B, L)
        noisy = torch.where(masked_indices, torch.full_like(clean, self.config.mask_token_id), clean)
        tokens = torch.cat([noisy, clean], dim=1)
        positions = torch.arange(L, device=device).repeat(2).expand(B, 2 * L)
        mask = dense(training_mask(self.config, L), 2 * L, 2 * L, device=device)
        logits = self._logits(tokens, positions, mask)
        diffusion_logits, causal_logits = logits[:, :L], logits[:, L:]
        if skip_loss:
            return NemotronLabsDiffusionOutput(
                logits=diffusion_logits,
                causal_logits=causal_logits,
                masked_indices=masked_indices,
                p_mask=p_mask,
            )
        ce = F.cross_entropy(diffusion_logits.float().transpose(1, 2), labels, reduction="none")  # [B, L]
        diffusion_sum = torch.where(masked_indices, ce / p_mask, torch.zeros_like(ce)).sum()
        if ar_labels is not None:
            ar_ce = F.cross_entropy(causal_logits.float().transpose(1, 2), ar_labels, reduction="none")
            ar_weight = loss_mask
        else:
            ar_ce = F.cross_entropy(
                causal_logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none"
            )
            ar_weight = loss_mask[:, 1:]
        ar_sum = torch.where(ar_weight > 0, ar_ce * ar_weight, torch.zeros_like(ar_ce)).sum()
        loss_sum = self.config.ar_loss_weight * ar_sum + self.config.dlm_loss_weight * diffusion_sum
        num_tokens = masked_indices.sum() + (ar_weight > 0).sum()
        return NemotronLabsDiffusionOutput(
            loss=loss_sum / num_tokens.clamp(min=1),
            logits=diffusion_logits,
            causal_logits=causal_logits,
            loss_sum=loss_sum,
            num_tokens=num_tokens,
            masked_indices=masked_indices,
            p_mask=p_mask,
        )

    # ---- decoding -------------------------------------------------------------------------------

    def _step(self, batch: Pass, cache: KVCache) -> torch.Tensor:
        """One decoding pass (``tandem_decoding.Step``): logits [B, S, V] of the batch's new tokens."""
        # A pass every key of which every query may see (one AR token at batch 1) needs no mask.
        mask = None if batch.mask.shape[0] == 1 and bool(batch.mask.all()) else batch.mask
        return self._logits(batch.tokens, batch.positions, mask, cache)

    def decode(
        self,
        prompt_ids,
        mode: Mode | str = "ar",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        eos_token_id=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        attention_mask: torch.Tensor | None = None,
        mask_token_id: int | None = None,
        stop=None,
        **options,
    ):
        """Decoding of ``prompt_ids`` [B, P] (left-padded per ``attention_mask`` [B, P]: 1 = token,
        0 = padding) in ``mode`` (a ``tandem_decoding.Mode``, or its name in ``MODES``: "ar",
        "diffusion", "self_spec", "self_spec_fused") with the mode's ``options`` (``Mode.options``;
        None: the mode's default). ``generator``: one, or one per row, on the model's device; ``stop``:
        called with a row's tokens after each one, True ends the row. Returns (the prompts as given,
        then each row's generated ids right-padded: [B, P+N]; batched forward passes);
        ``last_decoded_rows`` keeps each row's ``Decoded`` (tokens, passes by kind, accepted drafts)."""
        mode = mode_named(mode) if isinstance(mode, str) else mode
        decoder = mode.decoder(self.config.block_size, **options)
        prompts = self._check_prompt(prompt_ids, attention_mask, max_new_tokens, mode.lookahead)
        eos = eos_token_id if eos_token_id is not None else getattr(self.config, "eos_token_id", None)
        eos_ids = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}
        mask_id = self.config.mask_token_id if mask_token_id is None else mask_token_id
        with torch.no_grad():
            rows, passes = decode_batch(
                decoder,
                self._step,
                prompts,
                max_new_tokens,
                mask_id,
                eos_ids,
                temperature,
                generator,
                device=self.diffusion_head.weight.device,
                stop=stop,
            )
        # The prompts as given (left padding kept), then each row's tokens, right-padded for the batch.
        pad = getattr(self.config, "pad_token_id", None)
        pad = pad if pad is not None else (next(iter(eos_ids)) if eos_ids else 0)
        width = max(len(r.tokens) for r in rows)
        generated = [r.tokens + [pad] * (width - len(r.tokens)) for r in rows]
        new = torch.tensor(generated, dtype=torch.long, device=prompt_ids.device).view(len(rows), width)
        self.last_decoded = rows[0]  # passes by kind and accepted drafts, for benchmarks
        self.last_decoded_rows = rows
        return torch.cat([prompt_ids, new], dim=1), passes

    def _check_prompt(
        self, prompt_ids: torch.Tensor, attention_mask, max_new_tokens: int, lookahead: int = 1
    ) -> list[list[int]]:
        """The prompts of ``prompt_ids`` [B, P] without their left padding (``attention_mask`` [B, P],
        1 = token, 0 = padding). ``lookahead``: blocks a pass may place beyond the last emitted token
        (2 when pre-drafting)."""
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must have shape [B, P]; got {tuple(prompt_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_ids)
        if attention_mask.shape != prompt_ids.shape:
            shapes = f"{tuple(attention_mask.shape)} and {tuple(prompt_ids.shape)}"
            raise ValueError(f"attention_mask and prompt_ids must have the same shape; got {shapes}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        prompts = []
        for ids, keep in zip(prompt_ids.tolist(), attention_mask.bool().tolist(), strict=True):
            if any(keep[i] and not keep[i + 1] for i in range(len(keep) - 1)):
                raise ValueError("attention_mask must pad prompts on the left (zeros before the tokens)")
            prompts.append([t for t, k in zip(ids, keep, strict=True) if k])
        longest = max(map(len, prompts), default=0)
        if not prompts or min(map(len, prompts)) == 0:
            raise ValueError("a prompt is empty: give at least one token (e.g. the BOS/EOS token)")
        total = longest + max_new_tokens + lookahead * self.config.block_size
        if total > self.config.max_position_embeddings:
            blocks = "one block" if lookahead == 1 else f"{lookahead} blocks"
            raise ValueError(
                f"a prompt of {longest} tokens plus {max_new_tokens} new tokens (and {blocks} "
                f"of {self.config.block_size}) exceeds the context of "
                f"{self.config.max_position_embeddings} positions; shorten the prompt or ask for fewer tokens"
            )
        return prompts

    # NLD's entry points (and Tandem's fused one): ``decode`` in one mode each. NLD's scripts pass
    # arguments these modes do not use; ``**kwargs`` takes and ignores them, as NLD's own code does.

    def ar_generate(
        self,
        prompt_ids,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        eos_token_id=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        attention_mask: torch.Tensor | None = None,
        stop=None,
        **kwargs,
    ):
        """Autoregressive decoding; returns (prompts + generated ids [B, P+N], forward passes)."""
        return self.decode(
            prompt_ids, "ar", max_new_tokens, temperature, eos_token_id, generator, attention_mask, stop=stop
        )

    def generate(
        self,
        prompt_ids,
        max_new_tokens: int = 128,
        steps: int | None = None,
        block_length: int | None = None,
        threshold: float | None = DIFFUSION_THRESHOLD,
        temperature: float = 0.0,
        eos_token_id=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        attention_mask: torch.Tensor | None = None,
        stop=None,
        **kwargs,
    ):
        """Block diffusion; ``threshold`` commits confident tokens (None: ``steps`` passes per block)."""
        return self.decode(
            prompt_ids,
            "diffusion",
            max_new_tokens,
            temperature,
            eos_token_id,
            generator,
            attention_mask,
            stop=stop,
            block_length=block_length,
            threshold=threshold,
            steps=steps,
        )

    def linear_spec_generate(
        self,
        prompt_ids,
        max_new_tokens: int = 128,
        block_length: int | None = None,
        temperature: float = 0.0,
        mask_token_id: int | None = None,
        eos_token_id=None,
        threshold: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        attention_mask: torch.Tensor | None = None,
        draft_steps: int | None = None,
        verification: str | None = None,
        stop=None,
        **kwargs,
    ):
        """Self-speculation: diffusion drafts a block, the AR pass verifies it (lossless at temperature 0;
        at temperature > 0 speculative sampling keeps AR's distribution, or ``verification="exact"``
        exact matches). ``threshold`` > 0 or ``draft_steps`` refine each draft over several passes."""
        return self.decode(
            prompt_ids,
            "self_spec",
            max_new_tokens,
            temperature,
            eos_token_id,
            generator,
            attention_mask,
            mask_token_id,
            stop,
            block_length=block_length,
            threshold=threshold,
            draft_steps=draft_steps,
            verification=verification,
        )

    def fused_spec_generate(
        self,
        prompt_ids,
        max_new_tokens: int = 128,
        block_length: int | None = None,
        temperature: float = 0.0,
        mask_token_id: int | None = None,
        eos_token_id=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        attention_mask: torch.Tensor | None = None,
        verification: str | None = None,
        redraft: bool | None = None,
        stop=None,
    ):
        """Self-speculation in one pass per iteration: the verify pass also drafts the next block for
        every possible acceptance length (``block_length`` + ``block_length``^2 slots per pass);
        ``redraft`` drafts again, in one more pass, a pre-draft that did not foresee the AR token."""
        return self.decode(
            prompt_ids,
            "self_spec_fused",
            max_new_tokens,
            temperature,
            eos_token_id,
            generator,
            attention_mask,
            mask_token_id,
            stop,
            block_length=block_length,
            verification=verification,
            redraft=redraft,
        )
