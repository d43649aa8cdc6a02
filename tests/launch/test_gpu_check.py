"""scripts/gpu_check.py: its arguments, its attention reference, and a dress rehearsal of every stage
that can run without CUDA (the trainer's step, the run loop's save and exact resume, the export, the
four decoding modes) through the script's own ``main`` in a process of its own; the whole check on a
GPU."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from scripts import gpu_check
from tandem_kernels import masks
from tests.conftest import fork, wait


def test_arguments_default_to_the_8b_layer_shape_and_check_block_alignment():
    args = gpu_check.parse_args([])
    assert (args.size, args.layers, args.seq_length, args.block_size) == ("8b", 4, 4096, 64)
    assert args.time_limit <= 480  # the stages fit the eight minutes a lent GPU gives
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


@pytest.mark.parametrize("documents", [False, True], ids=["joint", "documents"])
def test_flex_forward_matches_the_reference_on_cpu(documents):
    (output,) = gpu_check.attention_parity(
        64, 16, 4, 2, 16, torch.device("cpu"), backward=False, documents=documents
    )
    assert output.name == "output" and output.passed, output


def test_the_document_predicate_cuts_attention_at_document_ends():
    allowed = masks.dense(gpu_check.joint_predicate(64, 16, True, torch.device("cpu")), 128, 128)[0, 0]
    joint = masks.dense(gpu_check.joint_predicate(64, 16, False, torch.device("cpu")), 128, 128)[0, 0]
    assert (allowed <= joint).all() and allowed.sum() < joint.sum()


def test_a_kernel_realising_another_mask_fails_the_check(monkeypatch):
    def causal_sdpa(q, k, v, block_mask, scale=None):
        S = q.shape[2]
        allowed = masks.dense(masks.causal(), S, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)

    monkeypatch.setattr(gpu_check.flex, "attention", causal_sdpa)
    (output,) = gpu_check.attention_parity(64, 16, 4, 2, 16, torch.device("cpu"), backward=False)
    assert not output.passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_a_gpu_it_says_so(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal; a GPU runs the real check")
def test_the_cpu_rehearsal_passes_every_stage_it_can_run(tmp_path):
    report, log = tmp_path / "report.json", tmp_path / "gpu_check.log"
    stages = "environment,flex_attention,train_bf16,train_mxfp8,resume,export,decode,multi_gpu"
    argv = ["--allow-cpu", "--quick", "--only", stages, "--report", str(report), "--work", str(tmp_path)]
    (code,), _ = wait([fork(partial(gpu_check.main, argv), log=log)], timeout=600)
    assert code == 0, log.read_text()[-8000:]
    results = {s["name"]: s for s in json.loads(report.read_text())["stages"]}
    assert {n: s["status"] for n, s in results.items()} == {
        "environment": "pass",
        "flex_attention": "skip",
        "train_bf16": "pass",
        "train_mxfp8": "skip",
        "resume": "pass",
        "export": "pass",
        "decode": "pass",
        "multi_gpu": "skip",
    }
    resumed = results["resume"]["figures"]
    assert resumed["resumed_losses"] == {k: resumed["first_run_losses"][k] for k in ("4", "5", "6")}
    assert results["decode"]["figures"]["self_spec_equals_ar"] == {"self_spec": True, "self_spec_fused": True}
    train = results["train_bf16"]["figures"]
    assert (train["layers"], train["attention"], len(train["losses"])) == ("megatron local", "sdpa", 3)


@pytest.mark.gpu
def test_the_gpu_check_passes_quick(tmp_path):
    assert gpu_check.main(["--quick", "--report", str(tmp_path / "report.json")]) == 0
