"""Make a CPU-only ComfyUI behave like one on a GPU where it matters for gradients.

On a GPU, ``ModelPatcher.load`` moves models with ``Module.to`` inside the executor's
``torch.inference_mode()``; the cross-device copy re-creates every parameter and buffer as an
inference tensor, which autograd refuses to save for backward. On a ``--cpu`` server the move is a
no-op, so code that forgets this passes there and fails for users. ``install()`` makes every
``Module.to`` under inference mode also copy its tensors (``self._apply(clone)``), as that move does.

A server started with ``LATENTCLIP_TEST_EMULATE_GPU_MOVES=1`` and the test-only fixture pack runs
with it installed (the pack calls ``install()`` when it is loaded).
"""
import contextlib

import torch

ENV = "LATENTCLIP_TEST_EMULATE_GPU_MOVES"
_real_to = torch.nn.Module.to


def _to_copying_under_inference_mode(self, *args, **kwargs):
    out = _real_to(self, *args, **kwargs)
    if torch.is_inference_mode_enabled():
        self._apply(lambda t: t.clone())   # what a host<->device copy does to param.data
    return out


def install() -> None:
    torch.nn.Module.to = _to_copying_under_inference_mode


def uninstall() -> None:
    torch.nn.Module.to = _real_to


def installed() -> bool:
    return torch.nn.Module.to is _to_copying_under_inference_mode


@contextlib.contextmanager
def emulated_moves():
    """In-process: moves under inference mode copy, for the duration."""
    install()
    try:
        yield
    finally:
        uninstall()
