"""launch/torchrun.sh on this machine: 2 CPU processes through two steps, every argument a Hydra
override, one run folder and nothing else written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.factories import SMALL_RUN

pytestmark = pytest.mark.slow


def test_torchrun_launcher_trains_with_two_processes(demo_data, tmp_path):
    env = dict(
        os.environ,
        NPROC_PER_NODE="2",
        PYTHON=sys.executable,
        TANDEM_DATA=str(demo_data),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), *SMALL_RUN, "run_dir=run", "steps=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "world 2 (tp 1, pp 1, dp 2)" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
