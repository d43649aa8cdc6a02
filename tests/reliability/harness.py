"""Fault injection on the real trainer: every trainer start a child forked from one warm process.

Each start of a part runs ``train.__main__.main()`` exactly as ``python -m train`` does (Hydra, the
one-line errors, the exit code) in a child of ``tests/conftest.py``'s fork server, which imported the
trainer once for the whole session. This process watches each child against a deadline (a child past
it counts as a hang and is killed) and collects what it saw (``collect``) for ``test_faults.py`` to
judge.

Crashes are injected inside the child by wrappers around the file-system calls a save makes in the
trainer process (``open`` for writing, ``os.fsync``, ``os.replace``/``rename``, ``os.mkdir``,
``os.unlink``, ``shutil.rmtree``, ``shutil.copytree``): the trial kills its whole process group with
SIGKILL just before the k-th such call, k drawn from a seeded generator over every call of every save
of the run, so that each window of a save is reachable (before the rename of ``iter_N.tmp``, between
it and the ``latest`` update, inside ``latest``'s own temp-file-and-rename). Other trials kill at a
seeded delay into a save instead, while megatron's writer processes are writing the shards (no
file-system call of the trainer process happens then). A disk-full fault is the same wrapper raising
``ENOSPC`` from the writes of one chosen file of a save after a seeded number of bytes.

The losses compared are the ones a user sees: the run folder's ``metrics.jsonl``.
"""

from __future__ import annotations

import builtins
import errno
import functools
import io
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

from tests.conftest import fork, kill_group, trainer, wait, world_env
from tests.factories import SMALL_RUN
from train.distributed import free_port
from train.logger import read_metrics

DEADLINE_S = 60.0


# ---- children ------------------------------------------------------------------------------------


@dataclass
class Start:
    """One trainer start: its command line, log file, data folder ($TANDEM_DATA), further environment
    and in-child hook."""

    argv: list[str]
    log: Path
    data: Path
    env: dict[str, str] | None = None
    hook: Callable[[], None] | None = None

    def __call__(self) -> BaseProcess:
        env = {"TANDEM_DATA": str(self.data), **(self.env or {})}
        return fork(trainer(*self.argv), log=self.log, env=env, hook=self.hook)


def run_groups(groups: list[list[Start]], width: int = 2) -> list[tuple[list[int | None], float]]:
    """Run each group's starts together (the ranks of one world), at most ``width`` processes at a time
    (the cores), each group against the deadline; (exit codes, seconds) per group, in order."""
    results: list = [None] * len(groups)
    queue, running = list(enumerate(groups)), {}
    while queue or running:
        busy = sum(len(children) for children, _ in running.values())
        while queue and (not running or busy + len(queue[0][1]) <= width):
            index, group = queue.pop(0)
            running[index] = ([start() for start in group], time.monotonic())
            busy += len(group)
        for index, (children, began) in list(running.items()):
            if all(c.exitcode is not None for c in children) or time.monotonic() - began >= DEADLINE_S:
                codes = [c.exitcode for c in children]
                for child in children:
                    if child.exitcode is None:
                        kill_group(child)
                    child.join()
                results[index] = (codes, time.monotonic() - began)
                del running[index]
        time.sleep(0.02)
    return results


def run_one(start: Start) -> tuple[int | None, float]:
    ((code,), seconds) = run_groups([[start]])[0]
    return code, seconds


def run_dir_args(run_dir: Path, *overrides: str) -> list[str]:
    return [*SMALL_RUN, f"run_dir={run_dir}", *overrides]


def outcome(log: Path, code: int | None, seconds: float) -> dict:
    text = log.read_text(errors="replace")
    return {
        "code": code,
        "seconds": round(seconds, 2),
        "traceback": "Traceback" in text,
        "leftovers": [line for line in text.splitlines() if line.startswith("LEFTOVER")],
        "errors": [line for line in text.splitlines() if _is_error_line(line)],
        "tail": text[-1500:],
    }


def _is_error_line(line: str) -> bool:
    """A line of the form the trainer ends a failed start with: ``[rank N: ]Name: message``, Name an
    error's class (``DataError``, ``CheckpointUnreadable``, ...) or ``Config error`` (a library's own
    log lines, e.g. megatron.core 0.19's "Local worker 0 encountered an error: ...", are not)."""
    head = line.split(": ", 2)
    names = head[1:2] if line.startswith("rank ") else head[:1]
    return bool(names) and (
        names[0] == "Config error"
        or (" " not in names[0] and names[0].endswith(("Error", "Unreadable", "Mismatch", "Locked")))
    )


def metrics_rows(run_dir: Path) -> int:
    """How many rows the run folder's metrics.jsonl holds (those a later start appends come after)."""
    return len(read_metrics(run_dir / "metrics.jsonl"))


def train_losses(run_dir: Path, after: int = 0) -> dict[int, float]:
    """Step -> training loss in the run folder's metrics.jsonl, from its row ``after`` on."""
    rows = read_metrics(run_dir / "metrics.jsonl")[after:]
    return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


# ---- file-system faults inside a child -----------------------------------------------------------


class _Faults:
    """Wraps the file-system calls of the trainer process while a save runs; ``action(event)`` is
    called before each, numbered over the whole run. Writer processes megatron forks inherit the
    wrappers but act only for ``ENOSPC`` faults (``on_write``)."""

    def __init__(self, log: Path, action=None, on_write=None):
        self.log = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.action, self.on_write = action, on_write
        self.owner, self.in_save, self.count = os.getpid(), False, 0

    def note(self, text: str) -> None:
        os.write(self.log, (text + "\n").encode())

    def event(self, kind: str, path) -> None:
        if os.getpid() != self.owner or not self.in_save:
            return
        self.count += 1
        self.note(f"event {self.count} {kind} {path}")
        if self.action is not None:
            self.action(self.count)

    def install(self) -> None:
        import train.checkpoint as ckpt

        faults = self

        def wrap(module, name, kind, path_arg=0):
            original = getattr(module, name)

            def wrapper(*args, **kwargs):
                path = args[path_arg] if len(args) > path_arg else kwargs.get("file", "")
                faults.event(kind, path)
                return original(*args, **kwargs)

            setattr(module, name, wrapper)

        for name in ("replace", "rename", "mkdir", "unlink", "fsync"):
            wrap(os, name, name)
        for name in ("rmtree", "copytree"):
            wrap(shutil, name, name)
        original_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            if writing:
                faults.event("open", file)
            handle = original_open(file, mode, *args, **kwargs)
            if writing and faults.on_write is not None:
                budget = faults.on_write(str(file))
                if budget is not None:
                    return _FullDisk(handle, budget)
            return handle

        builtins.open = io.open = open_
        original_save = ckpt.save

        def save(root, models, optimizer, state, *args, **kwargs):
            faults.in_save = True
            faults.note(f"save {state.step} begins")
            try:
                folder = original_save(root, models, optimizer, state, *args, **kwargs)
            finally:
                faults.in_save = False
            faults.note(f"save {state.step} done")
            return folder

        ckpt.save = save


class _FullDisk:
    """A writable file that runs out of space after ``budget`` bytes."""

    def __init__(self, handle, budget: int):
        self._handle, self._left = handle, budget

    def write(self, data):
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self._left -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def log_events(events: Path) -> None:
    """A hook: every file-system call of the run's saves logged to ``events``, nothing injected."""
    _Faults(events).install()


def kill_before_event(events: Path, k: int) -> Callable[[], None]:
    """A hook: SIGKILL to the whole process group just before the ``k``-th call of the run's saves."""
    return functools.partial(_kill_before_event, events, k)


def _kill_before_event(events: Path, k: int) -> None:
    def action(count):
        if count == k:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    _Faults(events, action).install()


def kill_during_shards(events: Path, save_index: int, delay_s: float) -> Callable[[], None]:
    """A hook: SIGKILL ``delay_s`` after the shards of the ``save_index``-th save start (writers at
    work)."""
    return functools.partial(_kill_during_shards, events, save_index, delay_s)


def _kill_during_shards(events: Path, save_index: int, delay_s: float) -> None:
    import megatron.core.dist_checkpointing as dc

    faults = _Faults(events)
    faults.install()
    original, seen = dc.save, [0]

    def save(*args, **kwargs):
        seen[0] += 1
        if seen[0] == save_index:
            faults.note(f"shards of save {save_index}: kill in {delay_s:.3f} s")
            threading.Timer(delay_s, os.killpg, args=(os.getpgid(0), signal.SIGKILL)).start()
        return original(*args, **kwargs)

    dc.save = save


def disk_full(events: Path, from_save: int, target: str, budget: int) -> Callable[[], None]:
    """A hook: writes to files whose name ends with ``target`` fail with ENOSPC after ``budget``
    bytes, from the ``from_save``-th save on."""
    return functools.partial(_disk_full, events, from_save, target, budget)


def _disk_full(events: Path, from_save: int, target: str, budget: int) -> None:
    import train.checkpoint as ckpt

    saves = [0]
    faults = _Faults(
        events, on_write=lambda p: budget if saves[0] >= from_save and p.endswith(target) else None
    )
    original = ckpt.save

    def counted(*args, **kwargs):
        saves[0] += 1
        return original(*args, **kwargs)

    ckpt.save = counted
    faults.install()


# ---- parts ---------------------------------------------------------------------------------------

STEPS = 3
CRASH_RUN = ("steps=3", "checkpoint.interval=1", "checkpoint.keep=2")


def reference(work: Path, demo: Path) -> dict:
    """An uninterrupted run with every event of its saves logged: the losses and the event count."""
    run_dir, events = work / "reference", work / "reference.events"
    hook = functools.partial(log_events, events)
    start = Start(run_dir_args(run_dir, *CRASH_RUN), work / "reference.log", demo, hook=hook)
    code, seconds = run_one(start)
    assert code == 0, start.log.read_text()[-3000:]
    lines = events.read_text().splitlines()
    return {
        "losses": train_losses(run_dir),
        "events": sum(line.startswith("event ") for line in lines),
        "kinds": [line.split()[2] for line in lines if line.startswith("event ")],
        "paths": [line.split(maxsplit=3)[3] for line in lines if line.startswith("event ")],
        "seconds": seconds,
    }


def _newest_complete(checkpoints: Path) -> int:
    import train.checkpoint as ckpt

    steps = [ckpt.step_of(f) for f in ckpt.candidates(checkpoints) if ckpt.verify(f, checksums=True) is None]
    return max(steps, default=0)


def _resumed_step(log: Path) -> int:
    for line in log.read_text(errors="replace").splitlines():
        if "resumed from" in line and "iter_" in line:
            return int(line.split("iter_")[1][:7])
    return 0


def crashes(work: Path, demo: Path, ref: dict, trials: int, seed: int) -> list[dict]:
    """``trials`` runs killed at seeded points of their saves, each resumed to the end. The first two
    are killed in the windows that matter most whatever the seed: just before the rename of the second
    save's folder, and between that rename and the ``latest`` update."""
    rng, plans = random.Random(seed), []
    calls = list(zip(ref["kinds"], ref["paths"], strict=True))
    rename = calls.index(("replace", str(work / "reference/checkpoints/iter_0000002.tmp"))) + 1
    windows = [rename, rename + 1]  # before the rename; after it, before latest.tmp is written
    for trial in range(trials):
        events = work / f"crash{trial}.events"
        if trial < len(windows):
            k = windows[trial]
            how, hook = f"before event {k} ({ref['kinds'][k - 1]})", kill_before_event(events, k)
        elif trial % 5 == 4:
            save_index, delay = rng.randint(1, STEPS), rng.uniform(0.0, 0.4)
            how, hook = (
                f"{delay:.3f} s into the shards of save {save_index}",
                kill_during_shards(events, save_index, delay),
            )
        else:
            k = rng.randint(1, ref["events"])
            how, hook = f"before event {k} ({ref['kinds'][k - 1]})", kill_before_event(events, k)
        plans.append(
            (
                how,
                Start(
                    run_dir_args(work / f"crash{trial}", *CRASH_RUN),
                    work / f"crash{trial}.log",
                    demo,
                    hook=hook,
                ),
            )
        )
    killed = run_groups([[plan] for _, plan in plans])
    before = []
    for trial in range(trials):
        events = work / f"crash{trial}.events"
        lines = events.read_text().splitlines() if events.exists() else []
        returned = [
            int(line.split()[1]) for line in lines if line.startswith("save ") and line.endswith("done")
        ]
        run_dir = work / f"crash{trial}"
        before.append(
            (
                lines,
                max(returned, default=0),
                _newest_complete(run_dir / "checkpoints"),
                metrics_rows(run_dir),
            )
        )
    logs = [work / f"resume{trial}.log" for trial in range(trials)]
    resumed = run_groups(
        [
            [Start(run_dir_args(work / f"crash{trial}", *CRASH_RUN), logs[trial], demo)]
            for trial in range(trials)
        ]
    )
    found = []
    for trial in range(trials):
        (lines, returned, complete, rows), ((code,), _), ((resumed_code,), seconds) = (
            before[trial],
            killed[trial],
            resumed[trial],
        )
        log = logs[trial]
        losses = train_losses(work / f"crash{trial}", after=rows)  # the resumed run's
        found.append(
            {
                "how": plans[trial][0],
                "killed": code == -signal.SIGKILL,
                "last_event": next((line for line in reversed(lines) if line.startswith("event")), ""),
                "saves_returned": returned,
                "newest_complete": complete,
                "resumed_from": _resumed_step(log),
                "resume": outcome(log, resumed_code, seconds),
                "took_over_lock": "taking over" in log.read_text(errors="replace"),
                "compared_steps": sorted(losses),
                "exact": resumed_code == 0 and all(losses[s] == ref["losses"][s] for s in losses),
            }
        )
    return found


# ---- failing starts ------------------------------------------------------------------------------


def _overwrite(path: Path, data: bytes | None = None, keep: float | None = None) -> None:
    """Same-size garbage (``data`` None), a truncation to ``keep`` of its size, or ``data``."""
    size = path.stat().st_size
    if keep is not None:
        with open(path, "r+b") as f:
            f.truncate(int(size * keep))
        return
    path.write_bytes(os.urandom(size) if data is None else data)


def _data_copy(demo: Path, work: Path, name: str) -> Path:
    copy = work / f"data_{name}"
    shutil.copytree(demo, copy, copy_function=os.link, ignore=shutil.ignore_patterns("cache"))
    return copy


def _unlink_copy(path: Path) -> Path:
    """Replace a hard link by its own copy, so damaging it leaves the original alone."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def _damage_data(name: str, copy: Path) -> None:
    wiki = {ext: _unlink_copy(copy / f"wiki_train{ext}") for ext in (".bin", ".idx", ".json")}
    if name == "bin_truncated":
        _overwrite(wiki[".bin"], keep=0.5)
    elif name == "idx_truncated":
        _overwrite(wiki[".idx"], keep=0.7)
    elif name == "idx_garbage":
        _overwrite(wiki[".idx"])
    elif name == "json_garbage":
        _overwrite(wiki[".json"])
    elif name == "bin_garbage":
        _overwrite(wiki[".bin"])
    elif name == "bin_swapped":
        other = _unlink_copy(copy / "shakespeare_train.bin")
        a, b = wiki[".bin"].read_bytes(), other.read_bytes()
        wiki[".bin"].write_bytes(b)
        other.write_bytes(a)


DATA_CASES = ["bin_truncated", "idx_truncated", "idx_garbage", "json_garbage", "bin_garbage", "bin_swapped"]
# name -> (what to damage in the newest checkpoint iter_3 or the folder, extra overrides)
CHECKPOINT_CASES = {
    "latest_garbage": ("latest", "garbage", []),
    "latest_empty": ("latest", "empty", []),
    "latest_missing_folder": ("latest", "iter_0000009", []),
    "metadata_garbage": (".metadata", "garbage", []),
    "manifest_garbage": ("tandem.json", "garbage", []),
    "shard_truncated": ("__0_0.distcp", "truncate", []),
    "shard_garbage": ("last shard", "garbage", []),  # __0_1 (megatron.core 0.16) or __0_0 (0.19)
    "common_garbage": ("common.pt", "garbage", []),
    "config_garbage": ("config.yaml", "garbage", []),
    "previous_fallback": ("__0_0.distcp", "truncate", ["checkpoint.on_unreadable=previous"]),
    "all_damaged_previous": ("both", "truncate", ["checkpoint.on_unreadable=previous"]),
    "all_damaged_fresh": ("both", "truncate", ["checkpoint.on_unreadable=fresh"]),
    "other_shapes": (None, None, ["model.num_layers=3"]),
    "other_objective": (None, None, ["objective=ar"]),
}
CONFIG_CASES = {
    "bad_key": ["model.num_layer=3"],
    "bad_type": ["steps=many"],
    "bad_value": ["checkpoint.on_unreadable=maybe"],
}


def _names_a_missing_file(run: Path, what: str | None) -> bool:
    special = (None, "latest", "both", "last shard")
    return what not in special and not (run / "checkpoints" / "iter_0000003" / what).exists()


def _damage_checkpoint(folder: Path, what: str | None, how: str | None) -> None:
    checkpoints = folder / "checkpoints"
    if what == "latest":
        data = {"garbage": os.urandom(40), "empty": b""}.get(how, how.encode() if how else b"")
        (checkpoints / "latest").write_bytes(data)
    elif what == "both":
        for step in (2, 3):
            _overwrite(checkpoints / f"iter_{step:07d}" / "__0_0.distcp", keep=0.5)
    elif what == "last shard":
        _overwrite(sorted((checkpoints / "iter_0000003").glob("__*.distcp"))[-1], keep=None)
    elif what is not None:
        _overwrite(checkpoints / "iter_0000003" / what, keep=0.5 if how == "truncate" else None)


def failing_starts(work: Path, demo: Path, ref_run: Path, nproc: int, names: list[str] | None) -> dict:
    """Each bad config, data and checkpoint case started on ``nproc`` ranks (forked, gloo)."""
    cases, groups, logs = names or [*CONFIG_CASES, *DATA_CASES, *CHECKPOINT_CASES], [], {}
    # A file some megatron.core releases do not write (0.19 keeps no common.pt): nothing to damage.
    absent = {
        name: f"this megatron.core writes no {CHECKPOINT_CASES[name][0]}"
        for name in cases
        if name in CHECKPOINT_CASES and _names_a_missing_file(ref_run, CHECKPOINT_CASES[name][0])
    }
    cases = [name for name in cases if name not in absent]
    for name in cases:
        folder = work / f"start{nproc}_{name}"
        overrides, env = ["steps=4", "checkpoint.interval=1", "checkpoint.keep=2"], {}
        if name in CONFIG_CASES:
            overrides += CONFIG_CASES[name]
        elif name in DATA_CASES:
            copy = _data_copy(demo, work, f"{nproc}_{name}")
            _damage_data(name, copy)
            env["TANDEM_DATA"] = str(copy)  # over the demo data's
        else:
            shutil.copytree(ref_run, folder)
            what, how, extra = CHECKPOINT_CASES[name]
            _damage_checkpoint(folder, what, how)
            overrides += extra
        port, logs[name] = free_port(), [work / f"start{nproc}_{name}.{rank}.log" for rank in range(nproc)]
        ranks = [{**env, **(world_env(rank, nproc, port) if nproc > 1 else {})} for rank in range(nproc)]
        groups.append(
            [Start(run_dir_args(folder, *overrides), logs[name][r], demo, ranks[r]) for r in range(nproc)]
        )
    found: dict = dict(absent)
    for name, (codes, seconds) in zip(cases, run_groups(groups), strict=True):
        found[name] = [outcome(log, code, seconds) for log, code in zip(logs[name], codes, strict=True)]
        checkpoints = work / f"start{nproc}_{name}" / "checkpoints"
        found[name][0]["folders"] = (
            sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        )
        aside = checkpoints / "unreadable"
        found[name][0]["unreadable"] = sorted(p.name for p in aside.iterdir()) if aside.is_dir() else []
        found[name][0]["resumed_from"] = _resumed_step(logs[name][0])
    return found


def fail_on_rank_1() -> None:
    """A hook: rank 1's data check fails (as on a node that cannot read a prefix); the others pass."""
    if os.environ.get("RANK") == "1":
        import train.trainer
        from data.metadata import DataError

        def check_data(*args, **kwargs):
            raise DataError("injected on rank 1 only: a prefix this node cannot read")

        train.trainer.check_data = check_data


def one_rank_fails(work: Path, demo: Path) -> list[dict]:
    """Rank 1 of 2 fails its data check while rank 0 goes on into the first collectives."""
    port, logs = free_port(), [work / f"one_rank_fails.{rank}.log" for rank in range(2)]
    args = run_dir_args(work / "one_rank_fails", "steps=2")
    group = [Start(args, logs[r], demo, world_env(r, 2, port), hook=fail_on_rank_1) for r in range(2)]
    ((codes, seconds),) = run_groups([group])
    return [outcome(log, code, seconds) for log, code in zip(logs, codes, strict=True)]


def _wait_for(condition, seconds: float = DEADLINE_S) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def two_trainers(work: Path, demo: Path) -> dict:
    """A second trainer on a live run's folder, then a third after the first was killed."""
    run_dir = work / "shared_run"
    first = Start(run_dir_args(run_dir, "steps=1000", "checkpoint.interval=0"), work / "first.log", demo)()
    started = _wait_for(lambda: metrics_rows(run_dir) >= 1)
    config_before = (run_dir / "config.yaml").stat().st_mtime_ns if started else None
    second_code, second_s = run_one(Start(run_dir_args(run_dir, "steps=3"), work / "second.log", demo))
    config_after = (run_dir / "config.yaml").stat().st_mtime_ns if started else None
    kill_group(first)
    first.join()
    third_code, third_s = run_one(Start(run_dir_args(run_dir, "steps=1"), work / "third.log", demo))
    return {
        "first_pid": first.pid,
        "started": started,
        "second": outcome(work / "second.log", second_code, second_s),
        "second_left_config_alone": config_before == config_after,
        "third": outcome(work / "third.log", third_code, third_s),
        "third_took_over": "taking over" in (work / "third.log").read_text(),
        "lock_left": (run_dir / "tandem.lock").exists(),
    }


def _slow_saves(seconds: float) -> None:
    """A hook: each save starts ``seconds`` late (the window a second Ctrl-C lands in, however loaded
    the machine is)."""
    import train.checkpoint as ckpt

    original = ckpt.save

    def save(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    ckpt.save = save


def interrupts(work: Path, demo: Path) -> dict:
    """Ctrl-C once (save, exit 0) and twice (exit 130 at once, the second while the save the first
    asked for is pending), each after a few steps."""
    found = {}
    for name, count in (("once", 1), ("twice", 2)):
        run_dir = work / f"sigint_{name}"
        argv = run_dir_args(run_dir, "steps=1000", "checkpoint.interval=0")
        hook = functools.partial(_slow_saves, 5.0) if count == 2 else None
        child = Start(argv, work / f"sigint_{name}.log", demo, hook=hook)()
        _wait_for(lambda r=run_dir: metrics_rows(r) >= 2)
        for _ in range(count):
            os.kill(child.pid, signal.SIGINT)
            time.sleep(0.05)
        (code,), seconds = wait([child], DEADLINE_S)
        found[name] = outcome(work / f"sigint_{name}.log", code, seconds)
        checkpoints = run_dir / "checkpoints"
        found[name]["folders"] = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        found[name]["lock_left"] = (run_dir / "tandem.lock").exists()
    return found


# Files a save writes besides megatron's shards: its own process's and Tandem's.
SAVE_FILES = [".metadata.tmp", "metadata.json", "config.yaml", "tandem.json.tmp", "latest.tmp"]


def full_disk_targets(work: Path) -> list[str]:
    """Every file a save writes: the shards of the reference run's last checkpoint (megatron.core
    0.16's writer writes two per rank, 0.19's one), then the others."""
    shards = sorted(p.name for p in (work / "reference/checkpoints/iter_0000003").glob("__*.distcp"))
    assert shards, "the reference run's checkpoint holds no shard file"
    return shards + SAVE_FILES


def full_disks(work: Path, demo: Path, ref: dict, seed: int) -> list[dict]:
    """The disk fills up during the second save, in each file of it in turn, after a seeded number of
    bytes; the first run's checkpoint is then resumed from."""
    rng = random.Random(seed)
    targets = full_disk_targets(work)
    budgets = [rng.choice([0, rng.randint(1, 100)]) for _ in targets]  # every file is larger
    runs = run_groups(
        [
            [
                Start(
                    run_dir_args(work / f"full{t}", *CRASH_RUN),
                    work / f"full{t}.log",
                    demo,
                    hook=disk_full(work / f"full{t}.events", 2, target, budgets[t]),
                )
            ]
            for t, target in enumerate(targets)
        ]
    )
    found = []
    for t, ((code,), seconds) in enumerate(runs):
        checkpoints = work / f"full{t}" / "checkpoints"
        found.append(
            {
                "target": targets[t],
                "budget": budgets[t],
                "run": outcome(work / f"full{t}.log", code, seconds),
                "folders": sorted(p.name for p in checkpoints.iterdir()),
                "newest_complete": _newest_complete(checkpoints),
            }
        )
    log, rows = work / "full_resume.log", metrics_rows(work / "full0")
    code, seconds = run_one(Start(run_dir_args(work / "full0", *CRASH_RUN), log, demo))
    losses = train_losses(work / "full0", after=rows)  # the resumed run's
    found[0]["resume"] = outcome(log, code, seconds)
    found[0]["resumed_from"] = _resumed_step(log)
    found[0]["exact"] = bool(losses) and all(losses[s] == ref["losses"][s] for s in losses)
    return found


PARTS = ("crashes", "starts1", "starts2", "one_rank_fails", "two_trainers", "interrupts", "full_disks")
# The cases worth a second rank: each kind of failure, where one rank could wait for another.
TWO_RANK_CASES = [
    "bad_key",
    "bin_truncated",
    "json_garbage",
    "latest_missing_folder",
    "shard_garbage",
    "metadata_garbage",
    "other_shapes",
    "all_damaged_previous",
]


def collect(work: Path, demo: Path, seed: int, trials: int) -> dict:
    """The reference run, then each part: what every start did, with each part's seconds."""
    ref = reference(work, demo)
    out: dict = {"reference": ref, "seed": seed}
    for name in PARTS:
        began = time.monotonic()
        if name == "crashes":
            out[name] = crashes(work, demo, ref, trials, seed)
        elif name == "starts1":
            out[name] = failing_starts(work, demo, work / "reference", 1, None)
        elif name == "starts2":
            out[name] = failing_starts(work, demo, work / "reference", 2, TWO_RANK_CASES)
        elif name == "one_rank_fails":
            out[name] = one_rank_fails(work, demo)
        elif name == "two_trainers":
            out[name] = two_trainers(work, demo)
        elif name == "interrupts":
            out[name] = interrupts(work, demo)
        elif name == "full_disks":
            out[name] = full_disks(work, demo, ref, seed)
        out[f"{name}_seconds"] = round(time.monotonic() - began, 1)
    return out
