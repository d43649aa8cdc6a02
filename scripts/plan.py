"""Size a Tandem run before it spends GPU hours: parameters, memory per GPU, FLOPs and time per step.

    python scripts/plan.py experiment=nld_8b_ar2dlm                  # the recipe on its cluster (4x8)
    python scripts/plan.py --gpu H100 experiment=nld_8b_ar2dlm launch=2x8 parallel.tensor=8

The arguments are the trainer's (`python -m train ...`): the same configs and overrides, validated the
same way; the cluster is `launch` (nodes x GPUs per node). Prints the layout, the parameter count of
the model Tandem builds, the memory per GPU (as configured and with the alternatives: distributed
optimizer off/on, activation recompute none/selective/full), the FLOPs per step, and the projected step
time and tokens/s on B200, H200 and H100 at a stated MFU. Exits 1, with the reasons, when the layout
cannot work: a divisibility the trainer would refuse, memory beyond the GPU, an FP8 recipe the GPU lacks.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace

from model.config import ConfigError, Dtype, Fp8Recipe, ModelConfig, Recompute, RecomputeMethod
from train.config import Environment, TrainConfig, compose_config, validate
from train.flops import PEAK_BF16, forward_flops
from train.objectives import build_objective

GB = 1e9


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: float  # bytes of HBM (data sheet)
    peak_bf16: float  # dense bf16 tensor-core FLOP/s; FP8 GEMMs run at twice this
    capability: tuple[int, int]  # CUDA compute capability (decides the FP8 recipes it runs)

    @property
    def environment(self) -> Environment:
        return Environment(cuda=True, capability=self.capability, gpu_name=self.name)


GPUS = {
    "B200": Gpu("B200", 180 * GB, PEAK_BF16["B200"], (10, 0)),
    "H200": Gpu("H200", 141 * GB, PEAK_BF16["H200"], (9, 0)),
    "H100": Gpu("H100", 80 * GB, PEAK_BF16["H100"], (9, 0)),
}
# The CUDA context, NCCL buffers and kernel workspaces take a few GB per GPU, and the caching allocator
# fragments: a layout fits when the estimate plus OVERHEAD is at most USABLE of the GPU's memory.
OVERHEAD = 3 * GB
USABLE = 0.92
DEFAULT_MFU = 0.40


# ---- parameters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of megatron's GPTModel as model.megatron builds it (untied output head)."""

    embedding: int
    layer: int  # one transformer layer
    num_layers: int
    final_norm: int
    output: int

    @property
    def layers(self) -> int:
        return self.layer * self.num_layers

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.output


def layer_linear_parameters(model: ModelConfig) -> int:
    """The projections of one layer: fused QKV (GQA: query_groups key/value heads), attention output,
    and SwiGLU's gate, up and down."""
    h, d = model.hidden_size, model.head_dim
    qkv = h * (model.num_attention_heads + 2 * model.query_groups) * d
    out = model.num_attention_heads * d * h
    mlp = 3 * h * model.ffn_hidden_size
    return qkv + out + mlp


def layer_parameters(model: ModelConfig, tp: int = 1) -> int:
    """One layer on one tensor-parallel rank: projections split over the ranks, RMSNorm weights (two per
    layer, plus the per-head QK-norm) replicated."""
    norms = 2 * model.hidden_size + (2 * model.head_dim if model.qk_layernorm else 0)
    return layer_linear_parameters(model) // tp + norms


def count_parameters(model: ModelConfig, tp: int = 1) -> ParameterCount:
    """The whole model (tp=1), or what one tensor-parallel rank holds of each part."""
    vocab = model.padded_vocab_size * model.hidden_size // tp
    return ParameterCount(
        embedding=vocab,
        layer=layer_parameters(model, tp),
        num_layers=model.num_layers,
        final_norm=model.hidden_size,
        output=vocab,
    )


def stage_parameters(cfg: TrainConfig, first: bool, last: bool) -> int:
    """Parameters on one GPU of a pipeline stage: its layers, plus the embedding on the first stage and
    the final norm and output head on the last."""
    parts = count_parameters(cfg.model, cfg.parallel.tensor)
    total = parts.layer * cfg.model.num_layers // cfg.parallel.pipeline
    if first:
        total += parts.embedding
    if last:
        total += parts.final_norm + parts.output
    return total


# ---- layout ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    vp: int  # virtual stages per pipeline rank (1: not interleaved)
    dp: int
    micro_batches: int  # per data-parallel rank and step

    def describe(self, cfg: TrainConfig) -> str:
        sp = " (sequence parallel)" if cfg.parallel.sequence_parallel else ""
        vp = f" x {self.vp} virtual" if self.vp > 1 else ""
        return (
            f"{cfg.launch.nodes} node(s) x {cfg.launch.gpus_per_node} GPUs = {self.world}: TP {self.tp}{sp}, "
            f"PP {self.pp}{vp}, DP {self.dp}; micro-batch {cfg.micro_batch_size}, global batch "
            f"{cfg.global_batch_size} = {self.micro_batches} micro-batches per DP rank"
        )


def layout(cfg: TrainConfig) -> Layout:
    """The data-parallel size and micro-batch count of the launch cluster; raises ConfigError when
    the trainer would refuse the layout there (``train.config.validate`` on that world size)."""
    world = cfg.launch.nodes * cfg.launch.gpus_per_node
    if world < 1:
        raise ConfigError(
            "the planner needs the cluster: launch=4x8 (configs/launch) or launch.nodes=N "
            "launch.gpus_per_node=G"
        )
    validate(cfg, world_size=world, environment=Environment(cuda=True))
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    dp = world // (tp * pp)
    micro_batches = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    vp = cfg.parallel.virtual_pipeline or 1
    return Layout(world=world, tp=tp, pp=pp, vp=vp, dp=dp, micro_batches=micro_batches)


def model_sequence_length(cfg: TrainConfig) -> int:
    """Positions one sample feeds the model (the objective's answer for ``data.seq_length``)."""
    return build_objective(cfg.objective).sequence_length(cfg.data.seq_length)


def attention_pairs(cfg: TrainConfig) -> int:
    return build_objective(cfg.objective).attention_pairs(cfg.data.seq_length)


# ---- memory ------------------------------------------------------------------------------------


def layer_activation_bytes(
    model: ModelConfig, tokens: int, tp: int, sequence_parallel: bool, selective: bool
) -> float:
    """Bytes one transformer layer keeps for its backward pass, per micro-batch of ``tokens`` positions.

    After Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    Sec. 4.1 (activations 34sbh + 5as^2b per layer for GPT), recounted for this layer: RMSNorm, GQA,
    SwiGLU, no dropout, and flex attention, which keeps its logsumexp instead of the S x S scores.
    Per token, with 2-byte activations (h hidden, f FFN, n query heads, g key/value heads, d head dim):

    - 4 tensors of width h (the inputs of both RMSNorms, of the QKV projection and of the MLP's first
      projection): 8h; split over the tensor-parallel ranks only with sequence parallelism (Sec. 4.2);
    - attention: q 2nd, k and v 4gd, the attention output 2nd (kept by flex attention) and again 2nd
      (the input of the output projection), the logsumexp 4n in fp32: 6nd + 4gd + 4n;
    - MLP: SwiGLU keeps gate, silu(gate) and up, 6f, and the down projection its input, 2f: 8f.

    Attention and MLP tensors are split over the tensor-parallel ranks. Selective recompute
    (``recompute_modules=["core_attn"]``) keeps only q, k and v of the core attention: 2nd + 4gd.
    """
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    n, g = model.num_attention_heads, model.query_groups
    hidden = 8 * h
    attention = 2 * n * d + 4 * g * d if selective else 6 * n * d + 4 * g * d + 4 * n
    mlp = 8 * f
    return tokens * (hidden / (tp if sequence_parallel else 1) + (attention + mlp) / tp)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on one pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    fp8_weights: float  # Transformer Engine's FP8 copies of the layer weights (and their transposes)
    activations: float
    logits: float
    overhead: float = OVERHEAD

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.fp8_weights
            + self.activations
            + self.logits
            + self.overhead
        )


def stage_memory(cfg: TrainConfig, shape: Layout, first: bool, last: bool) -> Memory:
    """Memory of one GPU of a pipeline stage.

    Model state per parameter (megatron DDP + optimizer): weights in the model dtype (2 bytes in bf16);
    gradients in fp32 (4) with grad_reduce_in_fp32; Adam's fp32 master weights and two moments (12; 8 in
    fp32, which needs no master copy), divided by DP with the distributed optimizer (ZeRO-1).
    Activations: ``layer_activation_bytes`` per layer, for the micro-batches the first stage holds at
    once under 1F1B (PP of them; x (1 + (PP-1)/(PP*VP)) interleaved, Narayanan et al. 2021); full
    recompute keeps the input of each checkpointed group (2h per token) plus one group's full activations
    while it is recomputed. The last stage also holds the logits: bf16 from the head plus the fp32 copy
    the vocab-parallel cross entropy works on (6 bytes per token and vocab entry / TP), and the inputs
    of the final norm and the head (4h per token).
    """
    model, parallel, precision = cfg.model, cfg.parallel, cfg.precision
    params = stage_parameters(cfg, first, last)
    fp32 = precision.dtype is Dtype.fp32
    weight_bytes = 4 if fp32 else 2
    grad_bytes = 4 if (fp32 or precision.grad_reduce_in_fp32) else 2
    optimizer_bytes = (8 if fp32 else 12) / (shape.dp if parallel.distributed_optimizer else 1)

    layers = model.num_layers // shape.pp
    fp8_weights = 0.0
    if precision.fp8 is not Fp8Recipe.none:
        fp8_layers = max(0, layers - (2 * precision.fp8_bf16_first_last_layers) // shape.pp)
        fp8_weights = 2.0 * fp8_layers * layer_linear_parameters(model) / shape.tp

    tokens = model_sequence_length(cfg) * cfg.micro_batch_size
    sp = parallel.sequence_parallel
    split_h = shape.tp if sp else 1
    full_layer = layer_activation_bytes(
        model, tokens, shape.tp, sp, parallel.recompute is Recompute.selective
    )
    layer_input = 2 * tokens * model.hidden_size / split_h
    if parallel.recompute is Recompute.full:
        k = min(parallel.recompute_num_layers, layers)
        if parallel.recompute_method is RecomputeMethod.uniform:
            kept = math.ceil(layers / k) * layer_input
            transient = k * full_layer
        else:
            kept = k * layer_input + (layers - k) * full_layer
            transient = full_layer
    else:
        kept, transient = layers * full_layer, 0.0
    in_flight = 1.0
    if first and shape.pp > 1:
        in_flight = min(shape.pp, shape.micro_batches)
        if shape.vp > 1:
            in_flight *= 1 + (shape.pp - 1) / (shape.pp * shape.vp)
    activations = kept * in_flight + transient

    logits = 0.0
    if last:
        logits = 6 * tokens * model.padded_vocab_size / shape.tp + 4 * tokens * model.hidden_size / split_h
    return Memory(
        weights=params * weight_bytes,
        gradients=params * grad_bytes,
        optimizer=params * optimizer_bytes,
        fp8_weights=fp8_weights,
        activations=activations,
        logits=logits,
    )


def peak_memory(cfg: TrainConfig, shape: Layout) -> tuple[Memory, str]:
    """The stage that needs the most memory, and which one it is."""
    if shape.pp == 1:
        return stage_memory(cfg, shape, first=True, last=True), "the only stage"
    first = stage_memory(cfg, shape, first=True, last=False)
    last = stage_memory(cfg, shape, first=False, last=True)
    return (first, "the first stage") if first.total >= last.total else (last, "the last stage")


# ---- FLOPs and time ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleFlops:
    """FLOPs one training sample executes (forward, backward at twice the forward, recompute), split
    by the precision they run in; the sum equals train.flops.training_flops_per_sample."""

    gemm_fp8: float  # layer projections under FP8 (0 in bf16)
    gemm_bf16: float  # the other layer projections and the output head
    attention: float  # Q K^T and P V over the mask's allowed pairs (bf16 under FP8 too)

    @property
    def total(self) -> float:
        return self.gemm_fp8 + self.gemm_bf16 + self.attention


def sample_flops(cfg: TrainConfig) -> SampleFlops:
    model, recompute = cfg.model, cfg.parallel.recompute
    pairs = attention_pairs(cfg)
    parts = forward_flops(model, model_sequence_length(cfg), pairs)
    attention = model.num_layers * 2 * 2 * model.num_attention_heads * model.head_dim * pairs
    projections = parts["layers"] - attention
    passes = 3 + (1 if recompute is Recompute.full else 0)
    attention_passes = 3 + (1 if recompute in (Recompute.full, Recompute.selective) else 0)
    layer_gemms = passes * projections
    fp8_share = 0.0
    if cfg.precision.fp8 is not Fp8Recipe.none:
        fp8_share = max(0, model.num_layers - 2 * cfg.precision.fp8_bf16_first_last_layers) / model.num_layers
    return SampleFlops(
        gemm_fp8=layer_gemms * fp8_share,
        gemm_bf16=layer_gemms * (1 - fp8_share) + 3 * parts["head"],
        attention=attention_passes * attention,
    )


def step_seconds(cfg: TrainConfig, shape: Layout, gpu: Gpu, mfu: float) -> float:
    """Time of one optimizer step: the step's FLOPs spread over all GPUs, each GEMM at ``mfu`` of the
    peak of its precision (FP8 at twice bf16), plus the pipeline bubble (PP-1)/(VP*M) of the 1F1B
    schedule with M micro-batches (Narayanan et al. 2021)."""
    flops = sample_flops(cfg)
    per_sample = (flops.gemm_fp8 / 2 + flops.gemm_bf16 + flops.attention) / gpu.peak_bf16
    compute = cfg.global_batch_size * per_sample / (shape.world * mfu)
    bubble = (shape.pp - 1) / (shape.vp * shape.micro_batches)
    return compute * (1 + bubble)


# ---- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    gpu: Gpu
    step_seconds: float
    tokens_per_s: float  # clean tokens (seq_length per sample), as the trainer reports them
    problems: tuple[str, ...]  # why this layout cannot run on this GPU (empty: it can)


@dataclass(frozen=True)
class Plan:
    cfg: TrainConfig
    layout: Layout
    parameters: ParameterCount
    memory: Memory
    memory_stage: str
    flops: SampleFlops
    mfu: float
    projections: tuple[Projection, ...]

    @property
    def problems(self) -> list[str]:
        return [f"{p.gpu.name}: {reason}" for p in self.projections for reason in p.problems]


def make_plan(cfg: TrainConfig, gpus: list[Gpu] | None = None, mfu: float = DEFAULT_MFU) -> Plan:
    """The plan of ``cfg`` on its launch shape; raises ConfigError when the layout cannot work anywhere."""
    shape = layout(cfg)
    memory, stage = peak_memory(cfg, shape)
    projections = []
    for gpu in gpus or list(GPUS.values()):
        problems = []
        try:
            validate(cfg, world_size=shape.world, environment=gpu.environment)  # the trainer's, on this GPU
        except ConfigError as err:
            problems.append(str(err))
        budget = USABLE * gpu.memory
        if memory.total > budget:
            problems.append(
                f"needs {memory.total / GB:.1f} GB per GPU on {stage}, more than the {budget / GB:.1f} GB "
                f"usable of {gpu.memory / GB:.0f} GB; raise parallel.tensor or parallel.pipeline, use "
                "parallel.distributed_optimizer=true or parallel.recompute=full, or lower micro_batch_size"
            )
        seconds = step_seconds(cfg, shape, gpu, mfu)
        tokens = cfg.global_batch_size * cfg.data.seq_length / seconds
        projections.append(Projection(gpu, seconds, tokens, tuple(problems)))
    return Plan(
        cfg=cfg,
        layout=shape,
        parameters=count_parameters(cfg.model),
        memory=memory,
        memory_stage=stage,
        flops=sample_flops(cfg),
        mfu=mfu,
        projections=tuple(projections),
    )


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def report(plan: Plan) -> str:
    cfg, lay, params = plan.cfg, plan.layout, plan.parameters
    L, tokens = cfg.data.seq_length, model_sequence_length(cfg)
    lines = [
        f"model {cfg.model.name}: {params.total / 1e9:.3f} B parameters (embedding "
        f"{params.embedding / 1e6:.1f} M, {params.num_layers} layers x {params.layer / 1e6:.1f} M, output "
        f"head {params.output / 1e6:.1f} M); {stage_parameters(cfg, True, lay.pp == 1) / 1e9:.3f} B per GPU",
        f"objective {cfg.objective.kind.value}: {tokens} model tokens per sample of {L} "
        f"(block {cfg.objective.block_size}), precision {cfg.precision.dtype.value}"
        + (f" + FP8 {cfg.precision.fp8.value}" if cfg.precision.fp8 is not Fp8Recipe.none else ""),
        f"layout: {lay.describe(cfg)}",
        "",
        f"memory per GPU, GB ({plan.memory_stage}; * = as configured):",
        f"  {'optimizer':<12} {'recompute':<10} {'weights':>8} {'grads':>7} {'optim':>7} {'fp8':>6} "
        f"{'activ.':>8} {'logits':>7} {'other':>6} {'total':>7}",
    ]
    for distributed in (False, True):
        for recompute in Recompute:
            variant = replace(
                cfg, parallel=replace(cfg.parallel, distributed_optimizer=distributed, recompute=recompute)
            )
            memory, _ = peak_memory(variant, lay)
            mark = (
                "*"
                if (distributed, recompute) == (cfg.parallel.distributed_optimizer, cfg.parallel.recompute)
                else " "
            )
            values = (
                memory.weights,
                memory.gradients,
                memory.optimizer,
                memory.fp8_weights,
                memory.activations,
                memory.logits,
                memory.overhead,
                memory.total,
            )
            widths = (8, 7, 7, 6, 8, 7, 6, 7)
            row = " ".join(f"{v / GB:>{w}.1f}" for v, w in zip(values, widths, strict=True))
            name = "distributed" if distributed else "replicated"
            lines.append(f"{mark} {name:<12} {recompute.value:<10} {row}")
    flops = plan.flops
    step = flops.total * cfg.global_batch_size
    attention = flops.attention / flops.total
    lines += [
        "",
        f"FLOPs: {_si(flops.total, 'FLOP')} per sample (GEMMs {100 * (1 - attention):.0f}%, attention "
        f"{100 * attention:.0f}%), {_si(step, 'FLOP')} per step",
        f"projected at MFU {100 * plan.mfu:.0f}% (of each GEMM's peak; FP8 at twice bf16):",
        f"  {'GPU':<5} {'HBM':>7} {'bf16 peak':>12} {'step':>10} {'tokens/s':>9} {'per GPU':>9}  verdict",
    ]
    for p in plan.projections:
        fits = f"fits: {plan.memory.total / GB:.1f} of {USABLE * p.gpu.memory / GB:.1f} GB usable"
        verdict = f"REFUSED: {'; '.join(p.problems)}" if p.problems else f"ok, {fits}"
        per_gpu = _si(p.tokens_per_s / lay.world)
        lines.append(
            f"  {p.gpu.name:<5} {p.gpu.memory / GB:>4.0f} GB {_si(p.gpu.peak_bf16, 'FLOP/s'):>12} "
            f"{p.step_seconds:>8.2f} s {_si(p.tokens_per_s):>9} {per_gpu:>9}  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gpu",
        action="append",
        choices=sorted(GPUS),
        help="the cluster's GPU (repeatable); default: all of " + ", ".join(GPUS),
    )
    parser.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOPs utilisation (default {DEFAULT_MFU})"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python -m train`")
    args = parser.parse_intermixed_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu={args.mfu} must be in (0, 1]")
    try:
        cfg = compose_config(args.overrides)
        plan = make_plan(cfg, [GPUS[name] for name in args.gpu or GPUS], args.mfu)
    except ConfigError as err:
        print(f"refused: {err}", file=sys.stderr)
        return 1
    print(report(plan))
    for problem in plan.problems:
        print(f"refused on {problem}", file=sys.stderr)
    return 1 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())
