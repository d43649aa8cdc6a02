"""The simulated accelerator itself: it refuses what a CUDA build refuses, allows what it allows, and
computes the values a CPU run computes (an independent check: the same ops on plain CPU tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import cpu
from tests.device_strict import GPU, DeviceMismatch, OnAccelerator, simulated_gpu, to_host


def test_requests_for_cuda_land_on_the_accelerator_with_real_values():
    with simulated_gpu():
        made = [
            torch.zeros(3, device="cuda"),
            torch.arange(3, device=torch.device("cuda", 0)),
            torch.ones(3).cuda(),
            torch.ones(3).to("cuda"),
            torch.tensor([1.0, 2.0], device="cuda"),
            torch.full((2,), 7.0, device="cuda:0"),
        ]
        assert all(isinstance(t, OnAccelerator) and t.device == GPU for t in made)
        assert made[5].tolist() == [7.0, 7.0] and made[4].sum().item() == 3.0
        host = made[1].cpu()
        assert type(host) is torch.Tensor and host.device.type == "cpu" and host.tolist() == [0, 1, 2]


def test_mixing_devices_fails_as_on_a_gpu_and_scalars_may_join():
    with simulated_gpu():
        x = torch.ones(3, device="cuda")
        with pytest.raises(DeviceMismatch, match="same device"):
            x + torch.ones(3)
        with pytest.raises(DeviceMismatch, match="same device"):
            torch.cat([x, torch.ones(3)])
        with pytest.raises(DeviceMismatch, match="same device"):
            F.scaled_dot_product_attention(
                torch.ones(1, 1, 3, 4, device="cuda"),
                torch.ones(1, 1, 3, 4, device="cuda"),
                torch.ones(1, 1, 3, 4, device="cuda"),
                attn_mask=torch.ones(3, 3, dtype=torch.bool),
            )
        assert (x * torch.tensor(2.0)).device == GPU  # a 0-dim CPU tensor is a scalar
        assert to_host(x * torch.tensor(2.0)).tolist() == [2.0, 2.0, 2.0]
        x[1:] = torch.zeros(2)  # copies cross devices
        assert x.tolist() == [1.0, 0.0, 0.0]


def test_indexing_rules_are_cudas():
    with simulated_gpu():
        on_gpu = torch.arange(6, device="cuda").view(2, 3)
        on_cpu = torch.arange(6).view(2, 3)
        rows = torch.tensor([1, 0])
        assert on_gpu[rows, rows.cuda()].tolist() == [4, 0]  # CPU or same-device indices: fine
        with pytest.raises(DeviceMismatch, match="indices should be either on cpu"):
            on_cpu[rows.cuda(), rows]
        on_gpu[on_gpu > 3] = -1
        assert on_gpu.tolist() == [[0, 1, 2], [3, -1, -1]]


def test_a_generator_must_live_on_its_ops_device():
    with simulated_gpu():
        probs = torch.full((2, 4), 0.25, device="cuda")
        with pytest.raises(DeviceMismatch, match="generator"):
            torch.multinomial(probs, 1, generator=torch.Generator())
        generator = torch.Generator(device="cuda").manual_seed(0)
        draws = torch.multinomial(probs, 1, generator=generator)
        with pytest.raises(DeviceMismatch, match="generator"):
            torch.rand(3, generator=generator)  # a CUDA generator for a CPU op
    reference = torch.multinomial(torch.full((2, 4), 0.25), 1, generator=torch.Generator().manual_seed(0))
    assert to_host(draws).tolist() == reference.tolist()


def test_autograd_gives_the_cpu_gradients():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    F.gelu(layer(x)).sum().backward()
    expected = layer.weight.grad.clone()
    layer.weight.grad = None
    with simulated_gpu():
        layer.cuda()
        F.gelu(layer(x.cuda())).sum().backward()
        assert layer.weight.grad.device == GPU
        torch.testing.assert_close(to_host(layer.weight.grad), expected)


def test_numpy_of_an_accelerator_tensor_is_refused():
    with simulated_gpu(), pytest.raises(TypeError, match="cpu"):
        torch.ones(2, device="cuda").numpy()


def test_nccl_collectives_need_accelerator_tensors(megatron_single):
    with simulated_gpu(nccl=True):
        with pytest.raises(DeviceMismatch, match="NCCL"):
            dist.all_reduce(torch.ones(2))
        flag = torch.ones(2, device="cuda")
        dist.all_reduce(flag)
        assert flag.tolist() == [1.0, 1.0]
    with simulated_gpu(nccl=False), pytest.raises(DeviceMismatch, match="gloo"):
        dist.all_reduce(torch.ones(2, device="cuda"))


def test_the_cpu_patches_are_off_inside_and_back_after(megatron_single):
    assert cpu.is_enabled()
    with simulated_gpu():
        assert not cpu.is_enabled()
    assert cpu.is_enabled() and torch.zeros(1, device="cuda").device.type == "cpu"
