"""A checkpoint saved right after an optimizer step holds that step's weights on every rank, also
with the distributed optimizer's parameter all-gather deferred to the next forward
(``parallel.overlap_param_gather``, all six recipes): the reference is the same step with the gather
done at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("param_sync_worker.py")

pytestmark = pytest.mark.slow


def test_a_checkpoint_after_a_step_holds_that_steps_weights(demo_data, tmp_path):
    synchronous, overlapped = tmp_path / "sync", tmp_path / "overlap"
    run_torchrun(WORKER, 2, "--dir", str(synchronous), "--data", str(demo_data))
    run_torchrun(WORKER, 2, "--dir", str(overlapped), "--data", str(demo_data), "--overlap")
    expected = torch.load(synchronous / "saved.pt")
    got = torch.load(overlapped / "saved.pt")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
