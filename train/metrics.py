"""What a step's figures mean: per-token losses from summed metrics, and throughput against the
hardware (tokens/s, TFLOP/s per device, model FLOPs utilisation)."""

from __future__ import annotations

import time

import torch

from model.config import Fp8Recipe, PrecisionConfig
from train.flops import gpu_peak_flops


def summarise(sums: dict[str, float]) -> dict[str, float]:
    """Per-token losses from summed metrics: the objective, AR CE, diffusion NELBO terms, masked CE."""
    out = {"loss": sums.get("loss_sum", 0.0) / max(sums.get("num_tokens", 0.0), 1.0)}
    if sums.get("ar_count"):
        out["ar_loss"] = sums["ar_sum"] / sums["ar_count"]
    if sums.get("diffusion_count"):
        # sum(CE / p) over masked tokens per maskable token: the diffusion NELBO (nats/token).
        out["diffusion_loss"] = sums["diffusion_sum"] / max(sums.get("maskable_count", 0.0), 1.0)
        out["masked_ce"] = sums["masked_ce_sum"] / sums["diffusion_count"]
    return out


def measured_matmul_flops(size: int = 512, repeats: int = 5) -> float:
    """This CPU's fp32 matmul rate (FLOP/s), the ceiling MFU is measured against on CPU runs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(precision: PrecisionConfig) -> float | None:
    """The FLOP/s a device of this run could reach: the GPU's data sheet (FP8 at twice bf16), or the
    CPU's measured matmul rate; None for a GPU the table does not know."""
    if torch.cuda.is_available():
        return gpu_peak_flops(torch.cuda.get_device_name(), fp8=precision.fp8 is not Fp8Recipe.none)
    return measured_matmul_flops()


def throughput(
    seconds: float, tokens: int, flops: float, devices: int, peak: float | None
) -> dict[str, float]:
    """Figures of one step that took ``seconds`` for ``tokens`` clean tokens and ``flops`` model FLOPs
    over ``devices`` devices."""
    achieved = flops / seconds / devices
    figures = {"step_time": seconds, "tokens_per_s": tokens / seconds, "tflops_per_device": achieved / 1e12}
    if peak:
        figures["mfu"] = achieved / peak
    return figures
