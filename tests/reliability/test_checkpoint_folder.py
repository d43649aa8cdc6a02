"""The checkpoint folder's book-keeping without a model: pruning by step, ``latest``, verification, the
run lock. Milliseconds each; the trainer-level cases are in ``test_faults.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train import checkpoint as ckpt


def fake_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    """A folder with one file and a format-2 manifest of it (what ``verify`` reads)."""
    folder = root / f"iter_{step:07d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(payload)
    entry = {"bytes": len(payload), "sha256": ckpt._sha256(folder / "__0_0.distcp")}
    manifest = {"format": 2, "state": {"step": step}, "files": {"__0_0.distcp": entry}}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    return folder


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_pruning_orders_by_step_and_spares_latest_the_new_one_and_newer_ones(tmp_path):
    for step in (100, 200, 300, 800, 1000):
        fake_checkpoint(tmp_path, step)
    (tmp_path / ckpt.LATEST).write_text("iter_0000200")
    written = fake_checkpoint(tmp_path, 400)  # e.g. saved after a restart below older folders' steps
    ckpt._prune(tmp_path, keep=1, written=written)
    # 100 and 300 go; 200 (latest names it), 400 (just written), 800 and 1000 (newer) stay.
    assert names(tmp_path) == ["iter_0000200", "iter_0000400", "iter_0000800", "iter_0001000"]


def test_pruning_keeps_the_newest_by_step_and_clears_interrupted_leftovers(tmp_path):
    for step in (5, 10, 20):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "iter_0000003.deleting").mkdir()  # a deletion a crash interrupted
    (tmp_path / "iter_0000015.tmp").mkdir()  # a save a crash interrupted
    (tmp_path / ckpt.LATEST).write_text("iter_0000020")
    ckpt._prune(tmp_path, keep=2, written=tmp_path / "iter_0000020")
    assert names(tmp_path) == ["iter_0000010", "iter_0000020"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff\xfe\x00garbage", "not a checkpoint name"),
        (b"", "is empty"),
        (b"../../etc", "not a checkpoint name"),
    ],
)
def test_a_damaged_latest_is_named_not_raised(tmp_path, content, why):
    (tmp_path / ckpt.LATEST).write_bytes(content)
    named, problem = ckpt.read_latest(tmp_path)
    assert named is None and why in problem


def test_a_latest_naming_a_missing_newer_folder_counts_as_a_damaged_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 10)
    (tmp_path / ckpt.LATEST).write_text("iter_0000020")
    entries = ckpt._inventory(tmp_path)
    assert [e.name for e in entries] == ["iter_0000020", "iter_0000010"]
    assert "folder is missing" in entries[0].problem


def test_same_size_garbage_is_caught_by_the_checksums(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    (folder / "__0_0.distcp").write_bytes(b"garbage")  # as many bytes as b"weights"
    assert ckpt.verify(folder) is None  # the sizes alone cannot see it
    assert "does not match its sha256" in ckpt.verify(folder, checksums=True)
    (folder / ckpt.MANIFEST).write_bytes(os.urandom(64))
    assert "tandem.json is unreadable" in ckpt.verify(folder, checksums=True)


# ---- the run lock ------------------------------------------------------------------------------


def test_a_second_trainer_is_refused_naming_the_owner(tmp_path):
    first = ckpt.RunLock([tmp_path])
    first.acquire()
    try:
        with pytest.raises(ckpt.RunLocked, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
            ckpt.RunLock([tmp_path]).acquire()
    finally:
        first.release()
    assert not (tmp_path / ckpt.LOCK).exists()
    second = ckpt.RunLock([tmp_path])
    second.acquire()  # free again once released
    second.release()


def write_lock(folder: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = folder / ckpt.LOCK
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age_s}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    write_lock(tmp_path, socket.gethostname(), int(dead.stdout))
    lock = ckpt.RunLock([tmp_path])
    lock.acquire()
    assert json.loads((tmp_path / ckpt.LOCK).read_text())["pid"] == os.getpid()
    assert "is no longer running" in caplog.text
    lock.release()


def test_an_owner_elsewhere_is_trusted_until_its_heartbeat_is_stale(tmp_path):
    write_lock(tmp_path, "another-node", 1234, age_s=5)
    with pytest.raises(ckpt.RunLocked, match="host another-node, pid 1234"):
        ckpt.RunLock([tmp_path]).acquire()
    write_lock(tmp_path, "another-node", 1234, age_s=ckpt.RunLock.STALE_AFTER_S + 5)
    lock = ckpt.RunLock([tmp_path])
    lock.acquire()
    lock.release()


def test_a_lock_on_two_folders_is_all_or_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    write_lock((tmp_path / "ckpt").mkdir() or tmp_path / "ckpt", "another-node", 1)
    with pytest.raises(ckpt.RunLocked):
        ckpt.RunLock([tmp_path / "run", tmp_path / "ckpt"]).acquire()
    assert not (tmp_path / "run" / ckpt.LOCK).exists()  # the first one taken was given back
