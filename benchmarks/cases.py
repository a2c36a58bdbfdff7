"""One benchmark case: a reward step or a ReNO iteration, timed and with its peak memory.

Run in-process (CUDA) or as ``python -m benchmarks.cases '<json spec>'`` in a fresh subprocess
(CPU), so the peak RSS of one case is not polluted by another's allocations.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from . import arch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_C = 100.0   # ReNO's CLIP loss: 100 - exp(logit_scale) * cos


# -- memory --------------------------------------------------------------------------------------
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak memory above the state at ``start()``: CUDA max_memory_allocated, else peak RSS.

    Peak RSS only sees pages new to the process, so on CPU measure in a fresh process (as
    ``benchmarks.run`` does): a long-lived one may reuse freed pages it still holds."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            try:   # Linux >= 4.0: writing 5 resets VmHWM (the peak RSS) to the current RSS
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _rss_mb("VmRSS")

    def stop(self) -> tuple[float, float]:
        """(peak above the start, absolute peak) in MiB."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = _rss_mb("VmHWM")
        return peak - self.base, peak


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def n_repeats(spec, first_s: float) -> int:
    """The spec's repeats, fewer when they would overrun its time budget (at least one)."""
    budget = spec.get("budget_s")
    if not budget:
        return spec["repeats"]
    return max(1, min(spec["repeats"], int(budget / max(first_s, 1e-9))))


def measured(step, mem: "PeakMemory", device):
    """(step's result, wall s, process CPU s, peak MiB above the start, peak total MiB) of one call of ``step``."""
    mem.start()
    t0, c0 = time.perf_counter(), time.process_time()
    result = step()
    _sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak, peak_total = mem.stop()
    return result, wall, cpu, peak, peak_total


def time_repeats(fn, device, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of each timed run. On a shared CPU machine the CPU time
    of a 1-thread run is the cost that other people's load does not inflate."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


# -- rewards ---------------------------------------------------------------------------------------
def _text_feature(clip, encode_text, tokens):
    """The prompt's normalised feature, computed once (ReNO does so too); then the text tower is
    dropped so that both paths hold only what a reward step needs."""
    with torch.no_grad():
        t = encode_text(tokens)
    for name in ("transformer", "token_embedding", "ln_final"):
        setattr(clip, name, None)
    return F.normalize(t.float(), dim=-1)


class LatentReward:
    """ReNO's CLIP loss computed by a Latent-CLIP on the raw latent: no decode."""

    def __init__(self, name, device, dtype):
        self.model, self.source = arch.latent_clip(name, device, dtype)
        self.text = _text_feature(self.model.clip, self.model.encode_text, self.model.tokenize(["a photo of a cat"]))
        self.scale = self.model.logit_scale.exp().float()

    def __call__(self, raw_latent):
        img = F.normalize(self.model.encode_latents(raw_latent).float(), dim=-1)
        return REWARD_C - self.scale * (img * self.text).sum(-1).mean()


class PixelReward:
    """ReNO's pixel CLIP loss: decode, resize to 224, CLIP-normalise, open_clip image tower."""

    def __init__(self, name, device, dtype, decoder=None):
        import open_clip
        self.model, self.source = arch.pixel_clip(name, device, dtype)
        if decoder is None:
            decoder, vae_src = arch.vae_decoder(device, dtype)
            self.source += " + " + vae_src
        self.decoder = decoder
        tok = open_clip.get_tokenizer(name)(["a photo of a cat"]).to(device)
        self.text = _text_feature(self.model, self.model.encode_text, tok)
        self.scale = self.model.logit_scale.exp().float()
        self.mean = torch.tensor(CLIP_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device, dtype=dtype).view(1, 3, 1, 1)

    def __call__(self, raw_latent):
        x = self.decoder(raw_latent)
        x = ((x + 1) / 2).clamp(0, 1)
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        return REWARD_C - self.scale * (img * self.text).sum(-1).mean()


_CACHE: dict = {}


def cached(key, factory):
    """Build once per process: on CUDA all cases share one process, and building is the slow part."""
    if key not in _CACHE:
        _CACHE[key] = factory()
    return _CACHE[key]


def make_reward(path, model, device, dtype):
    cls = LatentReward if path == "latent" else PixelReward
    return cached((path, model, str(device), dtype), lambda: cls(model, device, dtype))


def _finite(t, what):
    if not torch.isfinite(t).all():
        raise RuntimeError(f"{what} is not finite: the random initialisation went wrong")


# -- cases -------------------------------------------------------------------------------------------
def reward_step(spec, device, dtype):
    """Forward + backward of one reward from a batch-1 raw latent to its gradient."""
    reward = make_reward(spec["path"], spec["model"], device, dtype)
    side = spec["resolution"] // 8
    z0 = torch.randn(1, 4, side, side, device=device, dtype=dtype)

    def step():
        z = z0.detach().clone().requires_grad_(True)
        loss = reward(z)
        loss.backward()
        return loss, z.grad

    mem = PeakMemory(device)
    mem.start()   # before the first step: freed-but-kept memory must not hide in the baseline
    t0 = time.perf_counter()
    loss, grad = step()   # first run doubles as a correctness check (and is a warm-up)
    _sync(device)
    first = time.perf_counter() - t0
    _finite(loss, "reward loss")
    _finite(grad, "latent gradient")
    times, cpu = time_repeats(step, device, spec["warmup"] - 1, n_repeats(spec, first))
    peak, peak_total = mem.stop()
    return {"source": reward.source, "times_s": times, "median_s": statistics.median(times),
            "cpu_times_s": cpu, "median_cpu_s": statistics.median(cpu),
            "peak_mb": peak, "peak_total_mb": peak_total}


class RenoStep:
    """One ReNO step with a one-step UNet: noise -> x0 -> reward -> backward -> SGD on the noise.

    ``reward`` None is the bare step: UNet fwd+bwd with a negligible stand-in loss.
    """

    sigma = 14.6146   # sigma at t=999 of SD/SDXL's schedule, where the one-step models start

    def __init__(self, unet, kind, side, reward, device, dtype):
        self.unet, self.reward, self.dtype = unet, reward, dtype
        self.context, self.y = arch.unet_inputs(kind, device, dtype)
        self.scale = arch.SDXL_SCALE if kind == "sdxl" else arch.SD21_SCALE
        self.t = torch.full((1,), 999.0, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(2)
        self.z = torch.nn.Parameter(torch.randn(1, 4, side, side, generator=g).to(device))
        self.opt = torch.optim.SGD([self.z], lr=5.0, momentum=0.9, nesterov=True)

    def generator(self, z):
        """Noise -> x0 (scaled latent) in one step."""
        s = self.sigma
        x_t = (z * s).to(self.dtype)
        eps = self.unet(x_t / (s ** 2 + 1) ** 0.5, self.t, self.context, self.y)
        return x_t - s * eps

    def __call__(self):
        z = self.z
        x0 = self.generator(z)
        if self.reward is None:
            loss = 1e-3 * x0.float().square().mean()
        else:
            loss = self.reward(x0 / self.scale)        # rewards read raw latents
        r = z.norm()
        total = loss + 0.01 * (0.5 * r ** 2 - (z.numel() - 1) * torch.log(r))
        total.backward()
        torch.nn.utils.clip_grad_norm_([z], 0.1)
        self.opt.step()
        self.opt.zero_grad()
        return loss.detach()


def reno_iteration(spec, device, dtype):
    """Bare, latent-reward and pixel-reward ReNO steps on one UNet, timed interleaved.

    Interleaving (bare, latent, pixel, bare, ...) in one process puts the three variants under the
    same machine load, so the small latent overhead is not lost in drift between runs.
    """
    kind, side = spec["unet"], spec["resolution"] // 8
    unet, unet_src = cached(("unet", kind, str(device), dtype), lambda: arch.unet(kind, device, dtype))
    variants = {"bare": None}
    sources = {"bare": unet_src}
    for path in ("latent", "pixel"):
        if spec.get(f"{path}_model"):
            variants[path] = make_reward(path, spec[f"{path}_model"], device, dtype)
            sources[path] = unet_src + " + " + variants[path].source
    steps = {k: RenoStep(unet, kind, side, r, device, dtype) for k, r in variants.items()}
    mem = PeakMemory(device)
    peaks = {k: 0.0 for k in steps}
    times = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    peak_total = 0.0
    rounds = spec["warmup"] + spec["repeats"]
    first_round = None
    for i in range(rounds):
        t_round = time.perf_counter()
        for k, step in steps.items():
            loss, dt, dc, p, pt = measured(step, mem, device)
            peaks[k], peak_total = max(peaks[k], p), max(peak_total, pt)
            if i == 0:
                _finite(loss, f"ReNO loss ({k})")
            if i >= spec["warmup"]:
                times[k].append(dt)
                cpu[k].append(dc)
        if first_round is None:
            first_round = time.perf_counter() - t_round
            rounds = spec["warmup"] + n_repeats(spec, first_round)
        if i + 1 >= rounds:
            break
    for k, step in steps.items():
        _finite(step.z.detach(), f"optimised noise ({k})")
    out = {"peak_total_mb": peak_total}
    for k in steps:
        out.update({f"{k}_s": statistics.median(times[k]), f"{k}_cpu_s": statistics.median(cpu[k]),
                    f"{k}_times_s": times[k], f"{k}_peak_mb": peaks[k], f"{k}_source": sources[k]})
    return out


def run_case(spec: dict) -> dict:
    """Run one case spec (dict with "kind", "device", "dtype", "threads", ...) and return its result."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    fn = reward_step if spec["kind"] == "reward_step" else reno_iteration
    if spec["kind"] == "search_scoring":
        from .search import search_scoring as fn
    out = fn(spec, device, dtype)
    out["wall_s"] = time.perf_counter() - t0
    return {**spec, **out}


if __name__ == "__main__":
    print("RESULT " + json.dumps(run_case(json.loads(sys.argv[1]))), flush=True)
