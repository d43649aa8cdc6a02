"""Every rule a Tandem configuration must satisfy, in one function: ``validate``.

The trainer, the planner, checkpoint import and export all ask it, before any process group starts
or any weight is read. Each group validates its own fields (``ModelConfig.validate``, ...); the rules
here span groups: the model's shapes against the parallel layout, the sequence against the model and
the objective's blocks, the batch against the micro-batch and the data-parallel ranks, the launch
against the processes started, FP8 against the layer shapes, the Transformer Engine release and the
GPU. A caller describing a checkpoint rather than a run (import, export) leaves the run's sections
(``data``, ``steps``, ``global_batch_size``) unset, and their rules do not apply.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from data.config import DataConfig
from model.config import ConfigError, Fp8Recipe
from train.objectives import build_objective

if TYPE_CHECKING:
    from train.config import TrainConfig

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
