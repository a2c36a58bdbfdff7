"""ReNO's working-memory measurement: reduced sizes, the fit, and the estimate against a direct
measurement at the real size (CPU: torch's profiler memory events)."""
import pytest
import torch
from torch import nn

from latentclip.memory_probe import (SAFETY, extrapolate, peak_bytes, probe_backward_memory, probe_sizes,
                                     request_bytes, reward_backward_memory)


def test_probe_sizes_keep_the_aspect_ratio_and_stay_below_the_real_size():
    assert probe_sizes(128, 128) == [(16, 16), (32, 32), (64, 64)]
    assert probe_sizes(128, 96) == [(16, 16), (32, 24), (64, 48)]
    assert probe_sizes(32, 32) == [(8, 8), (16, 16)]
    assert probe_sizes(8, 8) == [(8, 8)]            # already small: measured as it is
    for h, w in probe_sizes(200, 72):
        assert h % 8 == 0 and w % 8 == 0 and h * w < 200 * 72


@pytest.mark.parametrize("k, a, c", [(0, 3.0, 0.0), (5000, 2.0, 0.0), (1000, 1.0, 0.01)])
def test_extrapolate_recovers_constant_linear_and_quadratic_parts(k, a, c):
    f = lambda p: k + a * p + c * p * p  # noqa: E731
    pts = [(p, f(p)) for p in (64, 256, 1024)]
    assert extrapolate(pts, 4096) == pytest.approx(f(4096), rel=1e-6, abs=2)
    assert extrapolate(pts[:2], 4096) >= (k + a * 4096 if c == 0 else 0)


def test_extrapolate_never_goes_below_what_was_measured():
    assert extrapolate([(64, 900), (256, 800)], 4096) >= 900     # shrinking points: no negative slope
    assert extrapolate([(64, 100), (256, 1000)], 4096) >= 1000 * 16 - 1   # steep: no negative constant
    assert extrapolate([(64, 640)], 256) == 2560
    with pytest.raises(ValueError):
        extrapolate([], 100)


class Convs(nn.Module):
    """A small conv net with a downsample and attention at the low resolution, like a UNet level."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.up = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.out = nn.Conv2d(32, 4, 3, padding=1)
        self.requires_grad_(False)

    def forward(self, z):
        h = torch.relu(self.a(z))
        d = torch.relu(self.down(h))
        b, c, hh, ww = d.shape
        t = d.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        d = t.transpose(1, 2).reshape(b, c, hh, ww)
        return self.out(torch.relu(self.up(d)) + h)


def test_the_estimate_matches_a_direct_measurement_at_the_real_size():
    torch.manual_seed(0)
    net = Convs()
    shape = (2, 4, 64, 48)
    probe = probe_backward_memory(net, shape, "cpu", torch.float32)
    assert [p for p, _ in probe["points"]] == [8 * 8, 16 * 16, 32 * 24]

    def direct():
        z = torch.randn(*shape, requires_grad=True)
        torch.autograd.grad(net(z).square().mean(), [z])
    direct()
    real = peak_bytes(direct, "cpu")
    assert 0.8 * real <= probe["bytes"] <= 1.25 * real, (probe, real)
    reward = reward_backward_memory(lambda x: x.square().flatten(1).mean(1), shape, "cpu", torch.float32)
    assert reward > 0
    assert request_bytes(probe["bytes"], reward) == pytest.approx(SAFETY * (probe["bytes"] + reward), abs=1)


def test_peak_bytes_sees_a_temporary_allocation():
    def fn():
        x = torch.ones(4_000_000)   # 16 MB, freed before returning
        return float(x.sum())
    assert 15e6 < peak_bytes(fn, "cpu") < 40e6
