"""The CPU support module: what it patches, that it patches nothing when CUDA is present, and that
megatron.core's DDP + optimizer + schedule train a model with it."""

import subprocess
import sys

import pytest
import torch

from model import cpu
from tests.conftest import REPO, process_env
from tests.factories import tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only patches")


def test_nothing_is_patched_when_cuda_is_available(monkeypatch):
    with cpu.unpatched():
        zeros, cuda_method, stream = torch.zeros, torch.Tensor.cuda, torch.cuda.current_stream
        with monkeypatch.context() as cuda_here:
            cuda_here.setattr(torch.cuda, "is_available", lambda: True)
            assert cpu.enable() is False and not cpu.is_enabled()
            assert torch.zeros is zeros and torch.Tensor.cuda is cuda_method
            assert torch.cuda.current_stream is stream


def test_cuda_factories_and_type_checks_are_served_on_cpu(megatron_single):
    assert cpu.enable() and cpu.is_enabled()
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t
    assert t.type() == "torch.cuda.FloatTensor"
    assert t.type(torch.float64).dtype == torch.float64  # with an argument, .type() still converts
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(None)


def test_megatron_rng_tracker_forks_reproducibly(megatron_single):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outside_before = torch.rand(1)
    torch.manual_seed(0)
    with tracker.fork():
        first = torch.rand(4)
    outside_after = torch.rand(1)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tracker.fork():
        again = torch.rand(4)
    assert torch.equal(first, again)  # the tracked stream is seeded
    assert torch.equal(outside_before, outside_after)  # and does not disturb the default one


def test_megatron_ddp_optimizer_and_schedule_train_on_cpu(megatron_single):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model.attention import AttentionRealiser
    from model.config import AttentionBackend, ParallelConfig, PrecisionConfig
    from model.megatron import build_model, forward
    from tandem_kernels import masks

    cfg = tiny_model()
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), PrecisionConfig())
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, bf16=False, params_dtype=torch.float32, clip_grad=1.0),
        [ddp],
    )
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).expand(2, 16)
    inputs = AttentionRealiser(cfg, AttentionBackend.sdpa)(positions, masks.causal(), per_sample=False)

    def forward_step(data_iterator, stage):
        per_token = forward(stage, tokens[:, :-1], positions, inputs, labels=tokens[:, 1:])
        return per_token, lambda out: (out.mean(), {"loss": out.mean().detach().clone()})

    losses = []
    for _ in range(8):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[ddp],
            num_microbatches=1,
            seq_length=16,
            micro_batch_size=2,
            forward_only=False,
        )
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful and grad_norm > 0
        losses.append(out[0]["loss"].item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_libraries_imported_after_the_patches_still_import(megatron_single):
    # transformers evaluates `torch.cuda.Stream | None` in annotations when it imports its generation code.
    code = (
        "import torch\nfrom model import cpu\ncpu.enable()\n"
        "import transformers.generation.utils\nprint(torch.cuda.Stream | None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=process_env(), capture_output=True)


def test_torch_device_context_still_applies_after_the_patches(megatron_single):
    # transformers' from_pretrained builds under `with torch.device("meta")`; a factory the context
    # misses leaves real-valued buffers (RoPE inv_freq) uninitialised after loading.
    assert cpu.is_enabled()
    with torch.device("meta"):
        assert torch.tensor([1.0]).is_meta and torch.arange(4).is_meta and torch.zeros(2).is_meta


def test_the_patches_can_be_scoped_and_undone(megatron_single):
    assert cpu.is_enabled()
    patched_zeros = torch.zeros
    with cpu.unpatched():
        assert not cpu.is_enabled() and torch.zeros is not patched_zeros
        with pytest.raises((RuntimeError, AssertionError)):  # a CPU build cannot make CUDA tensors
            torch.zeros(1, device="cuda")
        with cpu.patched() as active:
            assert active and torch.zeros(1, device="cuda").device.type == "cpu"
        assert not cpu.is_enabled()
    assert cpu.is_enabled() and torch.zeros(1, device="cuda").device.type == "cpu"
