"""Plain reference decoders for the tests: no KV cache, the whole sequence recomputed at every pass
with the dense masks, greedy. They implement the same three algorithms independently of
model/hf/tandem_decoding.py, so agreement checks the cache handling (append, no-write passes, crop)."""

from __future__ import annotations

import torch

from tandem_kernels import masks


def full_logits(model, ids: list[int], mask_mod) -> torch.Tensor:
    S = len(ids)
    x = torch.tensor([ids], dtype=torch.long)
    mask = masks.dense(mask_mod, S, S)
    with torch.no_grad():
        return model(x, attention_mask=mask, position_ids=torch.arange(S)[None]).logits[0].double()


def _probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return torch.softmax(logits, dim=-1)


def _greedy(logits: torch.Tensor, mask_id: int) -> int:
    return int(_probs(logits, mask_id).argmax())


def reference_ar(model, prompt, max_new, mask_id, eos) -> list[int]:
    out: list[int] = []
    while True:
        token = _greedy(full_logits(model, prompt + out, masks.causal())[-1], mask_id)
        out.append(token)
        if token in eos or len(out) >= max_new:
            return out


def reference_diffusion(model, prompt, max_new, mask_id, eos, block, threshold) -> list[int]:
    out: list[int] = []
    seed = _greedy(full_logits(model, prompt, masks.causal())[-1], mask_id)
    while True:
        start = len(prompt) + len(out)
        current = [seed] + [mask_id] * (block - 1)
        while mask_id in current:
            probs = _probs(
                full_logits(model, prompt + out + current, masks.block_decode(start))[start:], mask_id
            )
            confidence, tokens = probs.max(dim=-1)
            masked = [i for i, t in enumerate(current) if t == mask_id]
            chosen = [i for i in masked if confidence[i] >= threshold]
            if not chosen:
                chosen = [max(masked, key=lambda i: confidence[i])]
            for i in chosen:
                current[i] = int(tokens[i])
        for token in current:
            out.append(token)
            if token in eos or len(out) >= max_new:
                return out
        seed = _greedy(full_logits(model, prompt + out, masks.causal())[-1], mask_id)


def _verified(model, prefix, draft, mask_id) -> list[int]:
    """AR tokens for the draft (token i proposes draft[i+1]): the kept drafts plus the AR token at the
    first mismatch."""
    start = len(prefix)
    verify = (
        _probs(full_logits(model, prefix + draft, masks.causal())[start:], mask_id).argmax(dim=-1).tolist()
    )
    accepted = 0
    while accepted < len(draft) - 1 and verify[accepted] == draft[accepted + 1]:
        accepted += 1
    return verify[: accepted + 1]


def _emit(out, tokens, eos, max_new) -> bool:
    for token in tokens:
        out.append(token)
        if token in eos or len(out) >= max_new:
            return True
    return False


def reference_self_speculation(model, prompt, max_new, mask_id, eos, block) -> list[int]:
    out = [_greedy(full_logits(model, prompt, masks.causal())[-1], mask_id)]
    if out[0] in eos or max_new == 1:
        return out
    while True:
        prefix = prompt + out[:-1]
        start = len(prefix)
        draft = [out[-1]] + [mask_id] * (block - 1)
        probs = _probs(full_logits(model, prefix + draft, masks.block_decode(start))[start:], mask_id)
        draft = [draft[0], *probs[1:].argmax(dim=-1).tolist()]
        if _emit(out, _verified(model, prefix, draft, mask_id), eos, max_new):
            return out


def reference_fused_self_speculation(model, prompt, max_new, mask_id, eos, block) -> list[int]:
    """The fused decoder's algorithm with separate full passes: each draft (the first one too) is a
    bidirectional pass over the kept prefix plus a block of masks, with the AR token in its first
    slot; the causal pass over prefix + draft verifies it."""
    out = [_greedy(full_logits(model, prompt, masks.causal())[-1], mask_id)]
    if out[0] in eos or max_new == 1:
        return out
    while True:
        kept = prompt + out[:-1]
        logits = full_logits(model, kept + [mask_id] * block, masks.block_decode(len(kept)))
        draft = [out[-1], *_probs(logits[len(kept) :], mask_id)[1:].argmax(dim=-1).tolist()]
        if _emit(out, _verified(model, kept, draft, mask_id), eos, max_new):
            return out
