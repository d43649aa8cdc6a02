"""Tensor and pipeline parallelism on gloo (2 processes) against the single-process model.

The reference run saves a dist checkpoint at TP=PP=1; the parallel runs load it into their own layout
(megatron.core reshards), so all layouts hold the same weights."""

from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    run_torchrun(WORKER, 1, "--dir", str(out), "--save")
    return out


def test_tensor_parallel_logits_and_losses_equal_single_process(reference):
    run_torchrun(WORKER, 2, "--dir", str(reference), "--tp", "2")
    expected = torch.load(reference / "reference.pt")
    got = torch.load(reference / "tp2_pp1_stage0.pt")
    torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["losses"], expected["losses"], atol=1e-6, rtol=1e-6)


def test_pipeline_parallel_losses_equal_single_process(reference):
    run_torchrun(WORKER, 2, "--dir", str(reference), "--pp", "2")
    expected = torch.load(reference / "reference.pt")
    got = torch.load(reference / "tp1_pp2_stage1.pt")
    torch.testing.assert_close(got["losses"], expected["losses"], atol=1e-6, rtol=1e-6)
    assert got["has_grads"]
