"""train.config.validate is the one place a configuration's cross-field rules live: the trainer (at
composition and again against its world size, before any process group), the planner, import and
export ask it and refuse a bad layout with the same message."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from model.config import ConfigError, Dtype, Fp8Recipe, ParallelConfig, PrecisionConfig
from scripts import plan
from tests.factories import tiny_model
from train import distributed
from train.config import Environment, TrainConfig, compose_config, validate
from train.objectives import ObjectiveConfig

HEADS_BY_TP3 = r"model\.num_attention_heads=4 is not divisible by parallel\.tensor=3"


def test_composition_and_the_planner_refuse_a_layout_with_the_validators_message(capsys):
    with pytest.raises(ConfigError, match=HEADS_BY_TP3):
        compose_config(["parallel.tensor=3"])
    assert plan.main(["launch.nodes=1", "launch.gpus_per_node=3", "parallel.tensor=3"]) == 1
    assert "refused: " in capsys.readouterr().err


def test_a_checkpoint_without_data_is_validated_on_what_it_has():
    """Import and export describe a checkpoint: model, objective, precision and layout, no data or batch."""
    checkpoint = TrainConfig(model=tiny_model(), objective=ObjectiveConfig(mask_token_id=5))
    validate(checkpoint, environment=Environment())
    checkpoint.parallel = ParallelConfig(tensor=3)
    with pytest.raises(ConfigError, match=HEADS_BY_TP3):
        validate(checkpoint, environment=Environment())
    checkpoint = TrainConfig(model=tiny_model(), objective=ObjectiveConfig(mask_token_id=300))
    with pytest.raises(ConfigError, match=r"mask_token_id=300 is outside the vocabulary"):
        validate(checkpoint, environment=Environment())


@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        (
            3,
            ["parallel=tp2"],
            r"the world size 3 is not divisible by parallel\.tensor=2 x parallel\.pipeline=1",
        ),
        (
            2,
            ["launch=1x8"],
            r"launch\.nodes=1 x launch\.gpus_per_node=8 = 8 but torchrun started WORLD_SIZE=2",
        ),
        (
            4,
            ["parallel=tp2", "global_batch_size=16", "micro_batch_size=16"],
            r"global_batch_size=16 is not a multiple of micro_batch_size=16 x data-parallel size 2",
        ),
        (1, ["parallel.distributed_optimizer=true"], r"parallel\.distributed_optimizer=true needs CUDA"),
    ],
    ids=["tp", "launch", "batch", "distributed_optimizer"],
)
def test_the_trainer_checks_its_world_before_any_process_group(monkeypatch, world, overrides, message):
    cfg = compose_config(overrides)
    monkeypatch.setenv("WORLD_SIZE", str(world))

    def no_group(*args, **kwargs):
        raise AssertionError("a process group was started before the layout was validated")

    monkeypatch.setattr(dist, "init_process_group", no_group)
    with pytest.raises(ConfigError, match=message):
        distributed.init_distributed(cfg)
    with pytest.raises(ConfigError, match=message):  # the same rule, asked directly
        validate(cfg, world_size=world, environment=Environment(cuda=False))


def test_sequence_parallelism_needs_the_micro_batch_to_split_evenly_in_every_caller():
    overrides = [
        "objective=ar",
        "objective.block_size=1",
        "data.seq_length=63",
        "micro_batch_size=1",
        "global_batch_size=2",
        "parallel=tp2",
        "parallel.sequence_parallel=true",
    ]
    message = r"splits the 63 positions of a micro-batch over parallel\.tensor=2"
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)
    # The joint objective feeds 2L positions, which split.
    joint = compose_config([o for o in overrides if o != "objective=ar"])
    assert joint.data.seq_length == 63 and joint.parallel.sequence_parallel


def test_a_gpu_without_the_recipes_fp8_units_is_refused_by_the_planner_only_for_that_gpu():
    cfg = compose_config(["experiment=nld_8b_ar2dlm", "precision=mxfp8"])
    result = plan.make_plan(cfg, [plan.GPUS["B200"], plan.GPUS["H100"]])
    assert result.projections[0].problems == ()
    (problem,) = result.projections[1].problems
    assert "precision.fp8=mxfp8 does not run on H100" in problem
    validate(cfg, world_size=32, environment=plan.GPUS["B200"].environment)
    with pytest.raises(ConfigError, match="does not run on H100"):
        validate(cfg, world_size=32, environment=plan.GPUS["H100"].environment)


def test_precision_checks_need_no_data():
    checkpoint = TrainConfig(
        model=tiny_model(hidden_size=72, kv_channels=16),
        precision=PrecisionConfig(dtype=Dtype.bf16, fp8=Fp8Recipe.tensorwise),
    )
    with pytest.raises(ConfigError, match=r"divisible by 16; model\.hidden_size is 72"):
        validate(checkpoint, environment=Environment())
