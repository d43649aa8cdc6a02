"""One short check for a lent GPU; installs nothing and reads nothing from a network.

    python scripts/gpu_check.py                       # about 3-5 minutes on one H200
    python scripts/gpu_check.py --size 14b --layers 2 --seq-length 2048

1. The matmul ceiling: the best bf16 (and FP8, where the GPU has it) GEMM rate measured here.
2. Flex attention against a dense fp32 reference for the joint training mask over [x_t ; x_0],
   forward and backward, beside bf16 SDPA with the same dense mask (the CPU path): flex must be as close
   to the reference as SDPA is.
3. The Megatron model as the trainer builds it, at a realistic layer shape (the 8B layer, fewer layers,
   the full vocabulary), one forward and backward of a [x_t ; x_0] micro-batch: in bf16, and in FP8
   where Transformer Engine is installed (current and delayed scaling; MXFP8 on Blackwell). Prints step
   time, TFLOP/s (train.flops, the trainer's count) and MFU against the data sheet and the measured
   ceiling. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import flex, masks
from kernels.masks import CleanAttention

# Flex attention may differ from the fp32 reference by this much more than bf16 SDPA does (both round
# q, k, v and the output to bf16; flex's blocks sum in another order).
TOLERANCE_FACTOR = 2.0
TOLERANCE_FLOOR = 2e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="8b", help="configs/model shape for the layers (default 8b)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers to build (default 4)")
    parser.add_argument("--seq-length", type=int, default=4096, help="L; the model sees 2L (default 4096)")
    parser.add_argument("--block-size", type=int, default=64, help="diffusion block (default 64)")
    parser.add_argument("--parity-length", type=int, default=2048, help="L of the attention check")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--skip-model", action="store_true", help="only the matmul and attention checks")
    args = parser.parse_args(argv)
    for name in ("seq_length", "parity_length"):
        if getattr(args, name) % args.block_size:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --block-size")
    return args


# ---- timing and the ceiling ----------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
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


def attention_parity(
    seq_length: int,
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    device: torch.device,
    backward: bool,
) -> list[Parity]:
    """Flex attention and bf16 SDPA against the fp32 reference on the joint mask over 2 * seq_length
    positions: the output, and with ``backward`` the gradients of q, k and v."""
    mask_mod = masks.block_diffusion(seq_length, block_size, CleanAttention.causal)
    S = 2 * seq_length
    allowed = masks.dense(mask_mod, S, S, device=device)
    block_mask = flex.block_mask(mask_mod, S, S, device=device)
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
    mask_mod = masks.block_diffusion(seq_length, block_size, CleanAttention.causal)
    S = 2 * seq_length
    allowed = masks.dense(mask_mod, S, S, device=device)
    block_mask = flex.block_mask(mask_mod, S, S, device=device)
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


# ---- the model -----------------------------------------------------------------------------------


@dataclass
class StepResult:
    name: str
    seconds: float
    flops: float  # of the timed forward + backward
    peak_memory: float  # bytes
    note: str = ""


def init_single_process() -> None:
    """World of one: the process group and megatron's parallel state the model builder needs."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(0)


@contextlib.contextmanager
def without_grad_accumulation_fusion():
    """Build with gradient_accumulation_fusion off: megatron's own linear layers need apex for it."""
    from model import megatron as builder

    original = builder.transformer_config

    def patched(*args, **kwargs):
        config = original(*args, **kwargs)
        config.gradient_accumulation_fusion = False
        return config

    builder.transformer_config = patched
    try:
        yield
    finally:
        builder.transformer_config = original


def model_step(
    size: str, layers: int, seq_length: int, block_size: int, precision: str, iters: int, device: torch.device
) -> StepResult:
    """Time one forward + backward of a [x_t ; x_0] micro-batch through the Megatron model, with the
    ``configs/precision`` preset ``precision`` (bf16, fp8_current, fp8_delayed, mxfp8; fp32 on CPU)."""
    from model.attention import attention_inputs
    from model.config import ParallelConfig
    from model.megatron import TORCH_DTYPES, build_model
    from train.config import compose_config
    from train.flops import block_diffusion_pairs, training_flops_per_sample

    composed = compose_config([f"model={size}", f"model.num_layers={layers}", f"precision={precision}"])
    cfg = composed.model
    on_gpu = device.type == "cuda"
    init_single_process()
    note = ""
    try:
        model = build_model(cfg, ParallelConfig(), composed.precision)
    except RuntimeError as err:
        if "fused_weight_gradient_mlp_cuda" not in str(err):
            raise
        note = (
            "built with gradient_accumulation_fusion off: model/megatron.py turns it on with Transformer "
            "Engine, but megatron's own output layer needs apex for it (the trainer stops here)"
        )
        with without_grad_accumulation_fusion():
            model = build_model(cfg, ParallelConfig(), composed.precision)
    for p in model.parameters():  # what megatron's DDP gives every parameter; fused wgrad writes here
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)

    S = 2 * seq_length
    mask_mod = masks.block_diffusion(seq_length, block_size, CleanAttention.causal)
    if on_gpu:
        mask = flex.block_mask(mask_mod, S, S, device=device)
    else:
        mask = masks.dense(mask_mod, S, S, device=device)
    positions = torch.arange(seq_length, device=device).repeat(2).unsqueeze(0)  # both halves 0..L-1
    inputs = attention_inputs(cfg, positions, mask, TORCH_DTYPES[composed.precision.dtype])
    tokens = torch.randint(0, cfg.vocab_size, (1, S), device=device)
    labels = torch.randint(0, cfg.vocab_size, (1, S), device=device)

    def step():
        loss = model(tokens, positions, None, labels=labels, packed_seq_params=inputs).float().mean()
        loss.backward()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, iters)
    flops = training_flops_per_sample(
        cfg, S, block_diffusion_pairs(seq_length, block_size, CleanAttention.causal)
    )
    peak = torch.cuda.max_memory_allocated() if on_gpu else 0.0
    name = f"{size} layer x {layers}, {precision}, {S} tokens"
    return StepResult(name, seconds, flops, peak, note)


def precisions() -> list[str]:
    """The configs/precision presets this GPU runs: bf16, and FP8 where Transformer Engine imports."""
    from model.megatron import transformer_engine_available

    if not transformer_engine_available():
        return ["bf16"]
    major, _ = torch.cuda.get_device_capability()
    return ["bf16", "fp8_current", "fp8_delayed"] + (["mxfp8"] if major >= 10 else [])


# ---- the report ----------------------------------------------------------------------------------


def environment() -> list[str]:
    import megatron.core

    lines = [f"torch {torch.__version__}, megatron-core {megatron.core.__version__}"]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"GPU {name} (sm_{major}{minor}), CUDA {torch.version.cuda}")
    else:
        lines.append("no CUDA device")
    try:
        import transformer_engine

        lines.append(f"Transformer Engine {transformer_engine.__version__}")
    except Exception as err:  # ImportError, or TE failing to load its CUDA libraries
        lines.append(f"Transformer Engine absent ({type(err).__name__}): FP8 is skipped")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from train.config import compose_config
    from train.flops import gpu_peak_flops

    device = torch.device("cuda")
    failed = False
    for line in environment():
        print(line)
    name = torch.cuda.get_device_name()

    ceiling = {"bf16": matmul_ceiling(device), "fp8": matmul_ceiling(device, fp8=True)}
    for kind, rate in ceiling.items():
        sheet = gpu_peak_flops(name, fp8=kind == "fp8")
        if rate is None:
            print(f"matmul ceiling {kind}: not available")
        else:
            share = f" ({100 * rate / sheet:.0f}% of the data sheet's {sheet / 1e12:.0f})" if sheet else ""
            print(f"matmul ceiling {kind}: {rate / 1e12:.0f} TFLOP/s{share}")

    model_cfg = compose_config([f"model={args.size}"]).model
    heads, kv_heads, head_dim = model_cfg.num_attention_heads, model_cfg.query_groups, model_cfg.head_dim
    print(
        f"\nflex vs fp32 reference, joint mask L={args.parity_length} block {args.block_size} "
        f"({heads}/{kv_heads} heads of {head_dim}), max |error|:"
    )
    for result in attention_parity(
        args.parity_length, args.block_size, heads, kv_heads, head_dim, device, True
    ):
        failed |= not result.passed
        print(
            f"  {result.name:<8} flex {result.flex_error:.2e}   bf16 SDPA {result.sdpa_error:.2e}   "
            f"{'ok' if result.passed else 'FAIL'}"
        )
    speed = attention_speed(args.seq_length, args.block_size, heads, kv_heads, head_dim)
    print(
        f"attention fwd+bwd at L={args.seq_length}: flex {1e3 * speed['flex']:.1f} ms, dense-mask SDPA "
        f"{1e3 * speed['sdpa']:.1f} ms ({speed['sdpa'] / speed['flex']:.1f}x)"
    )

    if not args.skip_model:
        print(
            f"\nmodel forward + backward, micro-batch 1 of [x_t ; x_0], L={args.seq_length} "
            "(scripts/plan.py projects step times at MFU 40% unless told --mfu):"
        )
        for preset in precisions():
            try:
                result = model_step(
                    args.size, args.layers, args.seq_length, args.block_size, preset, args.iters, device
                )
            except Exception:
                failed = True
                print(f"  {preset}: FAILED\n{traceback.format_exc()}")
                continue
            finally:
                gc.collect()
                torch.cuda.empty_cache()
            kind = "bf16" if preset == "bf16" else "fp8"
            achieved = result.flops / result.seconds
            sheet = gpu_peak_flops(name, fp8=kind == "fp8")
            mfu_sheet = f"{100 * achieved / sheet:.0f}%" if sheet else "n/a"
            measured = ceiling[kind] or ceiling["bf16"]
            print(
                f"  {result.name}: {1e3 * result.seconds:.0f} ms, {achieved / 1e12:.0f} TFLOP/s, MFU "
                f"{mfu_sheet} of the data sheet, {100 * achieved / measured:.0f}% of the measured "
                f"{kind} ceiling, peak memory {result.peak_memory / 2**30:.1f} GiB"
            )
            if result.note:
                print(f"    note: {result.note}")
    print("\nresult:", "FAIL" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
