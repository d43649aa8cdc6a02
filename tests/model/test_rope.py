"""Rotary tables against transformers' own implementations and the closed-form default."""

import pytest
import torch
from transformers import LlamaConfig, Ministral3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from model import rope

YARN = {
    "rope_type": "yarn",
    "rope_theta": 1e6,
    "factor": 16.0,
    "original_max_position_embeddings": 16384,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
YARN_SCALED = {
    "rope_type": "yarn",
    "rope_theta": 1e4,
    "factor": 4.0,
    "original_max_position_embeddings": 2048,
}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


def test_default_frequencies_are_the_closed_form():
    inv_freq, factor = rope.inverse_frequencies(8, {"rope_type": "default", "rope_theta": 100.0})
    assert factor == 1.0
    torch.testing.assert_close(inv_freq, torch.tensor([1.0, 100**-0.25, 100**-0.5, 100**-0.75]))


@pytest.mark.parametrize("params", [YARN, YARN_SCALED], ids=["ministral3", "yarn-x4"])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_yarn_matches_transformers(params, head_dim):
    config = Ministral3Config(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        rope_parameters=dict(params),
    )
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config, None)
    inv_freq, factor = rope.inverse_frequencies(head_dim, params)
    torch.testing.assert_close(inv_freq, expected)
    assert factor == pytest.approx(expected_factor)


def test_llama3_matches_transformers():
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=dict(LLAMA3))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, None)
    inv_freq, _ = rope.inverse_frequencies(128, LLAMA3)
    torch.testing.assert_close(inv_freq, expected)


def test_rotation_preserves_norms_and_relative_positions():
    torch.manual_seed(0)
    inv_freq, _ = rope.inverse_frequencies(16, {"rope_type": "default", "rope_theta": 10000.0})
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rotated(x, position):
        cos, sin = rope.cos_sin(torch.tensor([[position]]), inv_freq, 1.0, torch.float32)
        return rope.rotate(x, cos, sin)

    torch.testing.assert_close(rotated(q, 7).norm(), q.norm())
    # <R(a) q, R(b) k> depends only on a - b.
    score = lambda a, b: (rotated(q, a) * rotated(k, b)).sum()
    torch.testing.assert_close(score(10, 3), score(27, 20), atol=1e-5, rtol=1e-5)


def test_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="rope_type='ntk'"):
        rope.inverse_frequencies(8, {"rope_type": "ntk", "rope_theta": 1.0})
