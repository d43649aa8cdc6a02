"""Every shipped config composes and validates; every kind of bad config fails at once, naming the key."""

import dataclasses
import typing

import pytest
from omegaconf import OmegaConf

from model.config import ConfigError
from train.config import CONFIG_DIR, FP8_MIN_TE, Environment, TrainConfig, compose_config, validate

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
# The model and the launch cluster each experiment's header names ("local": no cluster).
EXPERIMENTS = {
    "quickstart": ("tiny", "local"),
    "records_demo": ("tiny", "local"),
    "smollm2_ar2dlm": ("smollm2_135m", "local"),
    "nld_3b_ar2dlm": ("3b", "1x8"),
    "nld_8b_ar2dlm": ("8b", "4x8"),
    "nld_14b_ar2dlm": ("14b", "8x8"),
    "pretrain_3b": ("3b", "4x8"),
    "pretrain_8b": ("8b", "8x8"),
    "pretrain_14b": ("14b", "8x8"),
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def bases() -> list[str]:
    """The configs recipes build on (experiment/<folder>/<name>): selectable too, e.g. experiment=base/nld."""
    folder = CONFIG_DIR / "experiment"
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.glob("*/**/*.yaml"))


@pytest.fixture(scope="module")
def experiment():
    """experiment=<name>, composed once for the tests that read it."""
    composed = {}

    def compose(name: str):
        if name not in composed:
            composed[name] = compose_config([f"experiment={name}"])
        return composed[name]

    return compose


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


def test_group_members_set_only_what_differs_from_the_schema():
    """A default lives in the schema alone; a member (model/rope/ministral3 included) repeats none of it,
    except the objective's kind, which names the member."""

    def leaves(node, prefix=""):
        for key, value in node.items():
            if OmegaConf.is_dict(value):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    schemas = typing.get_type_hints(TrainConfig)
    repeated = []
    for path in sorted(CONFIG_DIR.glob("*/**/*.yaml")):
        group, *inner = path.relative_to(CONFIG_DIR).parent.parts
        if group == "experiment":
            continue
        schema = OmegaConf.structured(schemas[group])
        values = OmegaConf.load(path)
        values.pop("defaults", None)
        for key, value in leaves(values):
            default = OmegaConf.select(schema, ".".join([*inner, key]), throw_on_missing=False)
            if key != "kind" and getattr(default, "value", default) == value:
                repeated.append(f"{path.relative_to(CONFIG_DIR)}: {key}: {value}")
    assert not repeated


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes_and_validates(name, experiment):
    cfg = experiment(name)
    model, launch = EXPERIMENTS[name]
    nodes, gpus_per_node = (0, 0) if launch == "local" else map(int, launch.split("x"))
    assert cfg.run_dir == f"runs/{name}"
    assert cfg.model.name == model
    assert (cfg.launch.nodes, cfg.launch.gpus_per_node) == (nodes, gpus_per_node)


@pytest.mark.parametrize("name", bases())
def test_every_base_composes_and_validates(name, experiment):
    launch = experiment(name).launch
    assert (launch.nodes, launch.gpus_per_node) == (0, 0)  # a base leaves the cluster to its recipes


def test_a_recipe_overrides_what_its_bases_set(experiment):
    """base/pretrain picks model 3b, 1024 x 50 000 steps and 2000 warmup steps; base/nld, built on it, sets
    its own batch, steps and warmup (1% of the steps); nld_8b_ar2dlm, built on base/nld, its model."""
    pretrain, nld, nld_8b = (experiment(name) for name in ("base/pretrain", "base/nld", "nld_8b_ar2dlm"))
    assert (pretrain.model.name, pretrain.global_batch_size, pretrain.steps) == ("3b", 1024, 50000)
    assert (nld.model.name, nld.global_batch_size, nld.steps) == ("3b", 512, 12500)
    assert (pretrain.optim.warmup_steps, nld.optim.warmup_steps) == (2000, None)
    assert (nld_8b.model.name, nld_8b.global_batch_size, nld_8b.optim.warmup_steps) == ("8b", 512, None)


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
        (
            ["precision=fp8_delayed", "precision.fp8_bf16_first_last_layers=1"],
            r"fp8_bf16_first_last_layers=1 does not work with precision\.fp8=delayed.*tensorwise",
        ),
        (
            ["precision=fp8_current", "precision.fp8_bf16_first_last_layers=3", "parallel.pipeline=2"],
            r"fp8_bf16_first_last_layers=3 exceeds the 2 layers of a pipeline stage",
        ),
        (
            ["precision=fp8_current", "model.ffn_hidden_size=700"],
            r"precision\.fp8=tensorwise needs GEMM dimensions divisible by 16; model\.ffn_hidden_size",
        ),
        (
            ["precision=mxfp8", "model.hidden_size=272", "model.kv_channels=64"],
            r"precision\.fp8=mxfp8 needs GEMM dimensions divisible by 32; model\.hidden_size is 272",
        ),
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


@pytest.mark.parametrize(
    ("preset", "te_version", "capability", "message"),
    [
        (
            "fp8_current",
            "2.1.0",
            None,
            r"tensorwise needs Transformer Engine >= 2\.2, this environment has 2\.1",
        ),
        ("fp8_current", "2.2.0+5fdd7bb", None, None),
        ("mxfp8", "2.1.0", (10, 0), None),
        ("mxfp8", "2.8.0", (9, 0), r"mxfp8 does not run on .*compute capability 9\.0; it needs 10\.0"),
        ("fp8_delayed", "1.13.0", None, r"delayed needs Transformer Engine >= 2\.0"),
        ("fp8_delayed", None, (8, 0), r"delayed does not run on .*8\.0; it needs 8\.9"),
        ("bf16", "1.0.0", (7, 0), None),
    ],
)
def test_fp8_recipes_are_checked_against_transformer_engine_and_the_gpu(
    preset, te_version, capability, message
):
    cfg = compose_config([f"precision={preset}"])
    environment = Environment(te_version=te_version, capability=capability)
    if message is None:
        validate(cfg, environment=environment)
    else:
        with pytest.raises(ConfigError, match=message):
            validate(cfg, environment=environment)


def test_the_gpu_extra_asks_for_the_transformer_engine_every_recipe_needs():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    extras = tomllib.loads((CONFIG_DIR.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (te,) = [Requirement(r) for r in extras["gpu"] if r.startswith("transformer-engine")]
    newest = max(FP8_MIN_TE.values(), key=Version)
    assert any(spec.operator == ">=" and spec.version == newest for spec in te.specifier), te


def test_the_smollm2_recipe_matches_the_checkpoint_its_preparation_imports(smollm2_hf, tmp_path, monkeypatch):
    """experiment=smollm2_ar2dlm starts from scripts/prepare_smollm2.py's checkpoint: its model config must
    be that checkpoint's (the trainer loads the weights into it), its data that tokenizer's."""
    from scripts.prepare_smollm2 import prepare
    from train.convert import find_checkpoint

    monkeypatch.setenv("TANDEM_SMOLLM2", str(tmp_path))
    (tmp_path / "hf").symlink_to(smollm2_hf)
    ready = prepare(tmp_path, progress=False)
    cfg = compose_config(["experiment=smollm2_ar2dlm"])
    imported = find_checkpoint(ready.checkpoint)
    assert dataclasses.replace(cfg.model, name="hf") == imported.model
    assert cfg.objective.block_size == imported.objective.block_size
    assert cfg.checkpoint.load == str(ready.checkpoint) and cfg.checkpoint.finetune
