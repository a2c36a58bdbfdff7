"""ReNO loop on small differentiable generators: improvement per item, regulariser, determinism."""
import json
import math

import pytest
import torch

from latentclip import InputError, LatentCLIP
from latentclip.reno import ReNOResult, chi_regularizer, reno_optimize
from latentclip.rewards import LatentAvoid, LatentMatch, PixelCLIPMatch, RewardSum, RewardTerm

torch.set_num_threads(1)
SIDE = 32
D = 4 * SIDE * SIDE


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LatentCLIP("Latent-ViT-Tiny-test").eval()
    m.clip.logit_scale.data.fill_(math.log(100))      # a trained CLIP's scale (ReNO's c = 100 form)
    return m


@pytest.fixture(scope="module")
def generator():
    """A fixed random conv net noise [B,4,32,32] -> raw latent [B,4,32,32], items independent."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3, padding=1))
    for p in net.parameters():
        p.requires_grad_(False)
    return lambda z: 3 * torch.tanh(net(z))


def noise(b=3, seed=5, scale=1.0):
    return scale * torch.randn(b, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


class NormReward(RewardTerm):
    """Prefers latents with a large norm: a reward that drags the noise off its shell."""
    name = "norm"

    def __init__(self, weight):
        self.weight = weight

    def evaluate(self, latents):
        n = latents.flatten(1).norm(dim=1)
        return -n, {}


def test_every_item_improves(model, generator):
    prompts = ["a red car", "a dog on grass", "a city at night"]
    reward = RewardSum([LatentMatch(model, prompts), LatentAvoid(model, "fire", weight=0.005)])
    z = noise()
    z_before = z.clone()
    res = reno_optimize(generator, z, reward, iterations=12)
    assert isinstance(res, ReNOResult)
    assert torch.equal(z, z_before)                                 # input untouched
    assert all(b < i for b, i in zip(res.best_loss, res.initial_loss))
    assert all(1 <= it < 12 for it in res.best_iteration)
    assert res.iterations_run == 12 and not res.stopped_early
    # best latents are the generator's output for the returned noise, and scored as reported
    assert torch.allclose(generator(res.noise), res.latents, atol=1e-5)
    best_total = reward.evaluate(res.latents)[0]
    assert torch.allclose(best_total, torch.tensor(res.best_loss), atol=1e-4)
    assert torch.equal(res.initial_latents, generator(z))
    assert torch.equal(res.initial_noise, z)
    for t in (res.latents, res.initial_latents, res.noise):
        assert not t.requires_grad
    # match cosines went up for every item
    cos = torch.tensor(res.history["match/cos"])
    assert (cos[torch.tensor(res.best_iteration), torch.arange(3)] > cos[0]).all()


def test_history_is_json_and_complete(model, generator):
    res = reno_optimize(generator, noise(b=2), LatentMatch(model, "a cat"), iterations=4)
    data = json.loads(res.to_json())
    h = data["history"]
    assert set(h) == {"total", "regularizer", "noise_norm", "grad_norm", "match", "match/cos"}
    assert all(len(v) == 4 and all(len(row) == 2 for row in v) for v in h.values())
    assert h["total"][0] == pytest.approx(res.initial_loss)
    assert h["grad_norm"][-1] == [0.0, 0.0]                       # no step after the last evaluation
    assert h["regularizer"][0] == pytest.approx(chi_regularizer(noise(b=2)).tolist(), rel=1e-5)


def test_batch_items_are_independent(model, generator):
    z = noise(b=3)
    reward = LatentMatch(model, "a red car", weight=1.0)          # gradients far above the clip
    both = reno_optimize(generator, z, reward, iterations=5)
    alone = reno_optimize(generator, z[1:2], reward, iterations=5)
    assert min(both.history["grad_norm"][0]) > 0.1               # so per-item clipping is exercised
    assert torch.allclose(both.noise[1:2], alone.noise, atol=1e-4)
    assert both.best_iteration[1] == alone.best_iteration[0]


def test_same_seed_same_result(model, generator):
    reward = LatentMatch(model, "a cat")
    a = reno_optimize(generator, noise(), reward, iterations=5)
    b = reno_optimize(generator, noise(), reward, iterations=5)
    assert torch.equal(a.latents, b.latents) and a.history == b.history

    drop = torch.nn.Dropout(0.5)                                   # a stochastic generator
    stochastic = lambda z: drop(generator(z))
    state = torch.get_rng_state()
    c = reno_optimize(stochastic, noise(), reward, iterations=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)               # caller's RNG untouched
    d = reno_optimize(stochastic, noise(), reward, iterations=4, seed=7)
    e = reno_optimize(stochastic, noise(), reward, iterations=4, seed=8)
    assert torch.equal(c.latents, d.latents)
    assert not torch.equal(c.latents, e.latents)


def test_regularizer_keeps_noise_on_its_shell():
    identity = lambda z: 1.0 * z
    push = NormReward(0.01)
    free = reno_optimize(identity, noise(b=2), push, iterations=30, regularization=0.0)
    held = reno_optimize(identity, noise(b=2), push, iterations=30, regularization=0.01)
    free_dev = [abs(n / math.sqrt(D) - 1) for n in free.history["noise_norm"][-1]]
    held_dev = [abs(n / math.sqrt(D) - 1) for n in held.history["noise_norm"][-1]]
    assert min(free_dev) > 0.10 and max(held_dev) < 0.03
    # from a noise 1.5x too long, the regulariser alone pulls it back toward sqrt(d)
    still = NormReward(0.0)
    back = reno_optimize(identity, noise(b=2, scale=1.5), still, iterations=30)
    assert all(abs(n - math.sqrt(D)) < 0.25 * 0.5 * math.sqrt(D) for n in back.history["noise_norm"][-1])
    stays = reno_optimize(identity, noise(b=2, scale=1.5), still, iterations=5, regularization=0.0)
    assert stays.history["noise_norm"][-1] == pytest.approx(stays.history["noise_norm"][0])


def test_adam_and_pixel_reward_improve(model, generator):
    torch.manual_seed(3)
    import open_clip
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    pixel = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    pixel.logit_scale.data.fill_(math.log(100))
    up = torch.nn.ConvTranspose2d(4, 3, kernel_size=2, stride=2).requires_grad_(False)
    reward = [PixelCLIPMatch(pixel, lambda x: torch.tanh(up(x)), "a red car"), LatentMatch(model, "a red car")]
    for opt in ("adam", "sgd"):
        res = reno_optimize(generator, noise(b=2), reward, iterations=6, optimizer=opt)
        assert all(b < i for b, i in zip(res.best_loss, res.initial_loss)), opt
        assert "pixel_match/cos" in res.history


def test_callback_progress_and_stop(model, generator):
    seen = []

    def cb(step):
        seen.append((step.iteration, step.iterations, tuple(step.latents.shape), list(step.best_iteration)))
        return None                                   # None or True: keep going

    res = reno_optimize(generator, noise(b=2), LatentMatch(model, "a cat"), iterations=4, callback=cb)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][1] == 4 and seen[0][2] == (2, 4, SIDE, SIDE)

    stop = reno_optimize(generator, noise(b=2), LatentMatch(model, "a cat"), iterations=10,
                         callback=lambda s: s.iteration < 2)
    assert stop.iterations_run == 3 and stop.stopped_early and len(stop.history["total"]) == 3

    class Interrupted(Exception):
        pass

    def interrupt(step):
        if step.iteration == 1:
            raise Interrupted
    with pytest.raises(Interrupted):
        reno_optimize(generator, noise(b=2), LatentMatch(model, "a cat"), iterations=10, callback=interrupt)


def test_works_under_inference_mode(model, generator):
    with torch.inference_mode():
        reward = LatentMatch(model, "a red car")
        z = noise(b=2)
        res = reno_optimize(generator, z, reward, iterations=4)
        assert all(b < i for b, i in zip(res.best_loss, res.initial_loss))
        assert torch.equal(z, noise(b=2))


def test_bad_inputs_raise(model, generator):
    reward = LatentMatch(model, "a cat")
    z = noise(b=1)
    cases = [
        (dict(iterations=0), "iterations"), (dict(iterations=2.5), "iterations"), (dict(lr=0), "lr"),
        (dict(lr=float("nan")), "lr"), (dict(optimizer="rmsprop"), "optimizer"), (dict(momentum=1.0), "momentum"),
        (dict(grad_clip=-1), "grad_clip"), (dict(regularization=-0.1), "regularization"),
        (dict(callback=3), "callback"), (dict(seed="x"), "seed"),
    ]
    for kwargs, name in cases:
        with pytest.raises(InputError, match=name):
            reno_optimize(generator, z, reward, **kwargs)
    with pytest.raises(InputError, match="noise"):
        reno_optimize(generator, torch.full((1, 4, SIDE, SIDE), float("nan")), reward)
    with pytest.raises(InputError, match="generator"):
        reno_optimize(None, z, reward)
    with pytest.raises(InputError, match="differentiabl"):
        reno_optimize(lambda x: generator(x).detach(), z, reward, iterations=2)
    with pytest.raises(InputError, match="batch 1"):
        reno_optimize(lambda x: torch.cat([generator(x)] * 2), z, reward, iterations=2)
    with pytest.raises(InputError, match="no terms"):
        reno_optimize(generator, z, [])
    with torch.inference_mode():
        frozen = torch.nn.Conv2d(4, 4, 3, padding=1)                  # inference-tensor weights
    with pytest.raises(InputError, match="inference_mode"):
        reno_optimize(lambda x: frozen(x), z, reward, iterations=2)


def test_a_seeded_stochastic_generator_draws_the_same_randomness_every_iteration(model, generator):
    """ReNO reseeds before every iteration: the best noise then regenerates the best latents."""
    drop = torch.nn.Dropout(0.5)
    stochastic = lambda z: drop(generator(z))
    res = reno_optimize(stochastic, noise(), LatentMatch(model, "a cat"), iterations=6, seed=0)
    assert max(res.best_iteration) > 0                              # the best is not the untouched start
    torch.manual_seed(0)
    with torch.no_grad():
        again = stochastic(res.noise.to(torch.float32))
    assert torch.allclose(again, res.latents, atol=1e-5)
