"""Every shipped config composes and validates; every kind of bad config fails at once, naming the key."""

import pytest

from model.config import ConfigError
from train.config import CONFIG_DIR, compose_config

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_of_the_schema_has_a_folder():
    expected = {
        "model",
        "objective",
        "data",
        "parallel",
        "precision",
        "optim",
        "checkpoint",
        "logging",
        "launch",
    }
    assert expected <= set(GROUPS)


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g) if g != "experiment"], ids=str
)
def test_every_shipped_option_composes_and_validates(override):
    group, option = override.split("=")
    cfg = compose_config([override])
    if group == "model":
        assert cfg.model.name == option


@pytest.mark.parametrize("experiment", options("experiment") if (CONFIG_DIR / "experiment").is_dir() else [])
def test_every_experiment_composes_and_validates(experiment):
    compose_config([f"experiment={experiment}"])


@pytest.mark.parametrize(
    ("size", "layers", "hidden", "ffn"),
    [("3b", 26, 3072, 9216), ("8b", 34, 4096, 14336), ("14b", 40, 5120, 16384)],
)
def test_model_sizes_have_the_ministral3_shapes(size, layers, hidden, ffn):
    model = compose_config([f"model={size}"]).model
    assert (model.num_layers, model.hidden_size, model.ffn_hidden_size) == (layers, hidden, ffn)
    assert (model.num_attention_heads, model.query_groups, model.head_dim, model.vocab_size) == (
        32,
        8,
        128,
        131072,
    )
    assert model.rope.rope_type.value == "yarn" and model.rope.factor == 16.0
    assert model.rope.original_max_position_embeddings == 16384 and model.rope.llama_4_scaling_beta == 0.1


def test_command_line_overrides_reach_the_typed_config():
    cfg = compose_config(
        ["steps=7", "optim.lr=1e-4", "optim.min_lr=1e-5", "objective.block_size=16", "model.num_layers=2"]
    )
    assert (cfg.steps, cfg.optim.lr, cfg.objective.block_size, cfg.model.num_layers) == (7, 1e-4, 16, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hiden_size=64"], r"model\.hiden_size"),
        (["+model.extra_knob=1"], r"extra_knob"),
        (["steps=many"], r"steps"),
        (["objective.kind=mdlm"], r"objective\.kind.*(ar|joint|diffusion)"),
        (["model.rope.rope_type=ntk"], r"rope_type.*(default|yarn)"),
        (["model=nonexistent"], r"model"),
        (["parallel.tensor=3"], r"num_attention_heads=4 is not divisible by parallel\.tensor=3"),
        (
            [
                "model.num_query_groups=4",
                "model.num_attention_heads=8",
                "model.hidden_size=256",
                "parallel.tensor=8",
            ],
            r"num_query_groups=4 is not divisible by parallel\.tensor=8",
        ),
        (
            ["model.hidden_size=250"],
            r"model\.hidden_size=250 is not divisible by model\.num_attention_heads=4.*kv_channels",
        ),
        (
            ["model.num_query_groups=3"],
            r"num_attention_heads=4 must be a multiple of model\.num_query_groups=3",
        ),
        (
            ["data.seq_length=100", "objective.block_size=32"],
            r"data\.seq_length=100 is not a multiple of objective\.block_size=32",
        ),
        (["parallel.pipeline=3"], r"model\.num_layers=4 is not divisible by parallel\.pipeline=3"),
        (["data.seq_length=2048"], r"exceeds model\.max_position_embeddings=1024"),
        (["objective.mask_token_id=99999"], r"mask_token_id=99999 is outside the vocabulary"),
        (["precision.fp8=delayed"], r"precision\.fp8=delayed needs precision\.dtype=bf16"),
        (["parallel.context=2"], r"parallel\.context=2"),
        (["parallel.sequence_parallel=true"], r"sequence_parallel=true needs parallel\.tensor > 1"),
        (
            ["global_batch_size=10", "micro_batch_size=4"],
            r"global_batch_size=10 is not a multiple of micro_batch_size=4",
        ),
        (["model.rope.rope_type=yarn"], r"model\.rope\.factor must be set for model\.rope\.rope_type=yarn"),
        (["optim.min_lr=1.0"], r"optim\.min_lr"),
    ],
)
def test_bad_configs_fail_at_once_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)
