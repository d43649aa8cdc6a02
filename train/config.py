"""The root of Tandem's typed configuration, the rules it must satisfy, and its Hydra registration.

Each part owns the dataclass of its knobs (``model.config``, ``data.config``, the objective's in
``train.objectives``); this module adds the run-level ones and assembles ``TrainConfig``.
``load_config`` turns a composed Hydra config into a validated ``TrainConfig``: the composed tree is
re-merged onto a fresh schema, so a typo, a wrong type, a bad enum value or a key forced in with
``+key=`` fails before any work starts, naming the key; then every rule that spans fields is checked.

``validate`` holds every such rule, in one function: the trainer (at composition, and again against
its world size before any process group starts), the planner, checkpoint import and export all ask
it. Each group validates its own fields (``ModelConfig.validate``, ...); the rules here span groups:
the model's shapes against the parallel layout, the sequence against the model and the objective's
blocks, the batch against the micro-batch and the data-parallel ranks, the launch against the
processes started, FP8 against the layer shapes, the Transformer Engine release and the GPU. A caller
describing a checkpoint rather than a run (import, export) leaves the run's sections (``data``,
``steps``, ``global_batch_size``) unset, and their rules do not apply.
"""

from __future__ import annotations

import enum
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from model.config import ConfigError, Fp8Recipe, ModelConfig, ParallelConfig, PrecisionConfig
from train.objectives import ObjectiveConfig, build_objective

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


# The first Transformer Engine release that runs each FP8 recipe (megatron.core asks for the same).
FP8_MIN_TE = {
    Fp8Recipe.delayed: "2.0",
    Fp8Recipe.mxfp8: "2.1",
    Fp8Recipe.tensorwise: "2.2",
    Fp8Recipe.blockwise: "2.3",
}
# The first compute capability with each recipe's FP8 GEMMs: per-tensor scaling from Ada/Hopper,
# 1x128 blocks from Hopper, MXFP8 from Blackwell.
FP8_MIN_CAPABILITY = {
    Fp8Recipe.delayed: (8, 9),
    Fp8Recipe.tensorwise: (8, 9),
    Fp8Recipe.blockwise: (9, 0),
    Fp8Recipe.mxfp8: (10, 0),
}


@dataclass(frozen=True)
class Environment:
    """Where a configuration is to run: whether there is CUDA, the Transformer Engine release, the
    GPU. ``None`` fields are unknown and not checked."""

    cuda: bool | None = None
    te_version: str | None = None  # None: Transformer Engine is not installed (not checked)
    capability: tuple[int, int] | None = None  # None: no GPU to check against
    gpu_name: str = "this GPU"

    @classmethod
    def here(cls) -> Environment:
        """This machine's (read without CUDA initialisation beyond the device query, and before any
        process group exists)."""
        te_version = None
        for name in ("transformer_engine", "transformer-engine"):
            try:
                te_version = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        import torch

        if not torch.cuda.is_available():
            return cls(cuda=False, te_version=te_version)
        return cls(True, te_version, torch.cuda.get_device_capability(), torch.cuda.get_device_name())


def validate(
    cfg: TrainConfig, *, world_size: int | None = None, environment: Environment | None = None
) -> None:
    """Raise ``ConfigError``, naming the keys and the fix, at the first rule ``cfg`` breaks.

    ``world_size``: the processes the run gets (the trainer's WORLD_SIZE, the planner's cluster); the
    layout's rules need it. ``environment``: where it runs (default: this machine)."""
    environment = environment if environment is not None else Environment.here()
    model, objective, parallel, precision = cfg.model, cfg.objective, cfg.parallel, cfg.precision
    for group in (model, objective, parallel, precision, cfg.optim):
        group.validate()
    data = cfg.data if isinstance(cfg.data, DataConfig) else None
    if data is not None:
        try:
            data.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    tp, pp, vp = parallel.tensor, parallel.pipeline, parallel.virtual_pipeline
    for name in ("num_attention_heads", "query_groups", "ffn_hidden_size", "padded_vocab_size"):
        value = getattr(model, name)
        if value % tp:
            key = "num_query_groups" if name == "query_groups" else name
            raise ConfigError(
                f"model.{key}={value} is not divisible by parallel.tensor={tp}; "
                f"choose parallel.tensor among the divisors of {value}"
            )
    if model.num_layers % (pp * (vp or 1)):
        raise ConfigError(
            f"model.num_layers={model.num_layers} is not divisible by parallel.pipeline={pp}"
            + (f" x parallel.virtual_pipeline={vp}" if vp else "")
        )
    if objective.mask_token_id is not None and not 0 <= objective.mask_token_id < model.vocab_size:
        raise ConfigError(
            f"objective.mask_token_id={objective.mask_token_id} is outside the vocabulary "
            f"[0, model.vocab_size={model.vocab_size})"
        )

    tokens = None  # positions of one micro-batch on one rank
    if data is not None:
        L = data.seq_length
        if L % objective.block_size:
            raise ConfigError(
                f"data.seq_length={L} is not a multiple of objective.block_size={objective.block_size}"
            )
        if model.max_position_embeddings < L:
            raise ConfigError(
                f"data.seq_length={L} exceeds model.max_position_embeddings={model.max_position_embeddings}"
            )
        tokens = build_objective(objective).sequence_length(L) * cfg.micro_batch_size
        if parallel.sequence_parallel and tokens % tp:
            raise ConfigError(
                f"parallel.sequence_parallel=true splits the {tokens} positions of a micro-batch over "
                f"parallel.tensor={tp} ranks; they must divide evenly (change micro_batch_size or "
                "data.seq_length)"
            )
    batch = [name for name in ("steps", "global_batch_size") if isinstance(getattr(cfg, name), int)]
    for name in (*batch, "micro_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    if "global_batch_size" in batch and cfg.global_batch_size % cfg.micro_batch_size:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of "
            f"micro_batch_size={cfg.micro_batch_size}"
        )

    if world_size is not None:
        _check_world(cfg, world_size, environment)
    _check_fp8(cfg, tokens, environment)


def _check_world(cfg: TrainConfig, world: int, environment: Environment) -> None:
    """The rules of a layout on ``world`` processes: each a GPU on a GPU machine."""
    parallel = cfg.parallel
    tp, pp = parallel.tensor, parallel.pipeline
    expected = cfg.launch.nodes * cfg.launch.gpus_per_node
    if expected and expected != world:
        raise ConfigError(
            f"launch.nodes={cfg.launch.nodes} x launch.gpus_per_node={cfg.launch.gpus_per_node} = "
            f"{expected} but torchrun started WORLD_SIZE={world} processes"
        )
    if world % (tp * pp):
        raise ConfigError(
            f"the world size {world} is not divisible by parallel.tensor={tp} x parallel.pipeline={pp}; "
            f"use a multiple of {tp * pp} GPUs (processes)"
        )
    dp = world // (tp * pp)
    if isinstance(cfg.global_batch_size, int):
        mbs = cfg.micro_batch_size
        if cfg.global_batch_size % (mbs * dp):
            raise ConfigError(
                f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size={mbs} "
                f"x data-parallel size {dp}"
            )
        micro_batches = cfg.global_batch_size // (mbs * dp)
        if parallel.virtual_pipeline and micro_batches % pp:
            raise ConfigError(
                f"the interleaved pipeline schedule needs the micro-batches per data-parallel rank "
                f"({micro_batches}) to be a multiple of parallel.pipeline={pp}"
            )
    if parallel.distributed_optimizer and environment.cuda is False:
        raise ConfigError(
            "parallel.distributed_optimizer=true needs CUDA (its resume is not exact on the CPU fallback "
            "optimizer); use parallel.distributed_optimizer=false on CPU"
        )


def _check_fp8(cfg: TrainConfig, tokens: int | None, environment: Environment) -> None:
    """The FP8 rules megatron.core and Transformer Engine enforce only once the model is built (after
    the process groups are up): recipe vs BF16 first/last layers, layer counts, GEMM alignment, the
    installed TE release and the GPU."""
    precision, model, parallel = cfg.precision, cfg.model, cfg.parallel
    recipe, edge_layers = precision.fp8, precision.fp8_bf16_first_last_layers
    if edge_layers < 0:
        raise ConfigError(f"precision.fp8_bf16_first_last_layers={edge_layers} must be >= 0")
    if recipe is Fp8Recipe.none:
        return
    if edge_layers > 0 and recipe is Fp8Recipe.delayed:
        raise ConfigError(
            f"precision.fp8_bf16_first_last_layers={edge_layers} does not work with "
            "precision.fp8=delayed (megatron.core keeps no BF16 layers under delayed scaling); use "
            "precision.fp8=tensorwise or precision.fp8_bf16_first_last_layers=0"
        )
    per_stage = model.num_layers // parallel.pipeline
    if edge_layers > per_stage:
        raise ConfigError(
            f"precision.fp8_bf16_first_last_layers={edge_layers} exceeds the {per_stage} layers of a "
            f"pipeline stage (model.num_layers={model.num_layers} / parallel.pipeline={parallel.pipeline})"
        )
    # FP8 GEMMs need every dimension aligned: 16 for per-tensor and block scaling, 32 for MXFP8.
    align = 32 if recipe is Fp8Recipe.mxfp8 else 16
    tp = parallel.tensor
    dims = {
        "model.hidden_size": model.hidden_size,
        "model.ffn_hidden_size / parallel.tensor": model.ffn_hidden_size // tp,
        "the attention width (heads x head_dim) / parallel.tensor": model.num_attention_heads
        * model.head_dim
        // tp,
    }
    if tokens is not None:
        rows = tokens // (tp if parallel.sequence_parallel else 1)
        dims = {"the tokens of a micro-batch per rank": rows, **dims}
    for name, value in dims.items():
        if value % align:
            raise ConfigError(
                f"precision.fp8={recipe.value} needs GEMM dimensions divisible by {align}; {name} is {value}"
            )
    needed = FP8_MIN_TE[recipe]
    if environment.te_version is not None:
        from packaging.version import Version

        if Version(environment.te_version).release < Version(needed).release:
            raise ConfigError(
                f"precision.fp8={recipe.value} needs Transformer Engine >= {needed}, this environment "
                f"has {environment.te_version}; pip install 'transformer-engine[pytorch]>={needed}' or "
                "choose another precision.fp8"
            )
    wanted = FP8_MIN_CAPABILITY[recipe]
    if environment.capability is not None and tuple(environment.capability) < wanted:
        have = ".".join(map(str, environment.capability))
        raise ConfigError(
            f"precision.fp8={recipe.value} does not run on {environment.gpu_name} (compute capability "
            f"{have}; it needs {wanted[0]}.{wanted[1]} or newer"
            + (": Blackwell, e.g. B200)" if recipe is Fp8Recipe.mxfp8 else ": Hopper or newer)")
        )


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
