"""A checkpoint saved right after an optimizer step holds that step's weights on every rank, also
with the distributed optimizer's parameter all-gather deferred to the next forward
(``parallel.overlap_param_gather``, all six recipes): the reference is the same step with the gather
done at once."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.conftest import run_ranks
from tests.train import param_sync_worker

pytestmark = pytest.mark.slow


def test_a_checkpoint_after_a_step_holds_that_steps_weights(demo_data, tmp_path):
    synchronous, overlapped = tmp_path / "sync", tmp_path / "overlap"
    env = {"TANDEM_DATA": str(demo_data)}
    run_ranks(partial(param_sync_worker.run, synchronous, overlap=False), 2, tmp_path / "sync", env=env)
    run_ranks(partial(param_sync_worker.run, overlapped, overlap=True), 2, tmp_path / "overlap", env=env)
    expected = torch.load(synchronous / "saved.pt")
    got = torch.load(overlapped / "saved.pt")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
