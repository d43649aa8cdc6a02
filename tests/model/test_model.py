"""The megatron.core model with Tandem's core attention, checked against transformers and the masks."""

from __future__ import annotations

import pytest
import torch

from model.attention import AttentionRealiser
from model.config import AttentionBackend, ModelConfig, ParallelConfig, PrecisionConfig, RopeConfig, RopeType
from model.hf import keymap
from model.megatron import build_model, forward
from tandem_kernels import masks
from tests.factories import hf_twin, ministral3_rope, tiny_model

YARN = ministral3_rope(original_max_position_embeddings=16)
LLAMA3 = RopeConfig(
    rope_type=RopeType.llama3,
    rope_theta=5e5,
    factor=8.0,
    original_max_position_embeddings=32,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
)


small = tiny_model


def build(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, ParallelConfig(), PrecisionConfig())
    return model.eval()


def megatron_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def logits(model, cfg, tokens, position_ids, predicate, backend=AttentionBackend.sdpa):
    inputs = AttentionRealiser(cfg, backend)(position_ids, predicate, per_sample=False)
    return forward(model, tokens, position_ids, inputs, runtime_gather_output=True)


@pytest.mark.parametrize(
    ("family", "cfg"),
    [
        ("llama", small()),
        ("llama", small(rope=LLAMA3, num_query_groups=4)),
        ("ministral3", small(rope=YARN, kv_channels=32)),  # hidden != heads * head_dim, as in the 3B
        ("qwen3", small(qk_layernorm=True, norm_epsilon=1e-6, num_query_groups=1)),
    ],
    ids=["llama", "llama3-rope-mha", "ministral3-yarn", "qwen3-qknorm"],
)
def test_causal_forward_equals_transformers(megatron_single, family, cfg):
    model = build(cfg)
    reference = hf_twin(cfg, family).eval()
    missing, unexpected = reference.load_state_dict(
        keymap.to_hf(megatron_state(model), cfg, keymap.LAYOUTS["llama"]), strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))  # 40 > original_max_position_embeddings of YARN
    positions = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        ours = logits(model, cfg, tokens, positions, masks.causal())[..., : cfg.vocab_size]
        theirs = reference(input_ids=tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_keymap_round_trip_is_exact(megatron_single):
    cfg = small(qk_layernorm=True, vocab_size=250)
    state = megatron_state(build(cfg))
    for layout in keymap.LAYOUTS.values():
        back = keymap.from_hf(keymap.to_hf(state, cfg, layout), cfg, layout)
        assert back.keys() == state.keys()
        for name, tensor in state.items():
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                # Padding rows are not part of the HF checkpoint; they come back as zeros.
                assert torch.equal(back[name][: cfg.vocab_size], tensor[: cfg.vocab_size]), name
            else:
                assert torch.equal(back[name], tensor), name


def test_tied_source_initialises_the_untied_head_from_the_embedding(megatron_single):
    cfg = small()
    hf = keymap.to_hf(megatron_state(build(cfg)), cfg, keymap.LAYOUTS["llama"])
    del hf["lm_head.weight"]
    state = keymap.from_hf(hf, cfg, keymap.LAYOUTS["llama"], tied_head=True)
    assert torch.equal(state["output_layer.weight"], state["embedding.word_embeddings.weight"])


def expected_parameter_count(cfg: ModelConfig) -> int:
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    attention = h * d * (cfg.num_attention_heads + 2 * cfg.query_groups) + cfg.num_attention_heads * d * h
    mlp = 3 * h * f
    norms = 2 * h + (2 * d if cfg.qk_layernorm else 0)
    return cfg.num_layers * (attention + mlp + norms) + h + 2 * cfg.padded_vocab_size * h


@pytest.mark.parametrize("cfg", [small(), small(kv_channels=24, qk_layernorm=True)], ids=["plain", "qknorm"])
def test_parameter_count_matches_the_formula(megatron_single, cfg):
    model = build(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(cfg)


def joint_forward(model, cfg, clean, noisy, block):
    L = clean.shape[1]
    tokens = torch.cat([noisy, clean], dim=1)
    positions = torch.arange(L).repeat(2).expand(clean.shape[0], 2 * L)
    with torch.no_grad():
        return logits(model, cfg, tokens, positions, masks.block_diffusion(L, block))


def test_noisy_logits_of_a_block_ignore_its_own_clean_block(megatron_single):
    cfg, L, B = small(), 32, 8
    model = build(cfg)
    torch.manual_seed(2)
    clean = torch.randint(3, cfg.vocab_size, (1, L))
    noisy = torch.where(torch.rand(1, L) < 0.5, torch.full_like(clean, 2), clean)
    base = joint_forward(model, cfg, clean, noisy, B)
    b = 1  # perturb the clean tokens of block 1
    perturbed = clean.clone()
    perturbed[:, b * B : (b + 1) * B] = (perturbed[:, b * B : (b + 1) * B] + 7) % cfg.vocab_size
    after = joint_forward(model, cfg, perturbed, noisy, B)
    noisy_logits = lambda out, blk: out[:, blk * B : (blk + 1) * B]
    for earlier in range(b + 1):
        assert torch.equal(noisy_logits(after, earlier), noisy_logits(base, earlier)), earlier
    assert not torch.allclose(noisy_logits(after, b + 1), noisy_logits(base, b + 1))
    assert not torch.allclose(noisy_logits(after, b + 2), noisy_logits(base, b + 2))


def test_clean_half_of_the_joint_forward_is_the_causal_model(megatron_single):
    cfg, L = small(), 32
    model = build(cfg)
    torch.manual_seed(3)
    clean = torch.randint(3, cfg.vocab_size, (2, L))
    noisy = torch.full_like(clean, 2)
    joint = joint_forward(model, cfg, clean, noisy, 8)
    positions = torch.arange(L).expand(2, L)
    with torch.no_grad():
        causal = logits(model, cfg, clean, positions, masks.causal())
    torch.testing.assert_close(joint[:, L:], causal, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_forward_equals_dense_through_the_model(megatron_single):
    cfg, L, B = small(), 64, 16
    model = build(cfg)
    torch.manual_seed(4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 2 * L))
    positions = torch.arange(L).repeat(2).expand(2, 2 * L)
    mod = masks.block_diffusion(L, B)
    with torch.no_grad():
        dense_out = logits(model, cfg, tokens, positions, mod)
        flex_out = logits(model, cfg, tokens, positions, mod, AttentionBackend.flex)
    torch.testing.assert_close(flex_out, dense_out, atol=1e-5, rtol=1e-5)


def test_backward_reaches_every_parameter(megatron_single):
    cfg, L = small(qk_layernorm=True), 16
    model = build(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 2 * L))
    positions = torch.arange(L).repeat(2).expand(2, 2 * L)
    out = logits(model, cfg, tokens, positions, masks.block_diffusion(L, 4))
    out.float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_missing_attention_inputs_is_a_clear_error(megatron_single):
    cfg = small()
    model = build(cfg)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="AttentionInputs"):
        model(tokens, torch.arange(8)[None], None)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_leaves_loss_and_gradients_unchanged(megatron_single, recompute):
    """Recompute replays the layers in backward; Tandem's attention inputs travel outside the saved
    tensors (megatron passes its attention_bias argument by closure), so the loss is identical and the
    gradients equal up to the order in which autograd accumulates them (~1e-7 relative)."""
    from model.config import Recompute

    cfg, L = small(qk_layernorm=True), 16
    tokens = torch.randint(0, cfg.vocab_size, (2, 2 * L), generator=torch.Generator().manual_seed(9))
    positions = torch.arange(L).repeat(2).expand(2, 2 * L)
    attention = AttentionRealiser(cfg, AttentionBackend.sdpa)(positions, masks.block_diffusion(L, 4), False)

    def loss_and_grads(parallel):
        torch.manual_seed(0)
        model = build_model(cfg, parallel, PrecisionConfig()).train()
        per_token = forward(model, tokens, positions, attention, labels=tokens)
        per_token.sum().backward()
        return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads(ParallelConfig())
    loss, grads = loss_and_grads(ParallelConfig(recompute=Recompute(recompute), recompute_num_layers=1))
    assert torch.equal(loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
