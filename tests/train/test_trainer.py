"""The trainer end to end on CPU: exact resume after SIGTERM, TP/PP/DP on gloo, resharded resume,
and recovery from a corrupt checkpoint. Each run is a real `python -m train` (or torchrun) process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

# A small model on the demo data: fast steps, same code path as the quickstart.
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "data.seq_length=64",
    "objective.block_size=16",
    "global_batch_size=8",
    "micro_batch_size=4",
    "logging.interval=1",
    "logging.eval_interval=0",
    "logging.tensorboard=false",
    "optim.warmup_steps=2",
    "checkpoint.interval=0",
]

pytestmark = pytest.mark.slow


def command(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "train"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "train",
        ]
    return [*launcher, *SMALL, f"run_dir={run_dir}", *overrides]


def environment(demo: Path) -> dict[str, str]:
    return dict(os.environ, TANDEM_DATA=str(demo), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def train(demo: Path, run_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(run_dir, *overrides, nproc=nproc),
        cwd=REPO,
        env=environment(demo),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


def test_resume_after_sigterm_is_exact(demo_data, tmp_path):
    steps = "steps=24"
    straight = tmp_path / "straight"
    train(demo_data, straight, steps)

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        command(interrupted, steps),
        cwd=REPO,
        env=environment(demo_data),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    stopped_at = max(losses(interrupted))
    assert 3 <= stopped_at < 24, output
    assert "stopping at step" in output
    assert (interrupted / "checkpoints" / f"iter_{stopped_at:07d}").is_dir()

    resumed = train(demo_data, interrupted, steps)
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, got = losses(straight), losses(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, 25))
    assert got == expected  # identical at every step, fp32 on CPU


def test_data_parallel_run_matches_single_process(demo_data, tmp_path):
    run_dir = tmp_path / "dp2"
    train(demo_data, run_dir, "steps=4", nproc=2)
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    single = tmp_path / "dp1"
    train(demo_data, single, "steps=4")
    # Same global batches and per-sample masks: DP=2 matches DP=1 up to the order of reductions.
    for step in got:
        assert got[step] == pytest.approx(losses(single)[step], rel=1e-5)


def test_tensor_parallel_checkpoint_resumes_at_tp1_with_the_same_loss(demo_data, tmp_path):
    tp2 = tmp_path / "tp2"
    train(demo_data, tp2, "steps=4", "checkpoint.interval=2", "checkpoint.keep=0", "parallel=tp2", nproc=2)
    resharded = tmp_path / "tp1"
    shutil.copytree(tp2, resharded)
    shutil.rmtree(resharded / "checkpoints" / "iter_0000004")
    (resharded / "checkpoints" / "latest").write_text("iter_0000002")
    (resharded / "metrics.jsonl").unlink()
    train(demo_data, resharded, "steps=4")
    assert sorted(losses(resharded)) == [3, 4]
    for step in (3, 4):
        assert losses(resharded)[step] == pytest.approx(losses(tp2)[step], rel=1e-4)


def test_pipeline_parallel_finetune_matches_single_process(demo_data, tmp_path):
    # Random init differs between layouts, so both start from the same weights (finetune mode).
    start = tmp_path / "start"
    train(demo_data, start, "steps=1")
    weights = ["checkpoint.load=" + str(start / "checkpoints"), "checkpoint.finetune=true", "steps=3"]
    pp2, single = tmp_path / "pp2", tmp_path / "pp1"
    train(demo_data, pp2, *weights, "parallel=pp2", nproc=2)
    train(demo_data, single, *weights)
    assert sorted(losses(pp2)) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses(pp2)[step] == pytest.approx(losses(single)[step], rel=1e-5)


def test_corrupt_checkpoint_falls_back_to_the_previous_good_one(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    train(demo_data, run_dir, "steps=4", "checkpoint.interval=2", "checkpoint.keep=0")
    checkpoints = run_dir / "checkpoints"
    shard = max((checkpoints / "iter_0000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (checkpoints / "iter_0000006.tmp").mkdir()  # a save that never finished
    resumed = train(demo_data, run_dir, "steps=5")
    output = resumed.stdout + resumed.stderr
    assert "skipping checkpoint" in output and "iter_0000004" in output
    assert "iter_0000002" in output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"][-3:] == [3, 4, 5]
