"""Failing starts through the real launchers (a fresh ``python -m train``, and torchrun with two gloo
ranks): each exits non-zero well within a minute, with a named error and no traceback of ours. The
many other failing cases run through ``harness.py`` (the same entry point, forked)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, process_env, torchrun_command
from tests.factories import SMALL_RUN
from tests.reliability.harness import DEADLINE_S

pytestmark = pytest.mark.slow
# A traceback through Tandem's code (torchrun's own, on a failed child, goes through torch's alone).
OUR_FRAMES = f'File "{REPO}/train/'


def launch(cmd: list[str], env: dict[str, str], marker: str) -> tuple[int, str, float, float]:
    """Run ``cmd``; (exit code, stderr, seconds in all, seconds from the last stderr line holding
    ``marker`` to the exit). The second figure is the one that matters: a fresh interpreter's imports
    take about 20 s on 2 idle cores (more on a busy machine), the exit after the error must be prompt."""
    began = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines, seen = [], None
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            seen = time.monotonic()
    code = proc.wait(timeout=3 * DEADLINE_S)
    ended = time.monotonic()
    return code, "".join(lines), ended - began, ended - (seen or began)


def assert_prompt_exit(code: int, err: str, total: float, after_error: float) -> None:
    assert code != 0, err[-3000:]
    assert after_error < 15, f"{after_error:.1f} s from the error to the exit"
    assert total < 3 * DEADLINE_S, f"{total:.1f} s in all"
    assert OUR_FRAMES not in err, err[-3000:]  # torchrun prints its own traceback; no rank printed one


def trainer_args(run_dir: Path, *overrides: str) -> list[str]:
    return [*SMALL_RUN, f"run_dir={run_dir}", "steps=2", *overrides]


def test_a_missing_data_prefix_exits_at_once(demo_data, tmp_path):
    nowhere = [
        f"data.prefixes=[{tmp_path}/nowhere]",
        "data.weights=null",
        f"data.valid_prefixes=[{tmp_path}/v]",
    ]
    cmd = [sys.executable, "-m", "train", *trainer_args(tmp_path / "run", *nowhere)]
    code, err, total, after_error = launch(cmd, process_env(TANDEM_DATA=str(demo_data)), "FileNotFoundError")
    assert_prompt_exit(code, err, total, after_error)
    assert code == 1 and "FileNotFoundError: dataset prefix" in err and "Traceback" not in err


def test_a_truncated_bin_under_torchrun_stops_both_ranks(demo_data, tmp_path):
    data = Path(shutil.copytree(demo_data, tmp_path / "data", ignore=shutil.ignore_patterns("cache")))
    with open(data / "wiki_train.bin", "r+b") as f:
        f.truncate(1000)
    cmd = torchrun_command(2, "-m", "train", *trainer_args(tmp_path / "run"))
    code, err, total, after_error = launch(cmd, process_env(TANDEM_DATA=str(data)), "DataError")
    assert_prompt_exit(code, err, total, after_error)
    assert "rank 0: DataError" in err and "rank 1: DataError" in err


def test_one_rank_failing_alone_stops_the_other_under_torchrun(demo_data, tmp_path):
    cmd = torchrun_command(
        2, str(REPO / "tests/reliability/failing_rank.py"), *trainer_args(tmp_path / "run")
    )
    code, err, total, after_error = launch(cmd, process_env(TANDEM_DATA=str(demo_data)), "DataError")
    assert_prompt_exit(code, err, total, after_error)
    assert "rank 1: DataError: injected on rank 1 only" in err
