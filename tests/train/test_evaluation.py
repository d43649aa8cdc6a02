"""Held-out scoring of an export reproduces the trainer's own validation figures on the same data."""

from __future__ import annotations

import json
import math

import pytest

from model.hf import load_export
from tests.conftest import run_ranks, trainer
from tests.factories import SMALL_MODEL
from train.convert import export_checkpoint
from train.evaluation import held_out_losses, run_config

pytestmark = pytest.mark.slow


def test_held_out_losses_of_the_export_equal_the_trainers_validation(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *SMALL_MODEL,
        "steps=2",
        "global_batch_size=4",
        "micro_batch_size=2",
        "logging.eval_interval=2",
        "logging.eval_iters=2",
        "logging.tensorboard=false",
        "checkpoint.interval=0",
        f"run_dir={run_dir}",
    ]
    run_ranks(trainer(*overrides), 1, tmp_path / "train", env={"TANDEM_DATA": str(demo_data)})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = next(r for r in rows if r.get("split") == "valid" and r["step"] == 2)
    export = export_checkpoint(run_dir, tmp_path / "hf")
    model, _ = load_export(export)
    scores = held_out_losses(model, run_config(run_dir))
    for key in ("loss", "ar_loss", "diffusion_loss", "masked_ce"):
        assert scores[key] == pytest.approx(validation[key], rel=2e-5), key
    assert scores["ar_perplexity"] == pytest.approx(math.exp(validation["ar_loss"]), rel=2e-5)
