"""scripts/gpu_check.py: its CPU-safe parts here (arguments, the dense reference, the flex forward
comparison, the model step on a tiny shape); the whole check on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import masks
from scripts import gpu_check


def test_arguments_default_to_the_8b_layer_shape_and_check_block_alignment():
    args = gpu_check.parse_args([])
    assert (args.size, args.layers, args.seq_length, args.block_size) == ("8b", 4, 4096, 64)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--seq-length", "100"])


def test_the_dense_reference_is_softmax_attention_under_the_training_mask():
    torch.manual_seed(0)
    L, S = 32, 64
    q, k, v = torch.randn(1, 4, S, 16), torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    allowed = masks.dense(masks.block_diffusion(L, 8), S, S)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(gpu_check.reference_attention(q, k, v, allowed), expected)
    # A query in the second noisy block sees its own block and the first clean block only.
    assert allowed[0, 0, 8].nonzero().flatten().tolist() == [*range(8, 16), *range(32, 40)]


def test_flex_forward_matches_the_reference_on_cpu():
    (output,) = gpu_check.attention_parity(64, 16, 4, 2, 16, torch.device("cpu"), backward=False)
    assert output.name == "output" and output.passed, output


def dense_flex(mask_mod):
    """flex.attention's stand-in on CPU (whose flex has no backward): SDPA over ``mask_mod``."""

    def attention(q, k, v, block_mask, scale=None):
        S = q.shape[2]
        allowed = masks.dense(mask_mod, S, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)

    return attention


def test_gradients_are_compared_too(monkeypatch):
    monkeypatch.setattr(gpu_check.flex, "attention", dense_flex(masks.block_diffusion(64, 16)))
    results = gpu_check.attention_parity(64, 16, 4, 2, 16, torch.device("cpu"), backward=True)
    assert [r.name for r in results] == ["output", "grad q", "grad k", "grad v"]
    assert all(r.passed for r in results)


def test_a_kernel_realising_another_mask_fails_the_check(monkeypatch):
    monkeypatch.setattr(gpu_check.flex, "attention", dense_flex(masks.causal()))
    (output,) = gpu_check.attention_parity(64, 16, 4, 2, 16, torch.device("cpu"), backward=False)
    assert not output.passed


def test_the_model_step_runs_and_counts_flops_on_cpu(megatron_single):
    result = gpu_check.model_step("tiny", 1, 32, 16, "fp32", 1, torch.device("cpu"))
    assert result.seconds > 0 and result.flops > 0
    assert result.name == "tiny layer x 1, fp32, 64 tokens"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_a_gpu_it_says_so(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_the_gpu_check_passes_at_a_small_shape():
    args = ["--layers", "1", "--seq-length", "1024", "--parity-length", "512", "--iters", "2"]
    assert gpu_check.main(args) == 0
