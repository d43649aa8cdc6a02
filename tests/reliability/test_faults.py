"""Fault injection on the real trainer (``harness.py`` runs every start, each a warm fork of the real
CLI; these tests judge what it saw).

- kill -9 at seeded points of saves (every file-system call of the trainer's saves is a possible point,
  plus delays into megatron's shard writing): the resumed run starts at the newest complete checkpoint,
  never older than the last save that returned, and its losses equal an uninterrupted run's bit for bit;
- every failing start (bad config, damaged data, damaged checkpoints, another configuration), on one
  process and on two ranks: a non-zero exit within the deadline, one named error line, no traceback,
  no process group or non-daemon thread left; the clean fallbacks resume;
- a disk that fills up during a save: a named error, the previous checkpoint loadable;
- a second trainer on a live run's folder refuses naming the first's host and pid; a dead owner's lock
  is taken over; Ctrl-C saves, a second Ctrl-C stops at once, neither with a traceback.
"""

from __future__ import annotations

import pytest

from tests.reliability import harness
from train.__main__ import EXIT_GRACE_S

pytestmark = pytest.mark.slow
SEED, TRIALS = 0, 20


@pytest.fixture(scope="module")
def report(demo_data, tmp_path_factory) -> dict:
    return harness.collect(tmp_path_factory.mktemp("faults"), demo_data, SEED, TRIALS)


def clean_failure(row: dict, code: int = 1) -> None:
    """Exited ``code`` by itself, said why in one named line, no traceback, nothing left running."""
    assert row["code"] == code, row["tail"]
    assert row["seconds"] < EXIT_GRACE_S, "the exit was held up until the watchdog forced it"
    assert not row["traceback"], row["tail"]
    assert not row["leftovers"], row["leftovers"]
    assert len(row["errors"]) == 1, row["tail"]


def test_kill_9_during_saves_loses_nothing_and_resumes_exactly(report):
    trials = report["crashes"]
    assert len(trials) == TRIALS and all(t["killed"] for t in trials)
    kinds = {t["last_event"].split()[2] for t in trials if t["last_event"]}
    assert {"replace", "open"} <= kinds  # the rename/latest windows and the writes were hit
    for t in trials:
        assert t["resume"]["code"] == 0 and not t["resume"]["traceback"], t
        assert t["resumed_from"] == t["newest_complete"] >= t["saves_returned"], t  # nothing lost
        assert t["exact"], t  # bit-identical losses from there on
        assert t["took_over_lock"], t  # the killed owner's lock did not keep the folder
    # Killed just before the second save's rename: the first checkpoint; just after it, before the
    # latest update: the second, complete though latest still names the first.
    assert trials[0]["last_event"].endswith("iter_0000002.tmp") and trials[0]["resumed_from"] == 1
    assert trials[1]["saves_returned"] == 1 and trials[1]["resumed_from"] == 2
    assert sum(bool(t["compared_steps"]) for t in trials) >= TRIALS // 2


@pytest.mark.parametrize("case", [*harness.CONFIG_CASES])
def test_bad_config_fails_at_once_naming_the_key(report, case):
    (row,) = report["starts1"][case]
    # One line naming the key (the override cannot merge onto the schema), before any work starts.
    clean_failure(row, code=2)
    key = harness.CONFIG_CASES[case][0].split("=")[0]
    assert row["errors"][0].startswith(f"Config error: {key}: "), row["errors"]


@pytest.mark.parametrize("case", harness.DATA_CASES)
def test_damaged_data_is_a_named_error(report, case):
    (row,) = report["starts1"][case]
    clean_failure(row)
    assert row["errors"][0].startswith("DataError") and "wiki_train" in row["errors"][0], row["errors"]


@pytest.mark.parametrize(
    "case",
    [
        "latest_missing_folder",
        "metadata_garbage",
        "manifest_garbage",
        "shard_truncated",
        "shard_garbage",
        "common_garbage",
        "config_garbage",
        "all_damaged_previous",
    ],
)
def test_a_damaged_checkpoint_stops_the_run_naming_it(report, case):
    if isinstance(report["starts1"][case], str):
        pytest.skip(report["starts1"][case])
    (row,) = report["starts1"][case]
    clean_failure(row)
    assert row["errors"][0].startswith("CheckpointUnreadable"), row["errors"]
    assert "iter_0000003" in row["tail"] or "iter_0000009" in row["tail"]
    assert "unreadable" not in row["folders"]  # nothing moved without being asked to


@pytest.mark.parametrize("case", ["latest_garbage", "latest_empty"])
def test_a_damaged_latest_falls_back_to_the_folders(report, case):
    (row,) = report["starts1"][case]
    assert row["code"] == 0 and row["resumed_from"] == 3, row["tail"]
    assert "latest" in row["tail"] and not row["traceback"]


def test_previous_resumes_from_the_newest_good_one_and_moves_the_damaged_aside(report):
    (row,) = report["starts1"]["previous_fallback"]
    assert row["code"] == 0 and row["resumed_from"] == 2, row["tail"]
    assert row["unreadable"] == ["iter_0000003"]


def test_fresh_over_unreadable_checkpoints_keeps_them_and_never_prunes(report):
    (row,) = report["starts1"]["all_damaged_fresh"]
    assert row["code"] == 0 and row["resumed_from"] == 0, row["tail"]
    assert sorted(row["unreadable"]) == ["iter_0000002", "iter_0000003", "latest"]
    # checkpoint.keep=2, but after a fresh start over old checkpoints nothing is deleted.
    assert [f for f in row["folders"] if f.startswith("iter_")] == [f"iter_{s:07d}" for s in range(1, 5)]


@pytest.mark.parametrize("case", ["other_shapes", "other_objective"])
def test_another_configuration_is_a_mismatch_not_damage(report, case):
    (row,) = report["starts1"][case]
    clean_failure(row)
    assert row["errors"][0].startswith("CheckpointMismatch") and "finetune" in row["errors"][0]


@pytest.mark.parametrize("case", harness.TWO_RANK_CASES)
def test_two_ranks_both_exit_on_a_failing_start(report, case):
    rows = report["starts2"][case]
    for row in rows:
        if case in harness.CONFIG_CASES:
            clean_failure(row, code=2)
            assert row["errors"][0].startswith("Config error: "), row["errors"]
        else:
            clean_failure(row)


def test_one_rank_failing_alone_does_not_leave_the_other_waiting(report):
    failing, waiting = report["one_rank_fails"][1], report["one_rank_fails"][0]
    clean_failure(failing)
    assert "injected on rank 1" in failing["errors"][0]
    clean_failure(waiting)
    assert "another rank stopped" in waiting["errors"][0], waiting


def test_a_full_disk_during_a_save_is_named_and_keeps_the_previous_checkpoint(report):
    for row in report["full_disks"]:
        clean_failure(row["run"])
        assert row["run"]["errors"][0].startswith("CheckpointSaveError"), row
        assert "No space left" in row["run"]["errors"][0]
        assert row["newest_complete"] >= 1 and not any(f.endswith(".tmp") for f in row["folders"]), row
    first = report["full_disks"][0]
    assert first["resume"]["code"] == 0 and first["resumed_from"] >= 1 and first["exact"], first


def test_a_second_trainer_refuses_and_a_dead_owner_is_taken_over(report):
    seen = report["two_trainers"]
    assert seen["started"]
    clean_failure(seen["second"])
    refusal = seen["second"]["errors"][0]
    assert refusal.startswith("RunLocked") and f"pid {seen['first_pid']}" in refusal and "host " in refusal
    assert seen["second_left_config_alone"]
    assert seen["third"]["code"] == 0 and seen["third_took_over"]
    assert not seen["lock_left"]


def test_ctrl_c_saves_and_a_second_one_stops_at_once(report):
    once, twice = report["interrupts"]["once"], report["interrupts"]["twice"]
    assert once["code"] == 0 and not once["traceback"] and "stopping at step" in once["tail"]
    assert any(f.startswith("iter_") for f in once["folders"]) and not once["lock_left"]
    assert twice["code"] == 130 and not twice["traceback"]
    assert "KeyboardInterrupt: stopped without saving" in twice["tail"]
    assert not twice["lock_left"]


def test_the_report_states_its_figures(report):
    """The figures the README quotes: trials, exact resumes, hangs, data lost."""
    trials = report["crashes"]
    started = [rows for part in ("starts1", "starts2") for rows in report[part].values()]
    starts = [row for rows in started if not isinstance(rows, str) for row in rows]  # str: not run
    hangs = sum(row["code"] is None for row in starts) + sum(t["resume"]["code"] is None for t in trials)
    lost = sum(t["resumed_from"] < t["saves_returned"] for t in trials)
    print(
        f"\ntrials {len(trials)}, exact resumes {sum(t['exact'] for t in trials)}, hangs {hangs}, "
        f"data lost {lost}; failing starts {len(starts)}, slowest {max(r['seconds'] for r in starts):.1f} s"
    )
    assert hangs == 0 and lost == 0
