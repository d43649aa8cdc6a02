"""The decoders' book-keeping (drafts, acceptance, cache crops, pass counts) against a synthetic language
whose greedy continuation and pass counts are known in closed form.

The "model" is a Markov chain: the token after t is NEXT[t]. Its causal logits at a token predict the
chain's next token; at a mask slot it predicts NEXT applied d times to the nearest earlier visible
token, d positions back (what a perfect diffusion drafter would say), except at positions chosen to be
wrong. Keys and RoPE positions of every token live in the decoder's own KV cache, so the synthetic
step sees exactly what the attention of a real model would see through the mask and positions.
"""

from __future__ import annotations

import math

import pytest
import torch

from model.hf.tandem_decoding import (
    AutoregressiveDecoder,
    BlockDiffusionDecoder,
    FusedSelfSpeculativeDecoder,
    SelfSpeculativeDecoder,
)

V, MASK = 11, 0
NEXT = torch.tensor([1, 3, 5, 7, 9, 2, 4, 6, 8, 10, 1])  # never the mask token


def chain(start: int, n: int) -> list[int]:
    out, token = [], start
    for _ in range(n):
        token = int(NEXT[token])
        out.append(token)
    return out


def markov_step(wrong_positions: set[int] = frozenset()):
    def step(batch, cache):
        B, S = batch.tokens.shape
        keys = batch.tokens.view(B, 1, S, 1).double()
        values = batch.positions.view(B, 1, S, 1).double()
        all_ids, all_pos = cache.attend(0, keys, values)
        all_ids, all_pos = all_ids[:, 0, :, 0].long(), all_pos[:, 0, :, 0].long()  # [B, T]
        logits = torch.full((B, S, V), -10.0, dtype=torch.float64)
        for b in range(B):
            for i in range(S):
                visible = batch.mask[b, 0, i]
                token, position = int(batch.tokens[b, i]), int(batch.positions[b, i])
                assert visible[batch.slots[b, i]], "a query must see itself"
                if token != MASK:
                    target = int(NEXT[token])
                else:
                    seen = [
                        j
                        for j in range(visible.shape[0])
                        if visible[j] and all_ids[b, j] != MASK and all_pos[b, j] < position
                    ]
                    if not seen:  # a padding slot of a shorter request in the batch
                        continue
                    nearest = max(seen, key=lambda j: int(all_pos[b, j]))
                    target = chain(int(all_ids[b, nearest]), position - int(all_pos[b, nearest]))[-1]
                    if position in wrong_positions:
                        target = int(NEXT[target])  # a confident wrong draft
                logits[b, i, target] = 10.0
        return logits

    return step


def run(decoder, step, prompt, n):
    return decoder.decode(step, prompt, n, MASK, set())


PROMPT = [4, 7, 2]


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("D", [2, 4, 8])
def test_perfect_drafts_give_the_closed_form_pass_counts(n, D):
    expected = chain(PROMPT[-1], n)
    step = markov_step()
    ar = run(AutoregressiveDecoder(), step, PROMPT, n)
    assert ar.tokens == expected and ar.nfe == n
    # Block diffusion: every mask is confident, so one denoising pass per block and one causal append
    # pass between blocks.
    blocks = math.ceil(n / D)
    diffusion = run(BlockDiffusionDecoder(D, threshold=0.9), step, PROMPT, n)
    assert diffusion.tokens == expected and diffusion.nfe == 1 + blocks + (blocks - 1)
    # Two-pass self-speculation: the prefill gives the first token, then every draft is fully kept,
    # so each draft + verify pair emits D tokens (D - 1 drafts and the bonus).
    iterations = math.ceil((n - 1) / D)
    spec = run(SelfSpeculativeDecoder(D), step, PROMPT, n)
    assert spec.tokens == expected and spec.nfe == 1 + 2 * iterations
    assert spec.accepted == [D - 1] * iterations
    # Fused: the prefill also drafts, every later pass verifies and drafts: D tokens per pass.
    fused = run(FusedSelfSpeculativeDecoder(D), step, PROMPT, n)
    assert fused.tokens == expected and fused.nfe == 1 + iterations
    assert fused.accepted == [D - 1] * iterations


@pytest.mark.parametrize("D", [3, 4, 8])
def test_wrong_drafts_are_cut_where_they_go_wrong_and_output_stays_exact(D):
    n = 40
    wrong = {p for p in range(len(PROMPT), len(PROMPT) + n + 2 * D) if p % 5 == 2}
    expected = chain(PROMPT[-1], n)
    for decoder in (SelfSpeculativeDecoder(D), FusedSelfSpeculativeDecoder(D)):
        out = run(decoder, markov_step(wrong), PROMPT, n)
        assert out.tokens == expected, type(decoder).__name__
        # The first seed (the first generated token) sits at position len(PROMPT); drafts follow it and
        # are kept up to the first wrong one; the next seed is the AR token right after the kept ones.
        position = len(PROMPT)
        for accepted in out.accepted:
            first_wrong = next((k for k in range(1, D) if position + k in wrong), D)
            assert accepted == first_wrong - 1, (type(decoder).__name__, position, out.accepted)
            position += accepted + 1
        assert len(set(out.accepted)) > 1  # the cuts really vary
