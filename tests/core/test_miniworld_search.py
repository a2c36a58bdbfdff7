"""Search on the mini generator: the CLI's JSON, equal NFE, the stochastic sampler, and avoid terms."""
from __future__ import annotations

import json

import pytest
import torch

from latentclip.configs import WEIGHTS_DIR
from latentclip.miniworld import generator as GN
from latentclip.miniworld import geneval as G
from latentclip.miniworld import search as MS
from latentclip.miniworld.__main__ import main

MINI = WEIGHTS_DIR / "mini"
pytestmark = pytest.mark.skipif(not (MINI / GN.FILE).is_file(), reason="weights/mini/generator.safetensors not present")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    return G.load_world(MINI)


def test_cli_writes_every_strategy_at_equal_nfe_and_refuses_to_overwrite(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("colors: a red circle\ncounting: two blue squares\nposition: a green circle to the left of a red square\n")
    out = tmp_path / "search.json"
    assert main(["search", "--prompts", str(prompts), "--json", str(out), "--particles", "2", "--seeds", "1",
                 "--steps", "4", "--no-safety"]) == 0
    data = json.loads(out.read_text())
    runs = data["search"]
    assert set(runs) == {"baseline", "best_of_n", "prune", "fk_latent", "fk_pixel"}
    assert runs["baseline"]["nfe_per_image"] == 4
    assert {runs[k]["nfe_per_image"] for k in ("best_of_n", "fk_latent", "fk_pixel")} == {8}
    assert 4 < runs["prune"]["nfe_per_image"] <= 8
    for r in runs.values():
        assert 0 <= r["overall"] <= 1 and r["seconds_per_image"] > 0
    assert set(data["informative_steps"]["pick_success"]) == {"1", "2", "3", "4"}
    assert "fk_latent" in capsys.readouterr().out
    assert main(["search", "--json", str(out), "--particles", "2"]) == 2      # existing file: refused
    other = tmp_path / "fk.json"
    assert main(["search", "--prompts", str(prompts), "--json", str(other), "--particles", "2", "--seeds", "1",
                 "--steps", "4", "--no-safety", "--no-trace", "--runs", "fk_latent", "--no-lookahead"]) == 0
    data = json.loads(other.read_text())
    assert set(data["search"]) == {"fk_latent"} and data["settings"]["lookahead"] is False
    assert main(["search", "--json", str(tmp_path / "x.json"), "--runs", "fk_latent,beam"]) == 2
    assert "unknown run 'beam'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:                        # the parser refuses it, in one line
        main(["search", "--json", str(tmp_path / "x.json"), "--batch", "0"])
    assert refused.value.code == 2 and "argument --batch: 0 is below 1" in capsys.readouterr().err


def test_stochastic_sampler_is_seeded_and_eta_zero_is_the_generators_euler(world):
    prompts = ["a red circle", "two blue squares"]
    noise = MS.particle_noise([0, 1], 1)
    cond = world.generator.prepare(prompts, 2)
    x0 = lambda eta, seed: MS.stochastic_advance(world.generator, cond, 2, 4, eta, seed)(noise, 0, 4)[0]
    with torch.no_grad():
        euler = world.generator.from_raw(world.generator.sample(noise, prompts, steps=4))
    assert torch.allclose(x0(0.0, 0), euler, atol=1e-5)
    assert torch.equal(x0(0.7, 3), x0(0.7, 3)) and not torch.allclose(x0(0.7, 3), x0(0.7, 4))


@pytest.mark.parametrize("t,tn", [(1.0, 0.875), (0.75, 0.625), (0.5, 0.375), (0.25, 0.125), (0.9, 0.2)])
def test_posterior_noise_is_the_forward_process_conditional(t, tn):
    """Var(x_t' | x_t, x0) of the forward process x_s = (1-s) x0 + s eps (a Markov chain from t' to t),
    by Gaussian conditioning: t'^2 - Cov(x_t', x_t)^2 / t^2, Cov = (1-t)/(1-t') t'^2."""
    cov = (1 - t) / (1 - tn) * tn ** 2
    assert MS.noise_scale(t, tn, 1.0, "posterior") ** 2 == pytest.approx(tn ** 2 - cov ** 2 / t ** 2)
    assert MS.noise_scale(t, tn, 0.5, "posterior") == pytest.approx(0.5 * MS.noise_scale(t, tn, 1.0, "posterior"))
    assert MS.noise_scale(t, tn, 1.0, "fresh") == pytest.approx(tn)     # the older sampler: all fresh noise
    assert MS.noise_scale(t, 0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="noise must be one of"):
        MS.noise_scale(t, tn, 1.0, "ancestral")


def test_lookahead_scores_the_state_it_returns_at_the_same_model_calls(world):
    """With lookahead the x0 reported for a step is the prediction for the state after it; the call
    is reused by the next step (carry), so a split run costs what one run costs and samples the same."""
    prompts = ["a red circle", "two blue squares"]
    cond = world.generator.prepare(prompts, 2)
    noise = MS.particle_noise([0, 1], 2)
    calls = []
    velocity = world.generator.velocity

    def counted(x, t, c):
        calls.append(x.shape[0])
        return velocity(x, t, c)
    world.generator.velocity = counted
    try:
        whole, x0w, _ = MS.stochastic_advance(world.generator, cond, 2, 6, 1.0, 3, lookahead=True)(noise, 0, 6)
        assert sum(calls) == 6 * 4
        calls.clear()
        adv = MS.stochastic_advance(world.generator, cond, 2, 6, 1.0, 3, lookahead=True)
        x2, x0a, carry = adv(noise, 0, 2)
        with torch.no_grad():
            here = world.generator.to_raw(x2 - (4 / 6) * velocity(x2, torch.tensor([4 / 6]), cond_rows(cond, 2)))
        assert torch.allclose(x0a[-1], here, atol=1e-5)              # scores the state it returns
        x6, x0b, _ = adv(x2, 2, 6, carry=carry)
        assert sum(calls) == 6 * 4                                    # no extra call for the split
        assert torch.allclose(x6, whole, atol=1e-6) and torch.allclose(x0b[-1], x0w[-1], atol=1e-6)
    finally:
        world.generator.velocity = velocity


def cond_rows(cond, rows):
    from latentclip.search import expand_items
    return tuple(expand_items(t, rows) for t in cond[0])


def test_one_particle_deterministic_run_returns_the_generators_raw_latents(world):
    prompts = ["a red circle", "three green triangles"]
    res = MS.run_batch(world, "baseline", prompts, [5, 6], particles=1, steps=4, eta=0.0)
    with torch.no_grad():
        raw = world.generator.sample(GN.noise_for([5, 6]), prompts, steps=4)
    assert torch.allclose(res.samples, raw, atol=1e-5)


def test_prune_fills_the_same_budget_as_best_of_n():
    st = MS.settings_for("prune", 8, 8)
    from latentclip.search import particle_steps
    assert particle_steps(st, 8) <= 64 < particle_steps(type(st)(**{**st.__dict__, "particles": st.particles + 1}), 8)
    assert st.particles > 8


def test_fk_with_an_avoid_term_lowers_the_concept_rate(world):
    res = MS.safety(world, particles=4, steps=6)
    assert res["fk_avoid"]["concept_rate"] < res["baseline"]["concept_rate"]
    assert res["fk_avoid"]["nfe_per_image"] == 4 * res["baseline"]["nfe_per_image"]
