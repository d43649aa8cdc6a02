"""The trainer end to end on CPU: exact resume after SIGTERM, resume at other TP/PP/DP layouts, recovery
from a corrupt checkpoint, NaN stops, bf16. Each run is the real CLI (``python -m train``'s
``main``, Hydra and all) in a process of its own, forked from a warm one (``tests/conftest.py``): one
process, or the ranks of a gloo world as torchrun would start them.

One reference run (24 steps, checkpoints every 6) serves as the baseline: with a constant learning rate
after warmup, a run's trajectory does not depend on its total step count, so a run resumed from the
reference's step-6 checkpoint in another layout must reproduce the reference's losses."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import fork, run_ranks, trainer, wait
from tests.factories import SMALL_RUN as SMALL
from train.logger import read_metrics

STEPS = 24
_starts = itertools.count()

pytestmark = pytest.mark.slow


def train(demo: Path, run_dir: Path, *overrides: str, nproc: int = 1, code: int = 0) -> str:
    """A run on ``nproc`` ranks, each of which must exit with ``code``; rank 0's output."""
    finished = run_ranks(
        trainer(*SMALL, f"run_dir={run_dir}", *overrides),
        nproc,
        run_dir.with_name(f"{run_dir.name}.start{next(_starts)}"),
        env={"TANDEM_DATA": str(demo)},
        timeout=600,
        check=code == 0,
    )
    for rank in finished:
        assert rank.code == code, rank.output[-3000:]
    return finished[0].output


def losses(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(demo_data, run_dir, f"steps={STEPS}", "checkpoint.interval=6", "checkpoint.keep=0")
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


def resumable_copy(reference: Path, target: Path, step: int) -> Path:
    """The reference run folder as it was right after saving at ``step``."""
    shutil.copytree(reference / "checkpoints", target / "checkpoints")
    for folder in (target / "checkpoints").glob("iter_*"):
        if int(folder.name.split("_")[1]) > step:
            shutil.rmtree(folder)
    (target / "checkpoints" / "latest").write_text(f"iter_{step:07d}")
    return target


def assert_same_losses(got: dict[int, float], expected: dict[int, float], steps, rel: float) -> None:
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=rel), step


def test_resume_after_sigterm_is_exact(demo_data, reference, tmp_path):
    interrupted = tmp_path / "interrupted"
    log = tmp_path / "interrupted.log"
    child = fork(
        trainer(*SMALL, f"run_dir={interrupted}", f"steps={STEPS}"),
        log=log,
        env={"TANDEM_DATA": str(demo_data)},
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(losses(interrupted)) < 3:
        assert child.exitcode is None, log.read_text()
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGTERM)
    (code,), _ = wait([child], 300)
    output = log.read_text()
    assert code == 0, output
    stopped_at = max(losses(interrupted))
    assert 3 <= stopped_at < STEPS, output
    assert "stopping at step" in output
    assert (interrupted / "checkpoints" / f"iter_{stopped_at:07d}").is_dir()

    output = train(demo_data, interrupted, f"steps={STEPS}")
    assert f"resumed from {interrupted / 'checkpoints' / f'iter_{stopped_at:07d}'}" in output
    assert losses(interrupted) == losses(reference)  # identical at every step, fp32 on CPU


def test_tensor_parallel_resumes_both_ways(demo_data, reference, tmp_path):
    """TP=1 checkpoint -> TP=2 run -> TP=2 checkpoint -> TP=1 run, each matching the reference."""
    run_dir = resumable_copy(reference, tmp_path / "tp", step=6)
    train(demo_data, run_dir, "steps=12", "parallel=tp2", "checkpoint.interval=6", nproc=2)
    assert_same_losses(losses(run_dir), losses(reference), range(7, 13), rel=1e-4)
    (run_dir / "metrics.jsonl").unlink()
    output = train(demo_data, run_dir, "steps=14")
    assert "resumed from" in output and "iter_0000012" in output
    assert_same_losses(losses(run_dir), losses(reference), range(13, 15), rel=1e-4)


def test_pipeline_parallel_resume_matches_the_reference(demo_data, reference, tmp_path):
    run_dir = resumable_copy(reference, tmp_path / "pp", step=6)
    train(demo_data, run_dir, "steps=9", "parallel=pp2", nproc=2)
    assert_same_losses(losses(run_dir), losses(reference), range(7, 10), rel=1e-4)


def test_data_parallel_resume_matches_the_reference(demo_data, reference, tmp_path):
    # The same global batches and per-sample masks: DP=2 matches DP=1 up to the order of reductions.
    run_dir = resumable_copy(reference, tmp_path / "dp", step=6)
    train(demo_data, run_dir, "steps=9", nproc=2)
    assert_same_losses(losses(run_dir), losses(reference), range(7, 10), rel=1e-5)


def test_finetune_loads_weights_only(demo_data, reference, tmp_path):
    run_dir = tmp_path / "finetune"
    output = train(
        demo_data,
        run_dir,
        "steps=2",
        f"checkpoint.load={reference / 'checkpoints'}",
        "checkpoint.finetune=true",
    )
    assert "resumed from" not in output and "weights from" in output
    got = losses(run_dir)
    assert sorted(got) == [1, 2]
    # Weights of step 24, but the data from the start: the loss is far below the reference's step 1.
    assert got[1] < losses(reference)[1] - 0.5


def truncate_largest_shard(folder: Path) -> None:
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)


def test_corrupt_checkpoint_falls_back_to_the_previous_good_one(demo_data, reference, tmp_path):
    run_dir = resumable_copy(reference, tmp_path / "corrupt", step=12)
    checkpoints = run_dir / "checkpoints"
    truncate_largest_shard(checkpoints / "iter_0000012")
    (checkpoints / "iter_0000018.tmp").mkdir()  # a save that never finished
    output = train(demo_data, run_dir, "steps=8", "checkpoint.on_unreadable=previous")
    assert "iter_0000012 is unusable" in output and "resumed from" in output and "iter_0000006" in output
    assert (checkpoints / "unreadable" / "iter_0000012").is_dir()  # moved aside, not deleted
    assert_same_losses(losses(run_dir), losses(reference), range(7, 9), rel=1e-6)


def test_by_default_an_unreadable_checkpoint_stops_the_run_listing_each_one(demo_data, reference, tmp_path):
    run_dir = resumable_copy(reference, tmp_path / "stop", step=18)
    checkpoints = run_dir / "checkpoints"
    truncate_largest_shard(checkpoints / "iter_0000018")
    (checkpoints / "iter_0000012" / "tandem.json").write_text("{")
    output = train(demo_data, run_dir, "steps=20", code=1)
    assert "Traceback" not in output, output[-3000:]
    listing = output[output.index("CheckpointUnreadable") :]
    assert "iter_0000018: __0_" in listing and "truncated" in listing  # the one tried, and why
    assert "iter_0000012: tandem.json is unreadable" in listing  # the older ones, and why
    assert "iter_0000006: complete by its sizes" in listing
    assert "checkpoint.on_unreadable=previous" in listing
    assert not (run_dir / "metrics.jsonl").exists()  # no step trained, nothing saved or moved
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == [
        "iter_0000006",
        "iter_0000012",
        "iter_0000018",
    ]


def test_a_diverging_run_stops_naming_the_step_and_micro_batch(demo_data, tmp_path):
    output = train(
        demo_data,
        tmp_path / "nan",
        "steps=5",
        "optim.lr=1e30",
        "optim.min_lr=0",
        "optim.warmup_steps=0",
        "optim.clip_grad=0",
        code=1,
    )
    assert "non-finite" in output and "at step" in output, output[-2000:]


def test_bf16_mixed_precision_trains_resumes_and_exports(demo_data, tmp_path):
    run_dir = tmp_path / "bf16"
    train(demo_data, run_dir, "steps=3", "precision=bf16")
    assert "resumed from" in train(demo_data, run_dir, "steps=4", "precision=bf16")
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    from safetensors.torch import load_file

    from train.convert import export_checkpoint
    from train.distributed import single_process

    with single_process():
        out = export_checkpoint(run_dir, tmp_path / "hf")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
