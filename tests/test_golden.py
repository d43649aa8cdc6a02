"""The golden record: what the tree computes (composed configs, a few training steps of four
objective variants, an export, greedy and sampled decodes in every mode) equals what the code before the
one-source refactor computed (``tests/golden/quickstart.json``, written by that code)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, command, run_ranks
from tests.golden import record

RECORD = REPO / "tests" / "golden" / "quickstart.json"

pytestmark = pytest.mark.slow


def test_the_tree_reproduces_the_golden_record(demo_data, tmp_path):
    out = tmp_path / "record.json"
    make = command(record.main, "--data", str(demo_data), "--out", str(out))
    run_ranks(make, 1, tmp_path / "record", timeout=900)
    found = record.compare(json.loads(RECORD.read_text()), json.loads(out.read_text()))
    assert not found, "\n".join(found[:40])


def test_the_comparison_sees_a_changed_loss_a_changed_token_and_a_missing_key():
    expected = {"runs": {"joint": {"rows": [{"loss": 8.25}], "decode": {"ids": [5, 6]}}}, "configs": {}}
    assert record.compare(expected, json.loads(json.dumps(expected))) == []
    assert record.compare(
        expected,
        {**expected, "runs": {"joint": {"rows": [{"loss": 8.25 * (1 + 1e-4)}], "decode": {"ids": [5, 6]}}}},
    )
    assert record.compare(
        expected, {**expected, "runs": {"joint": {"rows": [{"loss": 8.25}], "decode": {"ids": [5, 7]}}}}
    )
    assert record.compare(expected, {"runs": {"joint": {"rows": [{"loss": 8.25}]}}, "configs": {}})
