"""A second device on a CPU-only machine: tensors that keep CPU data, report ``cuda:0`` and obey
torch's cross-device rules, so whole code paths show where a GPU run would mix devices.

On a CPU machine every tensor is on one device, so code that makes a helper tensor on the CPU and
combines it with a model's output passes every test and crashes on a user's GPU ("Expected all
tensors to be on the same device"). torch's FakeTensorMode checks single ops but cannot run code
that reads values. Here:

* ``FakeDeviceTensor`` wraps a CPU tensor, reports ``device == cuda:0`` to Python and, in
  ``__torch_dispatch__``, refuses what CUDA refuses: an op mixing it with a CPU tensor that is not a
  0-dim scalar, a CPU generator drawing on it, a CPU tensor indexed by it. Results of ops on it are
  on it again; reading values (``.item()``, ``.tolist()``, ``.cpu()``) works, as on a GPU.
* ``fake_device()`` is a context in which ``torch.device("cuda")`` as a target works: factories
  (``torch.zeros(..., device=x.device)``) and moves (``t.to(x.device)``, ``module.to("cuda")``)
  make FakeDeviceTensors, ``.cpu()`` / ``.to("cpu")`` return plain tensors. Autograd works (the
  C++ tensor is a CPU tensor, so the backward engine runs as on the CPU).
* ``to_device(module_or_tensor)`` puts a model's parameters and buffers (or a tensor) on it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("cuda", 0)
#: Ops that take tensors on different devices in real torch: copies between devices, and a CUDA
#: tensor indexed with CPU indices (advanced indexing moves them).
_CROSS_DEVICE_OK = {"aten::copy_", "aten::_to_copy", "aten::_copy_from", "aten::_copy_from_and_resize", "aten::set_",
                    "aten::lift_fresh", "aten::detach", "aten::alias"}
_INDEX_OPS = {"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_", "aten::_unsafe_index"}


class DeviceMismatch(RuntimeError):
    """What CUDA raises for an op across devices (a RuntimeError, as torch's)."""


class FakeDeviceTensor(torch.Tensor):
    """CPU data, reported on ``cuda:0``; see the module docstring."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool | None = None):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", type(elem)
        rg = elem.requires_grad if requires_grad is None else requires_grad
        out = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  layout=elem.layout, device=elem.device, requires_grad=rg)
        out.elem = elem
        return out

    @property
    def device(self):
        return DEVICE

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False

    def __repr__(self):
        return f"FakeDeviceTensor({self.elem!r}, device='{DEVICE}')"

    def __tensor_flatten__(self):
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return FakeDeviceTensor(inner["elem"])

    def tolist(self):
        return self.elem.tolist()      # values are readable, as on a GPU (a sync)

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {DEVICE} device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        _check_devices(name, args, kwargs)
        target = kwargs.get("device")
        unwrap = lambda t: t.elem if isinstance(t, FakeDeviceTensor) else t  # noqa: E731
        uargs, ukwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if name == "aten::_to_copy" and target is not None:
            on_device = torch.device(target).type == "cuda"
        else:
            on_device = True
        if target is not None:
            ukwargs["device"] = torch.device("cpu")
        out = func(*uargs, **ukwargs)
        if name in ("aten::copy_", "aten::set_") or func._schema.is_mutable and name.endswith("_"):
            return args[0]          # an in-place op returns its (wrapped) self
        if not on_device:
            return out
        return tree_map(lambda t: FakeDeviceTensor(t) if type(t) is torch.Tensor else t, out)


def _device_of(t) -> str:
    return "cuda" if isinstance(t, FakeDeviceTensor) else t.device.type


def _check_devices(name: str, args, kwargs) -> None:
    """Raise as CUDA does when ``name`` mixes FakeDeviceTensors with CPU tensors."""
    if name in _CROSS_DEVICE_OK:
        return
    flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    gen = kwargs.get("generator")
    if gen is not None and gen.device.type == "cpu" and any(isinstance(t, FakeDeviceTensor) for t in flat):
        raise DeviceMismatch(f"Expected a 'cuda' device type for generator but found 'cpu' (in {name})")
    if name in _INDEX_OPS:
        self_on = isinstance(args[0], FakeDeviceTensor)
        indices = [t for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)]
        if not self_on and any(isinstance(t, FakeDeviceTensor) for t in indices):
            raise DeviceMismatch(f"indices should be either on cpu or on the same device as the indexed tensor (cpu) "
                                 f"(in {name})")
        values = [t for t in tree_flatten((args[2:], kwargs))[0] if isinstance(t, torch.Tensor)]
        flat = [args[0]] + values
    devices = {_device_of(t) for t in flat if not (t.device.type == "cpu" and not isinstance(t, FakeDeviceTensor) and t.dim() == 0)}
    if len(devices) > 1:
        raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two devices, "
                             f"{DEVICE} and cpu! (in {name})")


def _is_target(device) -> bool:
    if device is None or isinstance(device, int):
        return False
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def _to_fake(t):
    if isinstance(t, FakeDeviceTensor) or not isinstance(t, torch.Tensor):
        return t
    out = FakeDeviceTensor(t.detach(), requires_grad=False)
    if t.requires_grad:
        out.requires_grad_(True)
    return out


class _DeviceRouting(TorchFunctionMode):
    """``cuda`` as a target: factories and moves made on the CPU and wrapped; ``cpu`` unwraps."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return _move(func, args, kwargs)
        if _is_target(kwargs.get("device")):
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type == "cpu":
                raise DeviceMismatch("Expected a 'cuda' device type for generator but found 'cpu'")
            kwargs["device"] = "cpu"
            out = func(*args, **kwargs)
            return tree_map(_to_fake, out)
        return func(*args, **kwargs)


def _move(func, args, kwargs):
    self = args[0]
    if func is torch.Tensor.cpu:
        device, dtype = torch.device("cpu"), None
    elif func is torch.Tensor.cuda:
        device, dtype = DEVICE, None
    else:
        device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        if isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
            device = args[1].device
    out = self if dtype is None else self.to(dtype)
    if device is None:
        return out
    if device.type == "cuda":
        if isinstance(out, FakeDeviceTensor):
            return out
        return _OnDevice.apply(out) if out.requires_grad else FakeDeviceTensor(out.detach().clone())
    if isinstance(out, FakeDeviceTensor):
        return _OffDevice.apply(out) if out.requires_grad else out.elem.clone()
    return out


class _OnDevice(torch.autograd.Function):
    """A differentiable CPU -> device move."""
    @staticmethod
    def forward(ctx, t):
        return FakeDeviceTensor(t.detach().clone())

    @staticmethod
    def backward(ctx, g):
        return g.elem.clone() if isinstance(g, FakeDeviceTensor) else g


class _OffDevice(torch.autograd.Function):
    """A differentiable device -> CPU move."""
    @staticmethod
    def forward(ctx, t):
        return t.elem.clone()

    @staticmethod
    def backward(ctx, g):
        return FakeDeviceTensor(g.detach().clone())


@contextlib.contextmanager
def fake_device():
    """For the duration, ``cuda`` is the fake device (see the module docstring)."""
    with _DeviceRouting():
        yield DEVICE


def to_device(obj):
    """A module's parameters and buffers, or a tensor, on the fake device (modules in place)."""
    if isinstance(obj, torch.Tensor):
        return _to_fake(obj)
    for m in obj.modules():
        for key, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[key] = torch.nn.Parameter(_to_fake(p.detach()), requires_grad=p.requires_grad)
        for key, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[key] = _to_fake(b)
    return obj
