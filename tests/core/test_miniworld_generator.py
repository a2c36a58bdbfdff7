"""The mini generator: deterministic from noise, differentiable, its files, and ReNO on it."""
from __future__ import annotations

import pytest
import torch

from latentclip.configs import WEIGHTS_DIR
from latentclip.errors import CheckpointError, InputError
from latentclip.miniworld import generator as GN
from latentclip.miniworld import geneval as G

MINI = WEIGHTS_DIR / "mini"
shipped = pytest.mark.skipif(not (MINI / GN.FILE).is_file(), reason="weights/mini/generator.safetensors not present")


@pytest.fixture(scope="module")
def fresh():
    torch.manual_seed(0)
    m = GN.MiniGenerator()
    # give the zero-initialised output layers some weight so outputs depend on everything
    for blk in m.blocks:
        torch.nn.init.normal_(blk.c2.weight, std=0.02)
    torch.nn.init.normal_(m.out.weight, std=0.02)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def world():
    return G.load_world(MINI)


def test_tokenize_grammar_words_and_rejects_others():
    t = GN.tokenize(["a red circle", ""])
    assert t.shape == (2, GN.CONTEXT) and t[0, 0] == 1 and (t[0, 1:4] > 1).all() and (t[0, 4:] == 0).all()
    assert (t[1, 1:] == 0).all()
    with pytest.raises(InputError, match="purple"):
        GN.tokenize(["a purple circle"])


def test_sample_is_deterministic_and_varies_with_noise(fresh):
    noise = GN.noise_for([1, 2, 3])
    keep = noise.clone()
    a = fresh.sample(noise, ["a red circle", "two blue squares", "a green object"])
    b = fresh.sample(GN.noise_for([1, 2, 3]), ["a red circle", "two blue squares", "a green object"])
    assert torch.equal(a, b) and torch.equal(noise, keep)
    assert a.shape == (3, 4, 8, 8)
    c = fresh.sample(GN.noise_for([4, 2, 3]), ["a red circle", "two blue squares", "a green object"])
    assert not torch.allclose(a[0], c[0]) and torch.equal(a[1:], c[1:])  # items are independent


def test_sample_is_differentiable_through_all_steps(fresh):
    noise = GN.noise_for([5, 6]).requires_grad_(True)
    out = fresh.sample(noise, "a yellow triangle", steps=4)
    (g,) = torch.autograd.grad(out.pow(2).sum(), [noise])
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0 and g[1].abs().sum() > 0
    # a finite difference agrees with the gradient along a random direction
    d = torch.randn_like(noise)
    eps = 1e-3
    with torch.no_grad():
        f = lambda z: fresh.sample(z, "a yellow triangle").pow(2).sum()  # noqa: E731
        fd = (f(noise + eps * d) - f(noise - eps * d)) / (2 * eps)
    assert torch.allclose(fd, (g * d).sum(), rtol=0.05, atol=1e-3)


def test_x0_hook_edits_every_step(fresh):
    calls = []

    def hook(x0, t, step):
        calls.append((step, t))
        return x0 * 0 + 0.5
    out = fresh.sample(GN.noise_for([1]), "a red circle", steps=3, x0_hook=hook)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=1e-5)  # the last step lands on the edit


def test_bad_inputs_raise_input_error(fresh):
    with pytest.raises(InputError, match="noise"):
        fresh.sample(torch.zeros(2, 4, 16, 16), "a red circle")
    with pytest.raises(InputError, match="prompts"):
        fresh.sample(GN.noise_for([1, 2, 3]), ["a red circle", "a blue square"])


def test_save_load_round_trip(tmp_path, fresh):
    p = GN.save_generator(fresh, tmp_path / "g.safetensors")
    g2 = GN.load_generator(p)
    n = GN.noise_for([9])
    assert torch.equal(fresh.sample(n, "a circle"), g2.sample(n, "a circle"))
    with pytest.raises(FileExistsError):
        GN.save_generator(fresh, p)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a mini generator"):
        GN.load_generator(tmp_path / "other.safetensors")


def test_training_is_deterministic_for_a_seed():
    from latentclip.miniworld.vae import MiniVAE
    torch.manual_seed(1)
    vae = MiniVAE((8, 8, 8)).eval()
    recipe = {"steps": 3, "pool": 64, "batch": 16}
    a, info = GN.train_generator(vae, seed=3, recipe=recipe, log=lambda m: None)
    b, _ = GN.train_generator(vae, seed=3, recipe=recipe, log=lambda m: None)
    assert info["steps"] == 3 and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c, _ = GN.train_generator(vae, seed=4, recipe=recipe, log=lambda m: None)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@shipped
def test_shipped_generator_is_small_and_reads_the_vae_latent_space(world):
    n = sum(p.numel() for p in world.generator.parameters())
    assert 0.5e6 < n < 2e6
    lat = world.generator.sample(GN.noise_for(range(8)), "a red circle")
    img = world.vae.decode(lat)
    assert img.shape == (8, 3, 64, 64)


#: Small fixed set: prompts of several categories, two seeds each.
FIXED = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle",
         "a yellow square above a red circle", "three green circles", "a blue triangle below a red square"]


@shipped
def test_short_reno_run_raises_judge_success_above_baseline(world):
    items = [("colors", p, s) for p in FIXED for s in (11, 12)]
    items = [(G.infer_category(p), p, s) for _, p, s in items]
    base = G.run_one(world, "baseline", items)
    reno = G.run_one(world, "reno_latent", items, settings={"iterations": 12})
    assert sum(reno["ok"]) > sum(base["ok"]), (base["ok"], reno["ok"])


def test_geneval_prompt_set_covers_six_categories(tmp_path):
    prompts = G.default_prompts()
    assert len(prompts) >= 60 and {c for c, _ in prompts} == set(G.CATEGORIES)
    assert len({p for _, p in prompts}) == len(prompts)
    f = tmp_path / "p.txt"
    f.write_text("# comment\na red circle\nthree blue squares\nposition: a red circle above a blue square\n")
    assert G.read_prompts(f) == [("colors", "a red circle"), ("counting", "three blue squares"),
                                 ("position", "a red circle above a blue square")]
    f.write_text("color_binding: a red circle\n")
    with pytest.raises(InputError, match="two-object"):
        G.read_prompts(f)
    f.write_text("shapes: a red circle\n")
    with pytest.raises(InputError, match="category"):
        G.read_prompts(f)


def test_category_success_reads_the_right_attributes():
    v = {"color": False, "shape": True, "object": False, "count": True, "relation": False, "ok": False}
    assert G.success("two_objects", v) and not G.success("color_binding", v) and not G.success("position", v)
    assert G.success("color_binding", {**v, "object": True}) and not G.success("colors", v)


def test_sample_runs_on_a_gpu_and_matches_the_cpu(fresh):
    """``sample`` steps through CPU times; the time features must follow the model onto its device
    (before, ``load_generator(path, device="cuda").sample(...)`` stopped on a device mismatch)."""
    import copy
    from fake_device import fake_device, to_device
    noise = GN.noise_for([1, 2])
    want = fresh.sample(noise, "a red circle", steps=3)
    gpu = to_device(copy.deepcopy(fresh))
    with fake_device() as dev:
        got = gpu.sample(noise.to(dev), "a red circle", steps=3)
        assert got.device == dev
        got = got.cpu()
    assert torch.allclose(got, want, atol=1e-6)
