"""The root of Tandem's typed configuration and its Hydra registration.

Each part owns the dataclass of its knobs (``model.config``, ``data.config``, the objective's in
``train.objectives``); this module adds the run-level ones and assembles ``TrainConfig``.
``load_config`` turns a composed Hydra config into a validated ``TrainConfig``: the composed tree is
re-merged onto a fresh schema, so a typo, a wrong type, a bad enum value or a key forced in with
``+key=`` fails before any work starts, naming the key; then every rule that spans fields
(``train.validation.validate``) is checked.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from model.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from train.objectives import ObjectiveConfig
from train.validation import validate

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class LrSchedule(enum.Enum):
    constant = "constant"
    cosine = "cosine"
    wsd = "wsd"  # warmup-stable-decay


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: LrSchedule = LrSchedule.cosine
    # Warmup as a fraction of steps (used when warmup_steps is None).
    warmup_fraction: float = 0.01
    warmup_steps: int | None = None
    # WSD: the final fraction of steps that decays to min_lr.
    decay_fraction: float = 0.2

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr} must be > 0 and optim.min_lr={self.min_lr} in [0, lr]")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1={self.beta1} and optim.beta2={self.beta2} must be in [0, 1)")


class OnUnreadable(enum.Enum):
    """What a run does when the newest checkpoint of its own folder cannot be loaded."""

    error = "error"  # stop, listing every checkpoint and why it failed
    previous = "previous"  # resume from the newest good one (the damaged ones move to unreadable/)
    fresh = "fresh"  # as previous, and step 0 when none is loadable (they all move to unreadable/)


@dataclass
class CheckpointConfig:
    # Where checkpoints go; None -> <run_dir>/checkpoints. Auto-resume reads the same folder.
    dir: str | None = None
    # Save every N steps (0: only at the end and on SIGTERM/SIGUSR1).
    interval: int = 200
    # Keep the newest N checkpoints (0 keeps all).
    keep: int = 2
    # Initial weights from another checkpoint (e.g. an imported Hugging Face model).
    load: str | None = None
    # With `load`: weights only (no optimizer, scheduler, step or data position).
    finetune: bool = False
    # The newest checkpoint is damaged: error (stop, naming each checkpoint and why), previous (the
    # newest good one) or fresh (that, else step 0). Damaged ones are moved aside, never deleted.
    on_unreadable: OnUnreadable = OnUnreadable.error


@dataclass
class LoggingConfig:
    interval: int = 10
    tensorboard: bool = True
    # Weights & Biases; runs offline when WANDB_API_KEY is not set.
    wandb: bool = False
    wandb_project: str = "tandem"
    wandb_entity: str | None = None
    # Validation every N steps (0: never) over `eval_iters` batches.
    eval_interval: int = 100
    eval_iters: int = 10


@dataclass
class LaunchConfig:
    """What the launcher promises; checked against torchrun's WORLD_SIZE at start-up (0: not checked)."""

    nodes: int = 0
    gpus_per_node: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # Optimizer steps to train.
    steps: int = MISSING
    global_batch_size: int = MISSING
    micro_batch_size: int = 1
    seed: int = 1234
    # Everything a run writes (logs, checkpoints, plots); shared by all ranks.
    run_dir: str = "runs/default"


def register_configs() -> None:
    """Register the schemas: `train_schema` for the root, `<group>_schema` inside each group."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in (
        ("model", ModelConfig),
        ("objective", ObjectiveConfig),
        ("data", DataConfig),
        ("parallel", ParallelConfig),
        ("precision", PrecisionConfig),
        ("optim", OptimConfig),
        ("checkpoint", CheckpointConfig),
        ("logging", LoggingConfig),
        ("launch", LaunchConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


def load_config(cfg: DictConfig) -> TrainConfig:
    """A composed Hydra config -> a validated TrainConfig (raises ConfigError naming the key)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        plain.pop("hydra", None)
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                f"required config value(s) not set: {', '.join(missing)}; set them in a config file "
                "or on the command line (e.g. `steps=100`)"
            )
        train = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    validate(train)
    return train


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> TrainConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides and validate it (tests, scripts)."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
    except Exception as err:  # Hydra wraps OmegaConf errors in ConfigCompositionException
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
        raise ConfigError(_describe(cause) if cause else str(err)) from None
    return load_config(cfg)


def _describe(err: OmegaConfBaseException) -> str:
    """OmegaConf's message with the full key first, e.g. 'model.rope.rope_type: Invalid value ...'."""
    key = getattr(err, "full_key", None)
    message = str(err).split("\n")[0]
    return f"{key}: {message}" if key else message


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (logged at start and saved beside every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
