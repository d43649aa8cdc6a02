"""A simulated GPU on a CPU-only torch: strict about device placement, with real values.

Inside ``simulated_gpu()`` every request for a CUDA tensor (``device="cuda"``, ``.cuda()``,
``.to(torch.device("cuda", 0))``, a module's ``.cuda()``, megatron's ``device=current_device()``)
gives an ``OnAccelerator`` tensor: Python code sees a tensor on ``cuda:0`` (``.device``, ``.is_cuda``)
whose real values live in a CPU tensor. Every aten op is checked against the placement rules a CUDA
build enforces, then runs on the CPU values. A tensor on the wrong device therefore fails here as it
would at first contact with a GPU, while data-dependent code (decoders, NaN checks, ``.item()``,
collectives, optimizer steps) runs for real, and its results can be compared with a plain CPU run.

Underneath, the wrapper's device is ``meta:0``: "meta" is the one non-CPU device type a CPU build of
torch has a device guard and autograd support for (autograd aborts the process on a "cuda" tensor in a
CPU build, fake tensors included), and index 0 keeps it apart from plain "meta", which keeps its own
meaning. Only torch's C++ side sees that device; Python sees ``cuda:0``.

The rules (what CUDA builds do):
- an op's tensors share one device; a 0-dim CPU tensor may join a GPU op (it is a scalar);
- factories build on their ``device=`` (the CPU when absent); ``copy_`` and ``.to()`` cross devices;
- indexing takes index tensors on the CPU or on the indexed tensor's device; a CPU tensor indexed by
  GPU indices is an error (``indices should be either on cpu or on the same device``);
- a random op's generator lives on the op's device;
- collectives of a group that acts as NCCL (``nccl=True``; megatron's ``*_GLOO`` groups stay gloo)
  take GPU tensors only, gloo collectives CPU tensors only;
- host reads (``item``, ``tolist``, ``bool``) work; ``numpy()`` of a GPU tensor is refused.

Inside the context the CPU support module (``model.cpu``) is off (it turns ``device="cuda"`` into
the CPU, which is what hides these mistakes everywhere else), and ``torch.cuda``'s device, stream and
RNG calls answer as one GPU would (the RNG ones with the CPU generator, as ``model.cpu`` does).
Not simulated: ``.to(0)`` (an int device), flex attention (a compiled higher-order op), CUDA graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing

GPU = torch.device("cuda", 0)  # what code under test sees
_STANDIN = torch.device("meta", 0)  # what torch's C++ side sees
CPU = torch.device("cpu")


class DeviceMismatch(RuntimeError):
    """An op mixed devices the way a CUDA build refuses."""


class OnAccelerator(torch.Tensor):
    """A tensor on the simulated GPU; ``inner`` holds its values on the CPU."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            inner.size(),
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=_STANDIN,
            requires_grad=requires_grad,
        )

    def __init__(self, inner: torch.Tensor, requires_grad: bool = False):
        self.inner = inner

    def __repr__(self, *, tensor_contents=None):
        return f"OnAccelerator({self.inner!r})"

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return OnAccelerator(inner_tensors["inner"])

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class SimulatedGenerator(torch.Generator):
    """``torch.Generator(device=...)`` inside the context: a CPU generator that remembers its device."""

    def __new__(cls, device="cpu"):
        generator = super().__new__(cls, "cpu")
        generator.logical_device = _placement(device)
        return generator

    def __init__(self, device="cpu"):
        pass

    @property
    def device(self) -> torch.device:
        return self.logical_device


def _placement(device) -> torch.device:
    """Where a ``device=`` request puts a tensor: CUDA (any index) -> the simulated GPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return GPU
    device = torch.device(device)
    if device.type == "cuda" or device == _STANDIN:
        return GPU
    return device


def _is_cuda_request(device) -> bool:
    return device is not None and _placement(device) == GPU


def _device(t: torch.Tensor) -> torch.device:
    return GPU if isinstance(t, OnAccelerator) else t.device


def _is_scalar(t: torch.Tensor) -> bool:
    return _device(t).type == "cpu" and t.dim() == 0


_nccl = False
# Groups made with backend="gloo" on purpose (megatron's *_GLOO groups) stay gloo groups under nccl=True.
_gloo_groups: set[int] = set()
_generator_devices: list[torch.device] = []
_aten = torch.ops.aten
_CROSS_DEVICE = {_aten.copy_.default, _aten._copy_from.default, _aten._copy_from_and_resize.default}
_INDEX = {_aten.index.Tensor}
_INDEX_PUT = {_aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}


def _is_gloo_group(group) -> bool:
    return id(group) in _gloo_groups


def _megatron_gloo_groups() -> set[int]:
    from megatron.core import parallel_state

    found = set()
    for name, value in vars(parallel_state).items():
        if "GLOO" in name and value is not None:
            for group in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(group, dist.ProcessGroup):
                    found.add(id(group))
    return found


def _backend_of(group=None) -> str:
    return "gloo" if group is not None and _is_gloo_group(group) else "nccl"


def _name(func) -> str:
    return func.name() if hasattr(func, "name") else str(func)


def _common(func, tensors: list[torch.Tensor]) -> torch.device:
    devices = {_device(t) for t in tensors if not _is_scalar(t)}
    if len(devices) > 1:
        raise DeviceMismatch(
            f"{_name(func)}: expected all tensors to be on the same device, but found at least two "
            f"devices, {' and '.join(sorted(str(d) for d in devices))}"
        )
    return devices.pop() if devices else CPU


def _check_indices(func, self_device: torch.device, indices) -> None:
    for index in indices or ():
        if index is not None and _device(index) != self_device and _device(index).type != "cpu":
            raise DeviceMismatch(
                f"{_name(func)}: indices should be either on cpu or on the same device as the indexed "
                f"tensor ({self_device}); got indices on {_device(index)}"
            )


def _collective_target(func, args, kwargs, tensors) -> torch.device:
    groups = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, dist.ProcessGroup)]
    nccl = _nccl and not any(_is_gloo_group(g) for g in groups)
    wanted = GPU if nccl else CPU
    wrong = [_device(t) for t in tensors if _device(t) != wanted]
    if wrong:
        raise DeviceMismatch(
            f"{_name(func)}: a collective on a {'NCCL' if nccl else 'gloo'} group needs tensors on "
            f"{wanted}; got one on {wrong[0]}"
        )
    return wanted


def _target(func, args, kwargs) -> torch.device:
    """The device ``func`` computes on, or DeviceMismatch where a CUDA build would refuse it."""
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if func is _aten._local_scalar_dense.default:
        return CPU  # .item() reads any device
    if func is torch.ops.c10d.barrier.default:
        return CPU  # its tensor is made by the process group itself, on the group's device
    if func.namespace in ("c10d", "_c10d_functional"):
        return _collective_target(func, args, kwargs, tensors)
    if func in _CROSS_DEVICE:
        return _device(args[0])
    if func in _INDEX:
        _check_indices(func, _device(args[0]), args[1])
        return _device(args[0])
    if func in _INDEX_PUT:
        _check_indices(func, _device(args[0]), args[1])
        return _common(func, [args[0], args[2]])
    target = _placement(kwargs["device"]) if kwargs.get("device") is not None else _common(func, tensors)
    if kwargs.get("generator") is not None:
        # The binding hands the op a fresh Python object for the generator; its device was noted there.
        generator = _generator_devices[-1] if _generator_devices else kwargs["generator"].device
        if generator.type != target.type:
            raise DeviceMismatch(
                f"{_name(func)}: expected a '{target.type}' device type for generator but found "
                f"'{generator.type}'"
            )
    return target


def _unwrap(x):
    return x.inner if isinstance(x, OnAccelerator) else x


def _run(func, args, kwargs):
    target = _target(func, args, kwargs)
    real_args, real_kwargs = pytree.tree_map(_unwrap, (args, kwargs))
    if real_kwargs.get("device") is not None and target == GPU:
        real_kwargs["device"] = CPU
    out = func(*real_args, **real_kwargs)
    if func.namespace in ("c10d", "_c10d_functional"):
        # In-place collectives hand their inputs back: return the wrappers, not their CPU copies.
        originals = {
            id(x.inner): x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, OnAccelerator)
        }
        return pytree.tree_map(lambda o: originals.get(id(o), o) if isinstance(o, torch.Tensor) else o, out)
    if target != GPU:
        return out
    wrapped = pytree.tree_map(
        lambda o: OnAccelerator(o) if isinstance(o, torch.Tensor) and not isinstance(o, OnAccelerator) else o,
        out,
    )
    return return_and_correct_aliasing(func, args, kwargs, wrapped)


class _Checked(TorchDispatchMode):
    """Factories and ops on plain tensors reach the rules here (wrappers reach them by themselves)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


# ---- Python-level calls: what Python sees, and bindings that would look for a real CUDA device ----------

_HOST_READS = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.__complex__,
    torch.Tensor.__format__,
}
_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}
# Getters and descriptors arrive as fresh method-wrapper objects: compare them with ==.
_GETTERS = {
    torch.Tensor.device.__get__: lambda t: GPU,
    torch.Tensor.is_cuda.__get__: lambda t: True,
    torch.Tensor.is_meta.__get__: lambda t: False,
}
_SET_DATA = torch.Tensor.data.__set__


def _getter(func):
    for getter, answer in _GETTERS.items():
        if func == getter:
            return answer
    return None


def _set_data(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """``tensor.data = value``: torch swaps the wrapper's metadata; the values are ours to swap."""
    if isinstance(tensor, OnAccelerator) != isinstance(value, OnAccelerator):
        raise DeviceMismatch(
            f"tensor.data = value: the tensor is on {_device(tensor)}, the value on {_device(value)}"
        )
    _SET_DATA(tensor, value)
    if isinstance(tensor, OnAccelerator):
        tensor.inner = value.inner


class _Bindings(TorchFunctionMode):
    """Python's view of simulated-GPU tensors, and the calls whose bindings would reach for a real CUDA
    device (``.cuda()``, ``.to("cuda")``, factories given an int device) or refuse "meta" (host reads),
    plus the device of a random op's generator (the op itself receives a fresh Python object for it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if generator is None:
            return self._call(func, args, kwargs)
        _generator_devices.append(getattr(generator, "logical_device", generator.device))
        try:
            return self._call(func, args, kwargs)
        finally:
            _generator_devices.pop()

    def _call(self, func, args, kwargs):
        self_arg = args[0] if args else None
        if isinstance(self_arg, OnAccelerator):
            answer = _getter(func)
            if answer is not None:
                return answer(self_arg)
            if func in _HOST_READS:
                return func(self_arg.inner, *args[1:], **kwargs)
            if func in _NUMPY:
                raise TypeError(
                    "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                    "to host memory first."
                )
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                return f"torch.cuda.{self_arg.inner.type().split('.')[-1]}"  # megatron's optimizers check it
            if func is torch.Tensor.get_device:
                return 0
        if func == _SET_DATA:
            return _set_data(*args)
        if func is torch.Tensor.cuda:
            return self_arg.to(_STANDIN)
        if func is torch.Tensor.to:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            if _is_cuda_request(device):
                options = {"dtype": dtype, "non_blocking": non_blocking}
                if memory_format is not None:
                    options["memory_format"] = memory_format
                return self_arg.to(_STANDIN, **options)
        if _is_cuda_request(kwargs.get("device")):
            kwargs = {**kwargs, "device": _STANDIN}
        return func(*args, **kwargs)


def _from_data(factory):
    """``torch.tensor`` / ``torch.as_tensor`` (which no torch-function mode sees) for the simulated GPU:
    GPU tensors among the data are read to the host (as torch reads CUDA ones), and a result asked for
    on the GPU is built on the CPU and moved."""

    def build(data, *args, **kwargs):
        if isinstance(data, OnAccelerator):
            kwargs.setdefault("device", GPU)
            data = data.inner
        elif not isinstance(data, torch.Tensor):
            data = pytree.tree_map_only(OnAccelerator, lambda t: t.inner.item(), data)
        if _is_cuda_request(kwargs.get("device")):
            return factory(data, *args, **{**kwargs, "device": CPU}).to(_STANDIN)
        return factory(data, *args, **kwargs)

    return build


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_cpu_rng_state(state, *args, **kwargs) -> None:
    torch.default_generator.set_state(state)


@contextlib.contextmanager
def simulated_gpu(nccl: bool = False, cuda_available: bool = False) -> Iterator[None]:
    """Run the body with the strict simulated GPU standing in for ``cuda:0``.

    ``nccl``: process groups act as NCCL groups (their collectives need GPU tensors), as on a GPU run.
    ``cuda_available``: ``torch.cuda.is_available()`` answers True, so code takes its GPU branches
    (model placement, DDP buffers, optimizer checks) as on a GPU machine."""
    global _nccl
    from megatron.core.tensor_parallel import random as megatron_random

    from model import cpu

    was_enabled = cpu.is_enabled()
    cpu.disable()  # first: the patches below wrap torch's own functions, not the CPU module's
    patches = {
        (torch.cuda, "_initialized"): True,  # the bindings' lazy CUDA initialisation: nothing to do
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "device_count"): lambda: 1,
        (torch.cuda, "set_device"): lambda device: None,
        (torch.cuda, "synchronize"): lambda *a, **k: None,
        (torch.cuda, "current_stream"): lambda *a, **k: cpu.NullStream(),
        (torch.cuda, "default_stream"): lambda *a, **k: cpu.NullStream(),
        (torch.cuda, "Stream"): cpu.NullStream,
        (torch.cuda, "stream"): lambda *a, **k: contextlib.nullcontext(),
        (torch.cuda, "get_rng_state"): _cpu_rng_state,
        (torch.cuda, "set_rng_state"): _set_cpu_rng_state,
        (torch.cuda, "manual_seed"): lambda seed: torch.default_generator.manual_seed(int(seed)),
        (torch.cuda, "manual_seed_all"): lambda seed: None,
        (megatron_random, "_get_cuda_rng_state"): _cpu_rng_state,
        (megatron_random, "_set_cuda_rng_state"): _set_cpu_rng_state,
        (torch, "Generator"): SimulatedGenerator,
        (torch, "tensor"): _from_data(torch.tensor),
        (torch, "as_tensor"): _from_data(torch.as_tensor),
    }
    if nccl:
        from torch.distributed import distributed_c10d

        patches[(dist, "get_backend")] = _backend_of
        patches[(distributed_c10d, "get_backend")] = _backend_of
        # Object collectives (broadcast_object_list, all_gather_object) pick their device this way.
        patches[(distributed_c10d, "_get_object_coll_device")] = lambda group=None: (
            "cpu" if _backend_of(group) == "gloo" else "cuda"
        )
        patches[(torch.cuda.nccl, "version")] = lambda: (2, 0, 0)  # read by torch's error logging
        _gloo_groups.clear()
        _gloo_groups.update(_megatron_gloo_groups())
    if cuda_available:
        patches[(torch.cuda, "is_available")] = lambda: True
    saved = {key: getattr(*key) for key in patches}
    previous_nccl, _nccl = _nccl, nccl
    for (owner, name), value in patches.items():
        setattr(owner, name, value)
    try:
        with _Bindings(), _Checked():
            yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
        _nccl = previous_nccl
        if was_enabled:
            cpu.enable()


def to_host(x):
    """Tensors (or a structure of them) as plain CPU tensors, for comparisons outside the context."""
    return pytree.tree_map(lambda t: t.inner.clone() if isinstance(t, OnAccelerator) else t, x)
