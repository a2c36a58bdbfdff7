"""Every core path with its models and sampler state on a second device (tests/core/fake_device.py).

The CPU tensors the code makes itself (lineage ids, generators, bookkeeping) stay on the CPU while
the reward models, the generator/denoiser and the particles or noise are on ``cuda:0``, as on a
user's GPU. Each path must run there and give the CPU run's result (to float tolerance: on the device
some composite ops run decomposed, so the last bits may differ).
"""
import copy
import math

import open_clip
import pytest
import torch

from latentclip import LatentCLIP
from latentclip.guidance import safety_guidance
from latentclip.reno import reno_optimize
from latentclip.rewards import LatentAvoid, LatentMatch, PixelCLIPMatch
from latentclip.search import SearchSettings, expand_items, reward_scorer, search

from fake_device import DeviceMismatch, FakeDeviceTensor, fake_device, to_device

torch.set_num_threads(1)
STEPS, BATCH, SIDE = 4, 2, 32


def _build():
    torch.manual_seed(0)
    lc = LatentCLIP("Latent-ViT-Tiny-test").eval()
    lc.clip.logit_scale.data.fill_(math.log(100))
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    pixel = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    pixel.logit_scale.data.fill_(math.log(100))
    decoder = torch.nn.ConvTranspose2d(4, 3, kernel_size=2, stride=2)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    return [m.requires_grad_(False) for m in (lc, pixel, decoder, net)]


_MODELS = {}


def models(on_device: bool):
    """A tiny Latent-CLIP, a pixel CLIP, a decoder and a denoiser (never changed by the paths), built once,
    on the fake device or the CPU."""
    if not _MODELS:
        _MODELS[False] = _build()
        tokenizer = _MODELS[False][0].tokenizer
        _MODELS[True] = [to_device(copy.deepcopy(m, memo={id(tokenizer): tokenizer})) for m in _MODELS[False]]
    return _MODELS[on_device]


def initial(rows, seed=1):
    return torch.randn(rows, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def denoiser_advance(net, seed=2, lookahead=False):
    """A sampler as ComfyUI runs one: state on the model's device, fresh noise drawn on the CPU from a
    seeded generator and moved; ``lookahead`` hands the next step's prediction on as the carry."""
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    gen = torch.Generator().manual_seed(seed)
    predict = lambda x, s: torch.tanh(x - s * net(x))  # noqa: E731

    def advance(x, start, end, carry=None):
        x0s, x0 = [], carry
        for i in range(start, end):
            s, sn = sigmas[i], sigmas[i + 1]
            x0 = predict(x, s) if x0 is None else x0
            if not lookahead:
                x0s.append(x0)
            x = x0 + sn * torch.randn(x.shape, generator=gen).to(x.device)
            x0 = predict(x, sn) if sn > 0 else x
            if lookahead:
                x0s.append(x0)
            x0 = x0 if lookahead else None
        return (x, x0s, x0) if lookahead else (x, x0s)
    return advance


SEARCHES = {   # name: settings, lookahead, pixel reward
    "best_of_n": (SearchSettings("best_of_n", 3), False, True),
    "prune": (SearchSettings("prune", 4, prune_at=(1, 2), keep=0.5), False, False),
    "fk_steering": (SearchSettings("fk_steering", 3, temperature=30.0, start=1), False, False),
    "fk_steering_lookahead": (SearchSettings("fk_steering", 3, temperature=30.0, start=1), True, True),
}


def run_search(name, on_device):
    settings, lookahead, pixel_reward = SEARCHES[name]
    lc, pixel, decoder, net = models(on_device)
    prompts = ["a red car", "a blue boat"]
    terms = [LatentMatch(lc, prompts), LatentAvoid(lc, ["rain", "snow"])]
    if pixel_reward:
        terms.append(PixelCLIPMatch(pixel, lambda z: torch.tanh(decoder(z)), "a red car"))
    x = expand_items(initial(BATCH), settings.particles)
    if on_device:
        x = x.to("cuda")
    res = search(denoiser_advance(net, lookahead=lookahead), x, STEPS, reward_scorer(terms, BATCH), BATCH, settings)
    return res


@pytest.mark.parametrize("name", list(SEARCHES))
def test_search_runs_on_the_device_and_matches_the_cpu(name):
    cpu = run_search(name, on_device=False)
    with fake_device():
        dev = run_search(name, on_device=True)
        assert isinstance(dev.samples, FakeDeviceTensor)             # the result stays where the sampler is
        samples = dev.samples.cpu()
    assert torch.allclose(samples, cpu.samples, atol=1e-5)
    assert dev.history["events"] == cpu.history["events"] and dev.best_slot == cpu.best_slot
    assert dev.best_reward == pytest.approx(cpu.best_reward, rel=1e-5)


def run_reno(reward_kind, optimizer, on_device):
    lc, pixel, decoder, net = models(on_device)
    if reward_kind == "latent":
        reward = [LatentMatch(lc, ["a red car", "a blue boat"]), LatentAvoid(lc, "fire", weight=0.005)]
    else:
        reward = [PixelCLIPMatch(pixel, lambda z: torch.tanh(decoder(z)), "a red car")]
    noise = initial(BATCH, seed=5)
    if on_device:
        noise = noise.to("cuda")
    return reno_optimize(lambda z: 3 * torch.tanh(net(z)), noise, reward, iterations=3, optimizer=optimizer, seed=0)


@pytest.mark.parametrize("reward_kind, optimizer", [("latent", "sgd"), ("pixel", "sgd"), ("latent", "adam")])
def test_reno_runs_on_the_device_and_matches_the_cpu(reward_kind, optimizer):
    cpu = run_reno(reward_kind, optimizer, on_device=False)
    with fake_device():
        dev = run_reno(reward_kind, optimizer, on_device=True)
        assert all(isinstance(t, FakeDeviceTensor) for t in (dev.latents, dev.noise))
        latents, noise = dev.latents.cpu(), dev.noise.cpu()
    assert torch.allclose(latents, cpu.latents, atol=1e-5) and torch.allclose(noise, cpu.noise, atol=1e-5)
    assert dev.best_iteration == cpu.best_iteration
    assert torch.allclose(torch.tensor(dev.history["total"]), torch.tensor(cpu.history["total"]), rtol=1e-5)


def run_guidance(on_device, threshold):
    lc = models(on_device)[0]
    with torch.inference_mode():                        # as the ComfyUI hook encodes its texts
        concepts = lc.encode_text_cached(["an image of nudity", "an image of violence"])
        anchors = lc.encode_text_cached(["a quiet landscape"])
    x0 = initial(BATCH, seed=11) * 2
    if on_device:
        x0 = x0.to("cuda")
    return safety_guidance(x0, lc, concepts, torch.tensor([8.0, 0.5]), 0.05, anchor_embeds=anchors,
                           threshold=threshold)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_guidance_runs_on_the_device_and_matches_the_cpu(threshold):
    cpu_x, cpu_stats = run_guidance(False, threshold)
    with fake_device():
        dev_x, dev_stats = run_guidance(True, threshold)
        assert isinstance(dev_x, FakeDeviceTensor)
        dev_x = dev_x.cpu()
    assert torch.allclose(dev_x, cpu_x, atol=1e-5)
    assert dev_stats.fired == cpu_stats.fired
    assert dev_stats.prob_before == pytest.approx(cpu_stats.prob_before, rel=1e-5)


def test_the_fake_device_refuses_what_cuda_refuses():
    """The mode is only worth something if it fails where a GPU fails: the prune crash of issue 20."""
    with fake_device():
        grid = torch.randn(4, 2).to("cuda")
        order = torch.argsort(grid, dim=0, descending=True)[:2]
        slot_ids = torch.arange(4).repeat_interleave(2).view(4, 2)
        with pytest.raises(DeviceMismatch, match="same device"):
            slot_ids.gather(0, order)
        with pytest.raises(RuntimeError, match="same device"):
            grid + torch.ones(4, 2)
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(grid.shape, generator=torch.Generator(), device=grid.device)
        assert (grid + torch.tensor(1.0)).device == grid.device     # a 0-dim CPU scalar is allowed
        assert grid[torch.tensor([0, 2])].device == grid.device      # CPU indices on a device tensor too
        assert slot_ids.gather(0, order.cpu()).device.type == "cpu"
        with pytest.raises(TypeError, match="numpy"):
            grid.numpy()
