"""FLOPs of one training sample, counting what the objective really computes.

The joint and diffusion objectives run every GEMM over 2L tokens, and attention only over the
(q, k) pairs their block-sparse mask allows (flex attention skips the rest on GPU). Matmul FLOPs are
2 * m * n * k; a training step is one forward and a backward of twice its cost, plus one more
forward of the layers under full activation recompute.
"""

from __future__ import annotations

from model.config import ModelConfig, Recompute
from tandem_kernels.masks import CleanAttention


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def block_diffusion_pairs(length: int, block_size: int, clean: CleanAttention) -> int:
    """Allowed (query, key) pairs of the training mask over [x_t ; x_0] (see tandem_kernels.masks)."""
    blocks = length // block_size
    noisy_same_block = blocks * block_size * block_size
    noisy_earlier_clean = block_size * block_size * blocks * (blocks - 1) // 2
    if clean is CleanAttention.causal:
        clean_clean = causal_pairs(length)
    else:
        clean_clean = block_size * block_size * blocks * (blocks + 1) // 2
    return noisy_same_block + noisy_earlier_clean + clean_clean


def forward_flops(model: ModelConfig, tokens: int, attention_pairs: int) -> dict[str, int]:
    """Forward FLOPs of one sequence of ``tokens`` positions, split into parts."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    nq, ng = model.num_attention_heads, model.query_groups
    projections = 2 * tokens * (h * nq * d + 2 * h * ng * d + nq * d * h)
    mlp = 2 * tokens * 3 * h * f  # SwiGLU: gate, up, down
    attention = 2 * 2 * nq * d * attention_pairs  # Q K^T and P V
    head = 2 * tokens * h * model.padded_vocab_size
    return {
        "layers": model.num_layers * (projections + mlp + attention),
        "head": head,
    }


def training_flops_per_sample(
    model: ModelConfig, tokens: int, attention_pairs: int, recompute: Recompute = Recompute.none
) -> int:
    parts = forward_flops(model, tokens, attention_pairs)
    forward = parts["layers"] + parts["head"]
    total = 3 * forward
    if recompute is Recompute.full:
        total += parts["layers"]
    elif recompute is Recompute.selective:
        h_d = model.num_attention_heads * model.head_dim
        total += model.num_layers * 2 * 2 * h_d * attention_pairs
    return total


# Dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets (SXM parts unless
# named otherwise).
PEAK_BF16 = {
    "GB200": 2.5e15,
    "B200": 2.25e15,
    "H200 NVL": 835e12,
    "H200": 989.4e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "A100": 312e12,
}


def gpu_peak_flops(device_name: str, fp8: bool = False) -> float | None:
    """The data-sheet peak of the GPU ``torch.cuda.get_device_name()`` names; the longest matching
    name wins ("NVIDIA GB200" is a GB200, not a B200)."""
    matches = [key for key in PEAK_BF16 if key in device_name]
    if not matches:
        return None
    return PEAK_BF16[max(matches, key=len)] * (2 if fp8 else 1)
