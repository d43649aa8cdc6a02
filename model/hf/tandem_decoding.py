"""The decoding modes of a joint AR + block-diffusion model, for a batch of prompts over one KV cache.

Each decoder is written for one sequence, as a generator that yields the forward pass it needs next
(``Request``: tokens, the attention predicate, RoPE positions, whether the tokens join the cache) and
receives that pass's logits. ``decode_batch`` runs one such generator per prompt and serves all of
their requests with one batched forward pass at a time, so every row decodes exactly as it would
alone (rows never see each other), each on its own schedule: in one pass one row may denoise a block
while another appends one. The model side is one call, ``step(batch: Pass, cache) -> logits [B, S, V]``.

- ``AutoregressiveDecoder``: causal prefill, then one token per pass.
- ``BlockDiffusionDecoder``: each block starts ``[seed, MASK x (B-1)]`` where the seed is the AR
  token from the previous causal pass; bidirectional passes over cache + block (no cache write)
  commit masked positions whose confidence reaches ``threshold`` (at least one per pass), then one
  causal pass appends the finished block and yields the next seed (Nemotron-Labs-Diffusion's
  ``generate``; Fast-dLLM's threshold rule, Wu et al. 2025, Sec. 3.3).
- ``SelfSpeculativeDecoder``: draft passes fill the block's masks (no cache write; one pass by
  default), one causal verify pass scores it, and the cache is cropped to the kept tokens. At
  temperature 0 a draft is kept while it equals the AR argmax, plus the AR token at the first
  mismatch, so the output equals greedy AR decoding. At temperature > 0 drafts are verified by the
  speculative-sampling rule (Leviathan et al. 2023, Alg. 1; Chen et al. 2023): draft token x drawn
  from q is kept with probability min(1, p(x)/q(x)), else the token comes from norm(max(0, p - q)),
  which leaves the output distributed exactly as AR sampling from p (``verification="exact"``
  keeps the older exact-match rule, also distribution-preserving, which accepts less).
- ``FusedSelfSpeculativeDecoder``: the same verification, with the next block's draft computed in
  the verify pass itself for every possible outcome (one pass per iteration instead of two). Those
  pre-drafts cannot see the AR token at the first mismatch (it comes out of the same pass); with
  ``redraft`` a pre-draft whose own guess for that slot was not the AR token is drafted again from
  it, one extra bidirectional pass.

``MODES`` names each mode (``Mode``: how it builds its decoder from options, the options it takes,
how far past the emitted tokens its passes reach); the export's entry points, the command line, the
benchmark and the evaluation harness all decode through it.

The mask token is never emitted (its logit is set to -inf before choosing). Every tensor a decoder
makes is created on the model's device (``device`` of ``decode_batch``), where the logits and the
cache are; a sampling generator must live there too. Imports nothing outside torch and its sibling
``tandem_masks`` (copied into the export folder).

Legend: B batch, S new tokens of a pass, T keys (cache + new), G key/value groups, H head_dim, V vocab.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from .tandem_masks import (
    MaskMod,
    block_decode,
    causal,
    dense,
    shifted,
    speculate_fused,
    speculate_fused_positions,
)

# ---- the cache and one batched pass ------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of a batch: per layer [B, G, capacity, H]. Row b holds its
    ``lengths[b]`` tokens in slots [0, lengths[b]); a pass writes its new tokens right after them and
    keeps (``commit``) as many as it says, so a crop is a length, never a copy."""

    def __init__(self, batch: int, capacity: int):
        self.lengths = [0] * batch
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._slots: torch.Tensor | None = None  # [B, S] where this pass writes
        self._width = 0  # slots the pass attends to

    def begin(self, slots: torch.Tensor, width: int) -> None:
        if width > self.capacity:
            raise ValueError(f"the decode needs {width} cache slots, more than the {self.capacity} planned")
        self._slots, self._width = slots, width

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Store this pass's ``key``/``value`` [B, G, S, H] in their slots; the keys/values [B, G, T, H]
        the pass attends to (whether a slot may be seen is the pass's mask)."""
        if layer not in self.keys:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros(shape)
        rows = torch.arange(key.shape[0], device=key.device)[:, None]  # [B, 1]
        self.keys[layer].transpose(1, 2)[rows, self._slots] = key.transpose(1, 2)
        self.values[layer].transpose(1, 2)[rows, self._slots] = value.transpose(1, 2)
        return self.keys[layer][:, :, : self._width], self.values[layer][:, :, : self._width]

    def commit(self, kept: list[int]) -> None:
        """Row b keeps the first ``kept[b]`` tokens of the pass."""
        self.lengths = [length + k for length, k in zip(self.lengths, kept, strict=True)]

    def crop(self, row: int, length: int) -> None:
        self.lengths[row] = length


@dataclass
class Pass:
    """One batched forward pass, as the model sees it."""

    tokens: torch.Tensor  # [B, S] long
    positions: torch.Tensor  # [B, S] RoPE positions
    mask: torch.Tensor  # [B, 1, S, T] bool, True = may attend; T = the cache slots the pass reads
    slots: torch.Tensor  # [B, S] the cache slots of the new tokens
    kept: list[int]  # per row, how many of the new tokens join the cache


# The model side: run ``batch`` over ``cache`` (calling cache.attend per layer), return [B, S, V] logits.
Step = Callable[[Pass, KVCache], torch.Tensor]


@dataclass
class Request:
    """The pass one sequence needs next."""

    kind: str  # what the pass is for (counted per kind)
    tokens: torch.Tensor  # [S] long
    predicate: MaskMod  # over the row's positions: the cache's tokens first, then these
    write: bool  # the tokens join the cache
    positions: torch.Tensor | None = None  # [S] RoPE positions; default: right after the cache


@dataclass
class Decoded:
    tokens: list[int]  # generated tokens (prompt excluded), cut at EOS (included) and max_new_tokens
    nfe: int  # forward passes of this sequence, every kind counted (prefill, denoise, append, ...)
    passes: dict[str, int] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)  # self-speculation: drafts kept per iteration

    @property
    def tpf(self) -> float:
        return tokens_per_forward(len(self.tokens), self.nfe)


def tokens_per_forward(tokens: int, passes: int) -> float:
    """TPF: generated tokens per forward pass, every pass counted (prefill, denoise, append, draft,
    verify, redraft)."""
    return tokens / max(passes, 1)


@dataclass
class Sampler:
    """How a token is chosen from logits: greedy at temperature 0, else sampled; never the mask token."""

    mask_id: int
    temperature: float = 0.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution [..., V] tokens are drawn from: softmax at the temperature (at 1 when
        greedy, where it gives the confidence of the argmax)."""
        logits = logits.double().clone()
        logits[..., self.mask_id] = float("-inf")
        return torch.softmax(logits / (1.0 if self.greedy else self.temperature), dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of ``probs`` [S, V]."""
        if self.greedy:
            return probs.argmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token and its probability for each row of ``logits`` [S, V]."""
        probs = self.probs(logits)
        tokens = self.draw(probs)
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)

    def uniform(self, device: torch.device) -> float:
        return float(torch.rand((), generator=self.generator, device=device, dtype=torch.float64))


# Asked after every emitted token with the row's generated tokens so far: True ends the row there (stop
# sequences, which need the tokenizer, are checked by a callable the caller builds).
Stop = Callable[[list[int]], bool]


class Row:
    """One sequence of the batch: its place in the cache, its output, its limits."""

    def __init__(
        self,
        index: int,
        cache: KVCache,
        max_new_tokens: int,
        eos: set[int],
        sample: Sampler,
        device,
        stop: Stop | None = None,
    ):
        self.index = index
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.sample = sample
        self.device = device
        self.stop = stop
        self.out = Decoded(tokens=[], nfe=0)

    @property
    def length(self) -> int:
        """Tokens in this row's cache (its RoPE positions are 0 .. length - 1)."""
        return self.cache.lengths[self.index]

    def crop(self, length: int) -> None:
        self.cache.crop(self.index, length)

    def emit(self, tokens: list[int]) -> bool:
        """Append ``tokens``; True when decoding is over (EOS emitted, the budget reached, or ``stop``
        says so of the tokens so far)."""
        for token in tokens:
            self.out.tokens.append(int(token))
            if int(token) in self.eos or len(self.out.tokens) >= self.max_new_tokens:
                return True
            if self.stop is not None and self.stop(self.out.tokens):
                return True
        return False

    def tensor(self, tokens) -> torch.Tensor:
        return torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1)


# A decoder's program for one sequence: yields requests, receives each one's logits [S, V].
Program = Generator[Request, torch.Tensor, None]


def run_pass(step: Step, cache: KVCache, requests: list[Request | None], device) -> torch.Tensor:
    """One batched forward pass serving ``requests`` (one per row of ``cache``, None for a row that
    sits it out): logits [B, S, V]."""
    batch = _assemble(requests, cache, device)
    cache.begin(batch.slots, batch.mask.shape[-1])
    logits = step(batch, cache)
    cache.commit(batch.kept)
    return logits


def _assemble(requests: list[Request | None], cache: KVCache, device) -> Pass:
    """One batched pass for every row's request (finished rows ride along, writing nothing): new tokens
    go right after each row's cache, shorter requests are padded, and each row's mask is its own
    predicate over its own positions, padding seeing only itself."""
    S = max(len(r.tokens) for r in requests if r is not None)
    B = len(requests)
    width = max(cache.lengths) + S
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)
    positions = torch.zeros(B, S, dtype=torch.long, device=device)
    mask = torch.zeros(B, 1, S, width, dtype=torch.bool, device=device)
    offsets = torch.arange(S, device=device)
    starts = torch.tensor(cache.lengths, dtype=torch.long, device=device)
    slots = starts[:, None] + offsets[None]  # [B, S]
    mask[torch.arange(B, device=device)[:, None], 0, offsets[None], slots] = True  # each token sees itself
    kept = []
    for b, request in enumerate(requests):
        start = cache.lengths[b]
        if request is None:
            kept.append(0)
            continue
        n = len(request.tokens)
        tokens[b, :n] = request.tokens
        positions[b, :n] = (
            request.positions
            if request.positions is not None
            else torch.arange(start, start + n, device=device)
        )
        mask[b, 0, :n, : start + n] = dense(shifted(request.predicate, start), n, start + n, device=device)[
            0, 0
        ]
        kept.append(n if request.write else 0)
    return Pass(tokens, positions, mask, slots, kept)


def decode_batch(
    decoder: Decoder,
    step: Step,
    prompts: list[list[int]],
    max_new_tokens: int,
    mask_id: int,
    eos: set[int],
    temperature: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    stop: Stop | None = None,
) -> tuple[list[Decoded], int]:
    """Decode every prompt; returns each row's ``Decoded`` and the number of batched passes.

    ``generator``: one for all rows (drawn in row order), or one per row (then every row samples as it
    would alone). It must live on ``device``, the model's. ``stop``: ends a row early (see ``Stop``)."""
    device = torch.device(device)
    generators = generator if isinstance(generator, list) else [generator] * len(prompts)
    for g in generators:
        if g is not None and g.device.type != device.type:
            raise ValueError(
                f"the sampling generator is on {g.device} but the model is on {device}; create it "
                "there: torch.Generator(device=model.device)"
            )
    # A row that has finished may keep up to ``scratch`` slots past its budget (drafts kept beyond it are
    # cut from its output, not from its cache), and every pass still writes the widest request's slots
    # after every row, finished or not.
    capacity = max(map(len, prompts)) + max_new_tokens + 2 * decoder.scratch + 2
    cache = KVCache(len(prompts), capacity)
    rows = [
        Row(b, cache, max_new_tokens, eos, Sampler(mask_id, temperature, generators[b]), device, stop)
        for b in range(len(prompts))
    ]
    programs: list[Program | None] = [
        decoder.program(row, prompt) for row, prompt in zip(rows, prompts, strict=True)
    ]
    requests: list[Request | None] = [_first(p) for p in programs]
    passes = 0
    while any(r is not None for r in requests):
        logits = run_pass(step, cache, requests, device)  # [B, S, V]
        passes += 1
        for b, request in enumerate(requests):
            if request is None:
                continue
            row = rows[b]
            row.out.nfe += 1
            row.out.passes[request.kind] = row.out.passes.get(request.kind, 0) + 1
            try:
                requests[b] = programs[b].send(logits[b, : len(request.tokens)])
            except StopIteration:
                requests[b] = programs[b] = None
    return [row.out for row in rows], passes


def _first(program: Program) -> Request | None:
    try:
        return next(program)
    except StopIteration:
        return None


# ---- the decoders ------------------------------------------------------------------------------------


class Decoder:
    """Causal prefill of the prompt, then ``continue_from`` the first generated token."""

    scratch = 1  # cache slots a pass may use beyond the emitted tokens

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
        """One prompt (``decode_batch`` with a batch of one)."""
        (decoded,), _ = decode_batch(
            self, step, [prompt], max_new_tokens, mask_id, eos, temperature, generator, device
        )
        return decoded

    def program(self, row: Row, prompt: list[int]) -> Program:
        logits = yield Request("prefill", row.tensor(prompt), causal(), write=True)
        yield from self.continue_from(row, row.sample(logits[-1:])[0])

    def continue_from(self, row: Row, first: torch.Tensor) -> Program:
        raise NotImplementedError


class AutoregressiveDecoder(Decoder):
    def continue_from(self, row: Row, first: torch.Tensor) -> Program:
        token = first
        while not row.emit(token.tolist()):
            logits = yield Request("ar", token, causal(), write=True)
            token = row.sample(logits[-1:])[0]


class ConfidenceThreshold:
    """Commit every masked slot whose confidence reaches ``threshold``, and at least the most confident.
    ``in_order``: commit only the leftmost masked slots (while confident; at least one), which keeps
    the draft distribution of every slot known when drafts are sampled (speculative sampling)."""

    def __init__(self, threshold: float, in_order: bool = False):
        self.threshold = threshold
        self.in_order = in_order

    def select(self, masked: torch.Tensor, confidence: torch.Tensor, passes_done: int) -> torch.Tensor:
        confidence = torch.where(masked, confidence, torch.full_like(confidence, -1.0))
        commit = masked & (confidence >= self.threshold)
        if self.in_order:
            first = int(masked.long().argmax())
            run = (commit | ~masked).long().cumprod(0).bool() & masked  # confident from the left
            commit = run.clone()
            commit[first] = True
            return commit
        if not commit.any():
            commit[confidence.argmax()] = True
        return commit


class EvenSchedule:
    """Commit k masked slots per pass, k spreading ``slots`` masks over ``steps`` passes: the most
    confident ones, or (``in_order``) the leftmost ones."""

    def __init__(self, steps: int, slots: int, in_order: bool = False):
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.steps, self.slots, self.in_order = steps, slots, in_order

    def select(self, masked: torch.Tensor, confidence: torch.Tensor, passes_done: int) -> torch.Tensor:
        base, extra = divmod(self.slots, self.steps)
        k = min(int(masked.sum()), max(base + (1 if passes_done < extra else 0), 1))
        if self.in_order:
            order = masked.long().cumsum(0)
            return masked & (order <= k)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, -1.0))
        return torch.zeros_like(masked).index_fill_(0, confidence.topk(k).indices, True)


@dataclass
class Draft:
    tokens: torch.Tensor  # [D] the block: seed, then drafted tokens
    probs: torch.Tensor  # [D, V] the distribution each drafted token was drawn from (row 0 unused)


def _fill(row: Row, kind: str, seed: torch.Tensor, length: int, rule) -> Program:
    """The block ``[seed, MASK x (length-1)]`` filled by bidirectional passes over cache + block (no
    cache write), committing masked slots by ``rule`` until none is left. Returns a ``Draft``."""
    mask_id = row.sample.mask_id
    block = torch.full((length,), mask_id, dtype=torch.long, device=row.device)
    block[0] = seed[0]
    probs: torch.Tensor | None = None
    masked = block == mask_id
    start = row.length
    passes = 0
    while masked.any():
        logits = yield Request(kind, block, block_decode(start), write=False)
        distributions = row.sample.probs(logits)  # [D, V]
        probs = distributions if probs is None else probs
        tokens = row.sample.draw(distributions)
        # Commit by the distribution's own confidence when sampling (not the drawn token's), so that
        # which slots are committed does not depend on the draw.
        confidence = (
            distributions.gather(-1, tokens[:, None]).squeeze(-1)
            if row.sample.greedy
            else distributions.max(dim=-1).values
        )
        commit = rule.select(masked, confidence, passes)
        block = torch.where(commit, tokens, block)
        probs = torch.where(commit[:, None], distributions, probs)
        masked &= ~commit
        passes += 1
    return Draft(block, probs if probs is not None else torch.empty(0, device=row.device))


# Fast-dLLM's commit confidence (Wu et al. 2025), the default of block diffusion and of NLD's ``generate``.
DIFFUSION_THRESHOLD = 0.9


class BlockDiffusionDecoder(Decoder):
    def __init__(
        self, block_length: int, threshold: float | None = DIFFUSION_THRESHOLD, steps: int | None = None
    ):
        """``threshold``: confidence-threshold commits; None -> ``steps`` passes per block instead."""
        if block_length < 2:
            raise ValueError(f"block_length={block_length} must be >= 2 (the seed plus masked slots)")
        if threshold is None and steps is None:
            raise ValueError("give a confidence threshold or a number of steps per block")
        self.block_length = block_length
        self.scratch = block_length
        self.rule = (
            ConfidenceThreshold(threshold) if threshold is not None else EvenSchedule(steps, block_length - 1)
        )

    def continue_from(self, row: Row, first: torch.Tensor) -> Program:
        seed = first
        while True:
            draft = yield from _fill(row, "denoise", seed, self.block_length, self.rule)
            if row.emit(draft.tokens.tolist()):
                return
            logits = yield Request("append", draft.tokens, causal(), write=True)  # the block joins the cache
            seed = row.sample(logits[-1:])[0]


def _verify(
    row: Row, start: int, draft: Draft, verify_logits: torch.Tensor, exact: bool
) -> tuple[int, int, bool]:
    """Verification of ``draft`` (written to the cache from ``start``) by its causal logits: keeps the
    drafts up to the first rejection, emits them and the token chosen there (the bonus), crops the
    cache to the seed and the kept drafts. Returns (kept drafts, bonus token, decoding over?)."""
    target = row.sample.probs(verify_logits)  # [D, V]; row i is p of the token after position i
    if row.sample.greedy or exact:
        ar = row.sample.draw(target)  # ar[i] proposes draft[i+1]
        accepted = int((ar[:-1] == draft.tokens[1:]).long().cumprod(0).sum())
        bonus = int(ar[accepted])
    else:
        accepted, bonus = _speculative_sampling(row, draft, target)
    row.out.accepted.append(accepted)
    row.crop(start + accepted + 1)
    kept = draft.tokens[1 : accepted + 1].tolist()
    return accepted, bonus, row.emit([*kept, bonus])


def _speculative_sampling(row: Row, draft: Draft, target: torch.Tensor) -> tuple[int, int]:
    """Leviathan et al. 2023, Alg. 1: keep draft j with probability min(1, p_j(x) / q_j(x)); at the
    first rejection draw from norm(max(0, p_j - q_j)); after D-1 kept drafts draw the bonus from p."""
    D = len(draft.tokens)
    for j in range(1, D):
        token = int(draft.tokens[j])
        p, q = target[j - 1], draft.probs[j]
        if row.sample.uniform(row.device) * float(q[token]) < float(p[token]):
            continue
        residual = (p - q).clamp(min=0)
        residual = residual / residual.sum() if float(residual.sum()) > 0 else p
        return j - 1, int(row.sample.draw(residual[None])[0])
    return D - 1, int(row.sample.draw(target[D - 1 : D])[0])


class SelfSpeculativeDecoder(Decoder):
    def __init__(
        self,
        block_length: int,
        draft_threshold: float = 0.0,
        draft_steps: int | None = None,
        verification: str = "rejection",
    ):
        """``draft_threshold`` 0 fills every mask in one draft pass; higher values draft iteratively,
        as does ``draft_steps`` (passes per draft). ``verification`` at temperature > 0: "rejection"
        (speculative sampling) or "exact" (exact match of sampled AR tokens)."""
        if block_length < 2:
            raise ValueError(f"block_length={block_length} must be >= 2 (the seed plus drafted slots)")
        if verification not in ("rejection", "exact"):
            raise ValueError(f"verification={verification!r}; allowed: rejection, exact")
        self.block_length = block_length
        self.scratch = block_length
        self.exact = verification == "exact"
        self.draft_threshold, self.draft_steps = draft_threshold, draft_steps

    def _rule(self, row: Row):
        # Sampled drafts are committed left to right, so each slot's draft distribution is known given
        # the slots before it (what speculative sampling's guarantee needs).
        in_order = not row.sample.greedy
        if self.draft_steps is not None:
            return EvenSchedule(self.draft_steps, self.block_length - 1, in_order=in_order)
        return ConfidenceThreshold(self.draft_threshold, in_order=in_order)

    def continue_from(self, row: Row, first: torch.Tensor) -> Program:
        seed = first
        if row.emit(seed.tolist()):
            return
        rule = self._rule(row)
        while True:
            start = row.length
            draft = yield from _fill(row, "draft", seed, self.block_length, rule)
            logits = yield Request("verify", draft.tokens, causal(), write=True)
            _, bonus, done = _verify(row, start, draft, logits, self.exact)
            if done:
                return
            seed = row.tensor([bonus])


class FusedSelfSpeculativeDecoder(Decoder):
    """Self-speculation with one forward pass per iteration instead of two.

    The pass reads the current draft block causally (its AR logits verify it, as in the two-pass
    decoder) and, in the same forward, a pre-draft of the next block for every possible number k of
    kept drafts: a block of masks placed right after draft token k, seeing the prefix, draft tokens
    0..k and itself (``speculate_fused``). Once the verification has kept k drafts, pre-draft block k
    becomes the next draft, its first slot replaced by the token chosen at the first rejection. Every
    pass therefore emits at least one token (TPF >= 1 after the prefill) at the cost of ``B + B*B``
    query slots per pass, cheap where decoding is memory-bound (a GPU at batch 1), not on a CPU.
    With ``redraft``, a pre-draft whose own prediction for its first slot is not that token is drafted
    again from it (one bidirectional pass), since its other slots were drafted without it.
    """

    def __init__(self, block_length: int, verification: str = "rejection", redraft: bool = False):
        if block_length < 2:
            raise ValueError(f"block_length={block_length} must be >= 2 (the seed plus drafted slots)")
        if verification not in ("rejection", "exact"):
            raise ValueError(f"verification={verification!r}; allowed: rejection, exact")
        self.block_length = block_length
        self.scratch = block_length + block_length * block_length
        self.exact = verification == "exact"
        self.redraft = redraft

    def program(self, row: Row, prompt: list[int]) -> Program:
        """The prefill also drafts the first block: masks after the prompt, bidirectional among
        themselves (``block_decode``), their keys dropped from the cache afterwards."""
        D, P, mask_id = self.block_length, len(prompt), row.sample.mask_id
        logits = yield Request("prefill", row.tensor(prompt + [mask_id] * D), block_decode(P), write=True)
        row.crop(P)
        first = row.sample(logits[P - 1 : P])[0]
        if row.emit(first.tolist()):
            return
        yield from self.speculate(row, self._predraft(row, logits[P:], first))

    def _predraft(self, row: Row, logits: torch.Tensor, first: torch.Tensor) -> Draft:
        probs = row.sample.probs(logits)
        tokens = row.sample.draw(probs)
        tokens[0] = first[0]
        return Draft(tokens, probs)

    def speculate(self, row: Row, draft: Draft) -> Program:
        D, mask_id = self.block_length, row.sample.mask_id
        predraft_masks = torch.full((D * D,), mask_id, dtype=torch.long, device=row.device)
        while True:
            start = row.length
            logits = yield Request(
                "verify",
                torch.cat([draft.tokens, predraft_masks]),
                speculate_fused(start, D),
                write=True,
                positions=speculate_fused_positions(start, D, device=row.device),
            )
            accepted, bonus, done = _verify(row, start, draft, logits[:D], self.exact)  # pre-drafts cropped
            if done:
                return
            predraft_logits = logits[D + accepted * D : D + (accepted + 1) * D]
            foreseen = int(row.sample.probs(predraft_logits[:1]).argmax()) == bonus
            if self.redraft and not foreseen:
                draft = yield from _fill(row, "redraft", row.tensor([bonus]), D, ConfidenceThreshold(0.0))
            else:
                draft = self._predraft(row, predraft_logits, row.tensor([bonus]))


# ---- the modes ---------------------------------------------------------------------------------------


def _block_diffusion(
    block_length: int, threshold: float | None = None, steps: int | None = None
) -> BlockDiffusionDecoder:
    # Steps per block replace the threshold rule only when no threshold is given.
    if threshold is None and steps is None:
        threshold = DIFFUSION_THRESHOLD
    return BlockDiffusionDecoder(block_length, threshold=threshold, steps=steps)


def _self_speculation(
    block_length: int, threshold: float = 0.0, draft_steps: int | None = None, verification: str = "rejection"
) -> SelfSpeculativeDecoder:
    # NLD calls the draft confidence of linear_spec_generate ``threshold``.
    return SelfSpeculativeDecoder(
        block_length, draft_threshold=threshold, draft_steps=draft_steps, verification=verification
    )


@dataclass(frozen=True)
class Mode:
    """A decoding mode: ``build`` makes its decoder from the mode's options, which are the keyword
    parameters of ``build`` (their defaults are the mode's); ``lookahead``: blocks a pass may place
    beyond the last emitted token (what the context must leave room for)."""

    name: str
    build: Callable[..., Decoder]
    lookahead: int = 1

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.build).parameters)

    def refuse_unknown(self, options) -> None:
        """``ValueError`` naming the first of ``options`` (names) this mode does not take."""
        for option in options:
            if option not in self.options:
                takes = ", ".join(self.options) or "no options"
                raise ValueError(f"{option} does not apply to mode {self.name} (it takes {takes})")

    def decoder(self, trained_block_size: int, **options) -> Decoder:
        """The decoder for ``options``, None meaning the mode's default; a ``block_length`` must be one
        the model was trained for (2 .. ``trained_block_size``; None: ``trained_block_size``)."""
        self.refuse_unknown(options)
        given = {name: value for name, value in options.items() if value is not None}
        if "block_length" in self.options:
            given["block_length"] = _block_length(given.get("block_length"), trained_block_size)
        return self.build(**given)


def _block_length(block_length: int | None, trained: int) -> int:
    block_length = block_length or trained
    if block_length < 2 or block_length > trained:
        raise ValueError(
            f"block_length={block_length}: this model was trained with blocks of {trained} tokens; use a "
            f"block length between 2 and {trained}"
        )
    return block_length


MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode("ar", AutoregressiveDecoder),
        Mode("diffusion", _block_diffusion),
        Mode("self_spec", _self_speculation),
        # Pre-drafts of the next block sit one block past the verified one.
        Mode("self_spec_fused", FusedSelfSpeculativeDecoder, lookahead=2),
    )
}


def mode_named(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"mode {name!r} does not exist; choose one of {', '.join(MODES)}")
    return MODES[name]
