"""Gradient checkpointing replays the dict arguments a layer saw (ComfyUI's transformer_options)."""
import torch

from latentclip.reno import checkpointed

torch.set_num_threads(1)


class Scaled(torch.nn.Module):
    """A layer whose result depends on a shared dict the caller changes between layers."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, options):
        options["seen"] = options["block"]            # layers write to it too, as ComfyUI's transformers do
        return torch.tanh(self.lin(x) * options["block"])   # tanh saves its output: it depends on the dict


def run(layers, x):
    options = {"block": 0}
    for i, layer in enumerate(layers):
        options["block"] = i + 1
        x = layer(x, options)
    return x.pow(2).sum(), options


def test_recompute_sees_the_options_of_its_forward():
    torch.manual_seed(0)
    layers = [Scaled().requires_grad_(False) for _ in range(3)]
    x = torch.randn(2, 4, requires_grad=True)
    loss, _ = run(layers, x)
    (plain,) = torch.autograd.grad(loss, [x])
    with checkpointed(layers) as n:
        loss, options = run(layers, x)
        (ckpt,) = torch.autograd.grad(loss, [x])
    assert n == 3 and torch.allclose(plain, ckpt, atol=1e-6)
    assert options == {"block": 3, "seen": 3}        # after backward the dict holds what the forward left
