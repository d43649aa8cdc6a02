"""Run megatron.core's training machinery on a machine without CUDA (gloo, CPU tensors).

megatron.core's model code runs on CPU as it is (Tandem's core attention does RoPE and masking
itself), but its schedules, DDP, optimizers, gradient clipping and dist checkpointing hard-code CUDA
in a few ways. ``enable()`` covers exactly those, and only when CUDA is absent; with CUDA it does
nothing, so GPU runs use megatron.core untouched.

What it patches (all process-wide, CPU-only):
1. tensor factories called with ``device="cuda"`` (``torch.zeros/ones/empty/full/tensor/...``) build
   on the CPU instead (schedules' token counters, optimizer flags, grad-norm buffers, checkpoint
   exchange buffers), and ``Tensor.cuda()`` returns the tensor itself;
2. ``Tensor.type()`` reports ``torch.cuda.*Tensor`` names, which megatron's optimizers and grad
   clipping check before accepting a parameter;
3. ``torch.cuda`` device/stream/RNG calls: ``current_device`` names the CPU, synchronize and
   streams are no-ops, and megatron's CUDA RNG tracker seeds, saves and restores the CPU generator.

The factory wrappers are installed after torch's ``torch.device(...)`` context has cached its set of
the real factories, so that context (``"meta"`` in transformers' ``from_pretrained``) still applies.

``disable()`` puts every patched attribute back, and ``patched()`` / ``unpatched()`` scope either state
to a ``with`` block, so a test can run code exactly as a CUDA machine would see it (the device-strict
tests switch the patches off: they are what would hide a tensor created on the wrong device).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.utils._device

_FACTORIES = (
    "zeros",
    "ones",
    "empty",
    "full",
    "tensor",
    "as_tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "randperm",
    "linspace",
    "eye",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "empty_strided",
)
_enabled = False
# (owner, attribute) -> the original value, filled by enable() and emptied by disable().
_originals: dict[tuple[object, str], object] = {}


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare CUDA ordinal


def _cpu_factory(factory):
    @functools.wraps(factory)
    def build(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return build


class NullStream:
    """Stands in for a CUDA stream: waiting and synchronising are no-ops on CPU. A class (not a
    function), because other libraries use ``torch.cuda.Stream`` in type annotations."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *_, **__):
        return None

    def wait_event(self, *_, **__):
        return None

    def record_event(self, *_, **__):
        return None

    def synchronize(self):
        return None


def _tensor_type(original):
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    return type_


def _patch(owner, name: str, value) -> None:
    _originals.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, value)


def enable() -> bool:
    """Patch the CUDA-only calls megatron.core makes; a no-op when CUDA is available.

    Returns True when the CPU patches are active. Idempotent."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    # `with torch.device(...)` (transformers builds models under "meta") finds factories by identity
    # in a cached set; fill it with the real ones first, or models built later get garbage buffers.
    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        _patch(torch, name, _cpu_factory(getattr(torch, name)))
    _patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    _patch(torch.Tensor, "type", _tensor_type(torch.Tensor.type))

    _patch(torch.cuda, "current_device", lambda: "cpu")
    _patch(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    _patch(torch.cuda, "current_stream", lambda *args, **kwargs: NullStream())
    _patch(torch.cuda, "default_stream", lambda *args, **kwargs: NullStream())
    _patch(torch.cuda, "Stream", NullStream)
    _patch(torch.cuda, "stream", lambda *args, **kwargs: contextlib.nullcontext())
    _patch(torch.cuda, "get_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _patch(torch.cuda, "set_rng_state", lambda state, *args, **kwargs: torch.set_rng_state(state))
    # megatron seeds its tracked CUDA generators through these; the tracker then saves and
    # restores the CPU generator around each use, so the seeded streams stay reproducible.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, which must stay a no-op.)
    _patch(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _patch(torch.cuda, "manual_seed_all", lambda seed: None)

    from megatron.core.tensor_parallel import random as megatron_random

    _patch(megatron_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _patch(megatron_random, "_set_cuda_rng_state", lambda state, *args, **kwargs: torch.set_rng_state(state))
    _enabled = True
    return True


def disable() -> None:
    """Undo ``enable()``: every patched attribute gets its original back. Idempotent."""
    global _enabled
    while _originals:
        (owner, name), value = _originals.popitem()
        setattr(owner, name, value)
    _enabled = False


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def patched() -> Iterator[bool]:
    """The patches for the ``with`` block (yields whether they are active), then the state before."""
    was_enabled = _enabled
    active = enable()
    try:
        yield active
    finally:
        if not was_enabled:
            disable()


@contextlib.contextmanager
def unpatched() -> Iterator[None]:
    """No patches for the ``with`` block, then the state before."""
    was_enabled = _enabled
    disable()
    try:
        yield
    finally:
        if was_enabled:
            enable()
