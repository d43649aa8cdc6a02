"""The decoding modes of a joint AR + block-diffusion model, over one KV cache (batch 1).

The model side is one call, ``step(tokens [1, S], cache, mask_mod, write, positions) -> logits
[1, S, V]``: the tokens sit at RoPE positions ``positions`` (default ``cache.length ..``), attend to
the cache and to each other as ``mask_mod`` (a predicate of ``tandem_masks``) allows, and their
keys/values are appended when ``write``. Every call is one forward pass and counts in ``nfe``.

- ``AutoregressiveDecoder``: causal prefill, then one token per pass.
- ``BlockDiffusionDecoder``: each block starts ``[seed, MASK x (B-1)]`` where the seed is the AR
  token from the previous causal pass; bidirectional passes over cache + block (no cache write)
  commit masked positions whose confidence reaches ``threshold`` (at least one per pass), then one
  causal pass appends the finished block and yields the next seed (Nemotron-Labs-Diffusion's
  ``generate``; Fast-dLLM's threshold rule, Wu et al. 2025, Sec. 3.3).
- ``SelfSpeculativeDecoder``: one bidirectional draft pass fills the block's masks (no cache
  write), one causal verify pass scores it; the longest prefix where draft[i+1] == AR[i] is kept,
  plus the AR token at the first mismatch, and the cache is cropped to the kept tokens. At
  temperature 0 every emitted token is the AR argmax given the emitted prefix, so the output equals
  greedy AR decoding; at temperature > 0 exact-match verification keeps the AR distribution.
- ``FusedSelfSpeculativeDecoder``: the same verification, with the next block's draft computed in
  the verify pass itself for every possible outcome (one pass per iteration instead of two).

The mask token is never emitted (its logit is set to -inf before choosing). Every tensor a decoder
makes is created on the model's device (``device`` of ``decode``), where the logits and the cache
are; a sampling generator must live there too. Imports nothing outside torch and its sibling
``tandem_masks`` (copied into the export folder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .tandem_masks import MaskMod, block_decode, causal, speculate_fused, speculate_fused_positions


class KVCache:
    """Per-layer keys and values [1, G, T, H] of the tokens decoded so far."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor, write: bool):
        """Keys/values to attend to: the cached ones, then ``key``/``value``; stored when ``write``."""
        if layer in self.keys:
            key = torch.cat([self.keys[layer], key], dim=2)
            value = torch.cat([self.values[layer], value], dim=2)
        if write:
            self.keys[layer], self.values[layer] = key, value
        return key, value

    def crop(self, length: int) -> None:
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][:, :, :length]
            self.values[layer] = self.values[layer][:, :, :length]


# (ids [1, S], cache, mask predicate, write to the cache?, RoPE positions [S] or None for the next S).
Step = Callable[[torch.Tensor, KVCache, MaskMod, bool, "torch.Tensor | None"], torch.Tensor]


@dataclass
class Decoded:
    tokens: list[int]  # generated tokens (prompt excluded), cut at EOS (included) and max_new_tokens
    nfe: int  # forward passes, every kind counted (prefill, denoise, append, draft, verify)
    passes: dict[str, int] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)  # self-speculation: drafts kept per iteration

    @property
    def tpf(self) -> float:
        return len(self.tokens) / max(self.nfe, 1)


@dataclass
class Sampler:
    """How a token is chosen from logits: greedy at temperature 0, else sampled; never the mask token."""

    mask_id: int
    temperature: float = 0.0
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token and its probability for each row of ``logits`` [S, V]."""
        logits = logits.double().clone()
        logits[:, self.mask_id] = float("-inf")
        if self.temperature > 0:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            tokens = probs.argmax(dim=-1)
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


class _Run:
    """Book-keeping of one decode: the cache, pass counting, EOS and length limits, and the device
    every tensor of the decode is made on."""

    def __init__(
        self, step: Step, max_new_tokens: int, eos_token_ids: set[int], sample: Sampler, device: torch.device
    ):
        self.step_fn = step
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.eos = eos_token_ids
        self.sample = sample
        self.cache = KVCache()
        self.out = Decoded(tokens=[], nfe=0)

    def step(
        self,
        kind: str,
        tokens: list[int] | torch.Tensor,
        mask_mod: MaskMod,
        write: bool,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(1, -1)
        self.out.nfe += 1
        self.out.passes[kind] = self.out.passes.get(kind, 0) + 1
        return self.step_fn(ids, self.cache, mask_mod, write, positions)[0]  # [S, V]

    def next_token(self, kind: str, tokens, write: bool = True) -> torch.Tensor:
        """A causal pass over ``tokens``; the token its last position predicts, as a [1] tensor."""
        logits = self.step(kind, tokens, causal(), write)
        return self.sample(logits[-1:])[0]

    def emit(self, tokens: list[int]) -> bool:
        """Append ``tokens``; True when decoding is over (EOS emitted or the budget reached)."""
        for token in tokens:
            self.out.tokens.append(int(token))
            if int(token) in self.eos or len(self.out.tokens) >= self.max_new_tokens:
                return True
        return False


class Decoder:
    """Causal prefill of the prompt, then ``continue_from`` the first generated token."""

    def decode(
        self,
        step: Step,
        prompt: list[int],
        max_new_tokens: int,
        mask_id: int,
        eos: set[int],
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Decoded:
        """``device``: the model's (logits, cache); ``generator`` (sampling) must be on it."""
        device = torch.device(device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"the sampling generator is on {generator.device} but the model is on {device}; create it "
                "there: torch.Generator(device=model.device)"
            )
        run = _Run(step, max_new_tokens, eos, Sampler(mask_id, temperature, generator), device)
        self.start(run, prompt)
        return run.out

    def start(self, run: _Run, prompt: list[int]) -> None:
        self.continue_from(run, run.next_token("prefill", prompt))

    def continue_from(self, run: _Run, first: torch.Tensor) -> None:
        raise NotImplementedError


class AutoregressiveDecoder(Decoder):
    def continue_from(self, run: _Run, first: torch.Tensor) -> None:
        token = first
        while not run.emit(token.tolist()):
            token = run.next_token("ar", token)


class ConfidenceThreshold:
    """Commit every masked slot whose confidence reaches ``threshold``, and at least the most confident."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def select(self, masked: torch.Tensor, confidence: torch.Tensor, passes_done: int) -> torch.Tensor:
        confidence = torch.where(masked, confidence, torch.full_like(confidence, -1.0))
        commit = masked & (confidence >= self.threshold)
        if not commit.any():
            commit[confidence.argmax()] = True
        return commit


class EvenSchedule:
    """Commit the k most confident masked slots, k spreading ``slots`` masks over ``steps`` passes."""

    def __init__(self, steps: int, slots: int):
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.steps, self.slots = steps, slots

    def select(self, masked: torch.Tensor, confidence: torch.Tensor, passes_done: int) -> torch.Tensor:
        base, extra = divmod(self.slots, self.steps)
        k = min(int(masked.sum()), max(base + (1 if passes_done < extra else 0), 1))
        confidence = torch.where(masked, confidence, torch.full_like(confidence, -1.0))
        return torch.zeros_like(masked).index_fill_(0, confidence.topk(k).indices, True)


def _fill(run: _Run, kind: str, seed: torch.Tensor, length: int, rule) -> torch.Tensor:
    """The block ``[seed, MASK x (length-1)]`` filled by bidirectional passes over cache + block (no
    cache write), committing masked slots by ``rule`` until none is left."""
    mask_id = run.sample.mask_id
    block = torch.full((length,), mask_id, dtype=torch.long, device=run.device)
    block[0] = seed[0]
    masked = block == mask_id
    start = run.cache.length
    passes = 0
    while masked.any():
        logits = run.step(kind, block, block_decode(start), write=False)
        tokens, confidence = run.sample(logits)
        commit = rule.select(masked, confidence, passes)
        block = torch.where(commit, tokens, block)
        masked &= ~commit
        passes += 1
    return block


class BlockDiffusionDecoder(Decoder):
    def __init__(self, block_length: int, threshold: float | None = 0.9, steps: int | None = None):
        """``threshold``: confidence-threshold commits; None -> ``steps`` passes per block instead."""
        if block_length < 2:
            raise ValueError(f"block_length={block_length} must be >= 2 (the seed plus masked slots)")
        if threshold is None and steps is None:
            raise ValueError("give a confidence threshold or a number of steps per block")
        self.block_length = block_length
        self.rule = (
            ConfidenceThreshold(threshold) if threshold is not None else EvenSchedule(steps, block_length - 1)
        )

    def continue_from(self, run: _Run, first: torch.Tensor) -> None:
        seed = first
        while True:
            block = _fill(run, "denoise", seed, self.block_length, self.rule)
            if run.emit(block.tolist()):
                return
            seed = run.next_token("append", block)  # the block joins the cache causally


def _keep_verified(
    run: _Run, start: int, block: torch.Tensor, verify_logits: torch.Tensor
) -> tuple[int, int, bool]:
    """Exact-match verification of ``block`` (written to the cache from ``start``) by its causal logits:
    keeps the drafts up to the first mismatch, emits them and the AR token there (the bonus), crops the
    cache to the seed and the kept drafts. Returns (kept drafts, bonus token, decoding over?)."""
    ar, _ = run.sample(verify_logits)  # ar[i] proposes block[i+1]
    accepted = int((ar[:-1] == block[1:]).long().cumprod(0).sum())
    run.out.accepted.append(accepted)
    run.cache.crop(start + accepted + 1)
    return accepted, int(ar[accepted]), run.emit(ar[: accepted + 1].tolist())


class SelfSpeculativeDecoder(Decoder):
    def __init__(self, block_length: int, draft_threshold: float = 0.0):
        """``draft_threshold`` 0 fills every mask in one draft pass; higher values draft iteratively."""
        if block_length < 2:
            raise ValueError(f"block_length={block_length} must be >= 2 (the seed plus drafted slots)")
        self.block_length = block_length
        self.rule = ConfidenceThreshold(draft_threshold)

    def continue_from(self, run: _Run, first: torch.Tensor) -> None:
        seed = first
        if run.emit(seed.tolist()):
            return
        while True:
            start = run.cache.length
            block = _fill(run, "draft", seed, self.block_length, self.rule)
            logits = run.step("verify", block, causal(), write=True)
            _, bonus, done = _keep_verified(run, start, block, logits)
            if done:
                return
            seed = torch.tensor([bonus], device=run.device)


class FusedSelfSpeculativeDecoder(Decoder):
    """Self-speculation with one forward pass per iteration instead of two.

    The pass reads the current draft block causally (its AR logits verify it, as in the two-pass
    decoder) and, in the same forward, a pre-draft of the next block for every possible number k of
    kept drafts: a block of masks placed right after draft token k, seeing the prefix, draft tokens
    0..k and itself (``speculate_fused``). Once the verification has kept k drafts, pre-draft block k
    becomes the next draft, its first slot replaced by the AR token at the first mismatch. Every pass
    therefore emits at least one token (TPF >= 1 after the prefill) at the cost of ``B + B*B`` query
    slots per pass, cheap where decoding is memory-bound (a GPU at batch 1), not on a CPU.
    Verification is the same exact-match rule, so greedy output equals greedy AR decoding.
    """

    def __init__(self, block_length: int):
        if block_length < 2:
            raise ValueError(f"block_length={block_length} must be >= 2 (the seed plus drafted slots)")
        self.block_length = block_length

    def start(self, run: _Run, prompt: list[int]) -> None:
        """The prefill also drafts the first block: masks after the prompt, bidirectional among
        themselves (``block_decode``), their keys dropped from the cache afterwards."""
        D, P, mask_id = self.block_length, len(prompt), run.sample.mask_id
        logits = run.step("prefill", prompt + [mask_id] * D, block_decode(P), write=True)
        run.cache.crop(P)
        first = run.sample(logits[P - 1 : P])[0]
        if run.emit(first.tolist()):
            return
        block, _ = run.sample(logits[P:])
        block[0] = first[0]
        self.speculate(run, block)

    def speculate(self, run: _Run, block: torch.Tensor) -> None:
        D, mask_id = self.block_length, run.sample.mask_id
        predraft_masks = torch.full((D * D,), mask_id, dtype=torch.long, device=run.device)
        while True:
            start = run.cache.length
            logits = run.step(
                "verify",
                torch.cat([block, predraft_masks]),
                speculate_fused(start, D),
                write=True,
                positions=speculate_fused_positions(start, D, device=run.device),
            )
            accepted, bonus, done = _keep_verified(run, start, block, logits[:D])  # pre-drafts cropped
            if done:
                return
            block, _ = run.sample(logits[D + accepted * D : D + (accepted + 1) * D])
            block[0] = bonus
