"""Tensor and pipeline parallelism on gloo (2 processes) against the single-process model.

The reference run saves a dist checkpoint at TP=PP=1; the parallel runs load it into their own layout
(megatron.core reshards), so all layouts hold the same weights. Each rank is a process forked from a
warm one (``tests/conftest.py``), in torchrun's environment."""

from functools import partial
from pathlib import Path

import pytest
import torch

from tests.conftest import run_ranks
from tests.model import parallel_worker


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    run_ranks(partial(parallel_worker.run, out, save=True), 1, out / "reference")
    return out


def test_tensor_parallel_logits_and_losses_equal_single_process(reference):
    run_ranks(partial(parallel_worker.run, reference, tp=2), 2, reference / "tp2")
    expected = torch.load(reference / "reference.pt")
    got = torch.load(reference / "tp2_pp1_stage0.pt")
    torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["losses"], expected["losses"], atol=1e-6, rtol=1e-6)


def test_pipeline_parallel_losses_equal_single_process(reference):
    run_ranks(partial(parallel_worker.run, reference, pp=2), 2, reference / "pp2")
    expected = torch.load(reference / "reference.pt")
    got = torch.load(reference / "tp1_pp2_stage1.pt")
    torch.testing.assert_close(got["losses"], expected["losses"], atol=1e-6, rtol=1e-6)
    assert got["has_grads"]
