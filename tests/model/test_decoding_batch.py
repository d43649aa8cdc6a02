"""Batched decoding equals decoding one prompt at a time, row by row, in every mode; speculative
sampling at temperature > 0 draws from AR's own distribution (checked against the exact distribution
of the model's continuations, enumerated), and accepts more drafts than exact-match verification."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.factories import tiny_nld_model

MASK = 3
pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of rows of tiny ops


def tiny_model(vocab: int, seed: int, std: float = 0.02):
    return tiny_nld_model(seed, vocab_size=vocab, mask_token_id=MASK, initializer_range=std).double()


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=97, seed=0, std=0.3)  # peaked logits: drafts that are often right


# Settings: (mode, its options).
SETTINGS = {
    "ar": ("ar", {}),
    "diffusion": ("diffusion", {"block_length": 4, "threshold": 0.6}),
    "diffusion_steps": ("diffusion", {"block_length": 8, "threshold": None, "steps": 3}),
    "self_spec": ("self_spec", {"block_length": 4}),
    "self_spec_refined": ("self_spec", {"block_length": 8, "draft_steps": 3}),
    "self_spec_threshold": ("self_spec", {"block_length": 8, "threshold": 0.5}),
    "self_spec_fused": ("self_spec_fused", {"block_length": 4}),
    "self_spec_fused_redraft": ("self_spec_fused", {"block_length": 4, "redraft": True}),
}
PROMPTS = [[1, 17, 40, 9, 33], [5], [2, 60, 61, 62, 63, 64, 65, 8, 12], [44, 45]]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_batch_decodes_every_row_as_alone(model, setting):
    mode, options = SETTINGS[setting]
    alone = []
    for prompt in PROMPTS:
        ids, nfe = model.decode(torch.tensor([prompt]), mode, max_new_tokens=13, eos_token_id=[], **options)
        alone.append((ids[0, len(prompt) :].tolist(), nfe, dict(model.last_decoded.passes)))
    ids, mask = left_padded(PROMPTS)
    out, passes = model.decode(ids, mode, attention_mask=mask, max_new_tokens=13, eos_token_id=[], **options)
    assert out.shape == (len(PROMPTS), ids.shape[1] + 13)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # the prompts as given, padding kept
    for row, (tokens, nfe, kinds) in zip(model.last_decoded_rows, alone, strict=True):
        assert row.tokens == tokens and row.nfe == nfe and row.passes == kinds
    assert max(a[1] for a in alone) <= passes <= sum(a[1] for a in alone)
    if mode != "ar":  # rows on their own schedules share passes: fewer than one after another
        assert passes < sum(a[1] for a in alone)


def test_rows_stop_at_their_own_eos_and_are_padded(model):
    prompt = PROMPTS[0]
    free, _ = model.ar_generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=[])
    stop = free[0, len(prompt) + 2].item()  # this row's third token ends it
    ids, mask = left_padded([prompt, PROMPTS[2]])
    out, _ = model.linear_spec_generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[stop])
    first = model.last_decoded_rows[0].tokens
    assert first[-1] == stop and len(first) <= 3 and first == free[0, len(prompt) :].tolist()[: len(first)]
    assert out[0, ids.shape[1] + len(first) :].tolist() == [stop] * (10 - len(first))  # eos pads


def test_padding_must_be_on_the_left(model):
    with pytest.raises(ValueError, match="on the left"):
        model.ar_generate(
            torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2
        )


# ---- speculative sampling keeps AR's distribution ----------------------------------------------------

N_NEW, ROWS = 2, 3000


def exact_distribution(model, prompt: list[int], temperature: float) -> dict[tuple[int, ...], float]:
    """P(continuation) of AR sampling for every continuation of N_NEW tokens, from full causal passes."""
    vocab = model.config.vocab_size
    tokens = [t for t in range(vocab) if t != MASK]
    out = {}
    with torch.no_grad():
        for continuation in itertools.product(tokens, repeat=N_NEW):
            ids = torch.tensor([prompt + list(continuation)])
            logits = model(ids, dlm_paradigm="autoregressive").logits[0].double()
            logits[:, MASK] = float("-inf")
            logp = torch.log_softmax(logits / temperature, dim=-1)
            out[continuation] = math.exp(
                sum(float(logp[len(prompt) - 1 + i, continuation[i]]) for i in range(N_NEW))
            )
    return out


def chi_square(counts: dict, expected: dict, n: int) -> tuple[float, float]:
    """(statistic, 99.9% critical value) over cells with >= 5 expected samples (the rest pooled)."""
    cells = [k for k, p in expected.items() if p * n >= 5]
    pooled_p = 1 - sum(expected[k] for k in cells)
    pooled_c = n - sum(counts.get(k, 0) for k in cells)
    stat = sum((counts.get(k, 0) - n * expected[k]) ** 2 / (n * expected[k]) for k in cells)
    df = len(cells) - 1
    if pooled_p * n >= 5:
        stat += (pooled_c - n * pooled_p) ** 2 / (n * pooled_p)
        df += 1
    z = 3.09  # the 99.9% normal quantile; Wilson-Hilferty's approximation of the chi-square quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


@pytest.fixture(scope="module")
def small_vocab_model():
    return tiny_model(vocab=9, seed=4, std=0.5)


def sample_counts(model, mode, prompt, temperature, **options) -> tuple[dict, list[int]]:
    ids = torch.tensor([prompt] * ROWS)
    generator = torch.Generator().manual_seed(11)
    out, _ = model.decode(
        ids,
        mode,
        max_new_tokens=N_NEW,
        temperature=temperature,
        eos_token_id=[],
        generator=generator,
        **options,
    )
    counts: dict = {}
    for row in out[:, len(prompt) :].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    accepted = [a for row in model.last_decoded_rows for a in row.accepted]
    return counts, accepted


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("ar", {}),
        ("self_spec", {"block_length": 2, "verification": "rejection"}),
        ("self_spec", {"block_length": 2, "verification": "exact"}),
        ("self_spec_fused", {"block_length": 2, "verification": "rejection"}),
    ],
    ids=["ar", "rejection", "exact", "fused_rejection"],
)
def test_sampled_self_speculation_has_the_ar_distribution(small_vocab_model, mode, options):
    prompt, temperature = [1, 5, 7], 1.0
    expected = exact_distribution(small_vocab_model, prompt, temperature)
    counts, _ = sample_counts(small_vocab_model, mode, prompt, temperature, **options)
    stat, critical = chi_square(counts, expected, ROWS)
    assert stat < critical, (stat, critical)


def test_the_test_rejects_a_sampler_with_another_distribution(small_vocab_model):
    """The same statistic refuses samples at another temperature: the check has the power to fail."""
    prompt = [1, 5, 7]
    expected = exact_distribution(small_vocab_model, prompt, 1.0)
    counts, _ = sample_counts(small_vocab_model, "self_spec", prompt, 1.5, block_length=2)
    stat, critical = chi_square(counts, expected, ROWS)
    assert stat > critical, (stat, critical)


def test_rejection_sampling_accepts_more_drafts_than_exact_match(small_vocab_model):
    prompt = [1, 5, 7]
    _, rejection = sample_counts(small_vocab_model, "self_spec", prompt, 1.0, block_length=2)
    _, exact = sample_counts(
        small_vocab_model, "self_spec", prompt, 1.0, block_length=2, verification="exact"
    )
    assert sum(rejection) / len(rejection) > sum(exact) / len(exact)


def test_a_row_done_past_its_budget_leaves_the_others_room_to_draft():
    """Row 0 keeps a whole block of drafts and finishes past its budget while row 1 (whose drafts are
    always wrong) still drafts a block per pass: the cache must hold both. A model whose next token is
    a function of the position (``token``) gives the expected outputs independently."""
    from model.hf.tandem_decoding import SelfSpeculativeDecoder, decode_batch

    vocab, mask, block = 32, 31, 8

    def token(position: torch.Tensor) -> torch.Tensor:
        return position % 20 + 1

    def step(batch, cache):
        masked = batch.tokens == mask  # a draft slot guesses its own token, a causal slot the next one
        target = torch.where(masked, token(batch.positions), token(batch.positions + 1))
        wrong = masked & (torch.arange(len(target))[:, None] == 1)
        target = torch.where(wrong, 30, target)
        return torch.nn.functional.one_hot(target, vocab).double()

    prompts, budget = [list(range(1, 21)), [1, 2]], 5
    rows, _ = decode_batch(SelfSpeculativeDecoder(block), step, prompts, budget, mask, eos=set())
    for row, prompt in zip(rows, prompts, strict=True):
        assert row.tokens == token(torch.arange(len(prompt), len(prompt) + budget)).tolist()
    assert rows[0].accepted == [block - 1] and rows[1].accepted == [0] * (budget - 1)
