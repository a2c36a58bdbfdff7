"""Search sampler inside a real ComfyUI: tiny SDXL UNet, KSamplerSelect samplers, SamplerCustom."""
import json
import math

import pytest
import torch

import latentclip
from latentclip import configs
from conftest import interrupt_at_progress, tiny_conditioning, tiny_latent_clip, tiny_sdxl

STEPS = 4


@pytest.fixture(scope="module")
def handle(comfy):
    model = tiny_latent_clip(seed=5)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100.0))
    path = comfy.models / "latent_clip" / "tiny-search.safetensors"
    if not path.exists():
        latentclip.save(model, path)
    return comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device="cpu", dtype="fp32").result[0]


@pytest.fixture(scope="module")
def model(comfy):
    return tiny_sdxl()


def reward_of(comfy, handle, text="a red fox", mode="match", chain=None, weight=0.01):
    kw = {"reward": chain} if chain is not None else {}
    return comfy.run_node("LatentCLIPReward", latent_clip=handle, text=text, mode=mode, weight=weight, **kw).result[0]


def search_sampler(comfy, reward, sampler_name="euler_ancestral", **kw):
    args = dict(reward=reward, sampler=comfy.run_node("KSamplerSelect", sampler_name=sampler_name)[0], particles=3,
                strategy="fk_steering", potential="difference", temperature=100.0, interval=1, start=1,
                prune_steps="2", keep=0.5, seed=0, max_batch=0, score_every_step=True)
    args.update(kw)
    return comfy.run_node("LatentCLIPSearchSampler", **args).result[0]


def sample(comfy, model, sampler, latent, steps=STEPS, scheduler="karras", seed=9, batch=1):
    sigmas = comfy.run_node("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=1.0)[0]
    return comfy.run_node("SamplerCustom", model=model, add_noise=True, noise_seed=seed, cfg=1.5,
                          positive=tiny_conditioning(1, batch), negative=tiny_conditioning(2, batch), sampler=sampler,
                          sigmas=sigmas, latent_image=latent)[0]


@pytest.mark.parametrize("name, evals_per_step", [("euler", 1), ("euler_ancestral", 1), ("dpmpp_2s_ancestral", 2),
                                                   ("dpmpp_sde", 2), ("lcm", 1)])
def test_every_sampler_runs_fk_steering_at_particles_times_steps(comfy, handle, model, name, evals_per_step):
    latent = {"samples": torch.zeros(2, 4, 32, 32)}
    before = latent["samples"].clone()
    sampler = search_sampler(comfy, reward_of(comfy, handle), name)
    out = sample(comfy, model, sampler, latent, batch=2)
    assert torch.equal(latent["samples"], before)
    assert out["samples"].shape == (2, 4, 32, 32) and torch.isfinite(out["samples"]).all()
    s = sampler.last_summary
    assert [e["step"] for e in s["history"]["events"]] == [1, 2, 3]
    # guided model calls (each is a cond and an uncond UNet row at cfg 1.5); a 2-call sampler's last step makes one
    calls = 3 * (STEPS * evals_per_step - (evals_per_step - 1))
    assert s["nfe_per_item"] == calls
    best = s["best_reward"]
    final = s["history"]["reward"][-1]
    assert best == pytest.approx([max(row) for row in final], abs=1e-5)


def test_fk_scores_the_state_it_resamples_at_no_extra_model_calls(comfy, handle, model):
    """On a deterministic path, FK's reward after step s is the score of the x0 predicted for the
    state after step s, which best-of-N's every-step trace records at step s + 1 (its x0 is the one
    the model call of step s + 1 makes); the lookahead call is reused, so both cost the same."""
    reward = reward_of(comfy, handle)
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    fk = search_sampler(comfy, reward, "euler", particles=1, start=1, interval=1)
    bon = search_sampler(comfy, reward, "euler", particles=1, strategy="best_of_n")
    a, b = sample(comfy, model, fk, latent), sample(comfy, model, bon, latent)
    assert torch.allclose(a["samples"], b["samples"], atol=1e-5)
    fk_h, trace = fk.last_summary["history"], bon.last_summary["history"]["trace"]
    assert fk_h["scored_steps"] == [1, 2, 3, STEPS]
    for step, rewards in zip(fk_h["scored_steps"][:-1], fk_h["reward"]):
        assert rewards[0] == pytest.approx(trace[str(step + 1)][0], abs=1e-5)
    assert fk.last_summary["nfe_per_item"] == bon.last_summary["nfe_per_item"] == STEPS


def test_one_particle_best_of_n_is_the_inner_sampler_itself(comfy, handle, model):
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    plain = sample(comfy, model, comfy.run_node("KSamplerSelect", sampler_name="euler")[0], latent)
    searched = sample(comfy, model, search_sampler(comfy, reward_of(comfy, handle), "euler", particles=1,
                                                   strategy="best_of_n"), latent)
    assert torch.allclose(plain["samples"], searched["samples"], atol=1e-5)


def test_best_of_n_returns_the_particle_with_the_best_final_reward(comfy, handle, model):
    sampler = search_sampler(comfy, reward_of(comfy, handle, "a blue boat"), "euler_ancestral", particles=4,
                             strategy="best_of_n", score_every_step=False)
    out = sample(comfy, model, sampler, {"samples": torch.zeros(1, 4, 32, 32)})
    cos = float(latentclip.cosine(handle.load(), out["samples"], "a blue boat"))
    # the reward is -0.01 * (100 - 100 cos) of the returned latent, and the highest of the four
    assert sampler.last_summary["best_reward"][0] == pytest.approx(cos - 1.0, abs=1e-4)
    assert sampler.last_summary["best_reward"][0] == pytest.approx(max(sampler.last_summary["history"]["reward"][-1][0]), abs=1e-6)
    assert sampler.last_summary["history"]["scored_steps"] == [STEPS] and sampler.last_summary["history"]["trace"] == {}


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_sde"])
def test_same_seed_same_result_whatever_the_chunking(comfy, handle, model, name):
    reward = reward_of(comfy, handle)
    latent = {"samples": torch.zeros(2, 4, 32, 32)}
    a = sample(comfy, model, search_sampler(comfy, reward, name, particles=3), latent, batch=2)
    b = sample(comfy, model, search_sampler(comfy, reward, name, particles=3, max_batch=2), latent, batch=2)
    c = sample(comfy, model, search_sampler(comfy, reward, name, particles=3, seed=1), latent, batch=2)
    assert torch.allclose(a["samples"], b["samples"], atol=1e-5)
    assert not torch.allclose(a["samples"], c["samples"], atol=1e-5)


def test_prune_drops_particles_and_saves_their_steps(comfy, handle, model):
    sampler = search_sampler(comfy, reward_of(comfy, handle), "euler_ancestral", particles=4, strategy="prune",
                             prune_steps="1, 2", keep=0.5)
    sample(comfy, model, sampler, {"samples": torch.zeros(1, 4, 32, 32)})
    s = sampler.last_summary
    assert s["history"]["alive"] == [4, 2, 1]
    assert s["nfe_per_item"] == 4 + 2 + 1 + 1


def test_history_node_gives_json_and_a_plot(comfy, handle, model):
    sampler = search_sampler(comfy, reward_of(comfy, handle), "lcm")
    out = sample(comfy, model, sampler, {"samples": torch.zeros(1, 4, 32, 32)})
    text, plot = comfy.run_node("LatentCLIPSearchHistory", sampler=sampler, samples=out).result
    summary = json.loads(text)
    assert summary["history"]["scored_steps"] == [1, 2, 3, 4] and len(summary["history"]["events"]) == 3
    assert sorted(map(int, summary["history"]["trace"])) == [1, 2, 3, 4]
    assert plot.ndim == 4 and plot.shape[-1] == 3


@pytest.mark.parametrize("kw, match", [
    ({"interval": 5}, "must be below the sampler's 4 steps"),
    ({"strategy": "prune", "prune_steps": "9"}, "prune_at step 9 is beyond the sampler's 4 steps"),
    ({"strategy": "prune", "prune_steps": "two"}, "prune_steps must be step numbers"),
    ({"strategy": "prune", "prune_steps": "\u00b2"}, "prune_steps must be step numbers"),   # '2'.isdigit() but not int()
])
def test_bad_settings_are_one_clear_error(comfy, handle, model, kw, match):
    with pytest.raises(ValueError, match=match):
        sample(comfy, model, search_sampler(comfy, reward_of(comfy, handle), **kw), {"samples": torch.zeros(1, 4, 32, 32)})


def test_particles_below_one_is_refused(comfy, handle):
    with pytest.raises(ValueError, match="particles must be an integer >= 1"):
        search_sampler(comfy, reward_of(comfy, handle), particles=0)


def test_a_reward_for_another_vae_is_refused(comfy, model):
    path = comfy.models / "latent_clip" / "tiny-search-sd3.safetensors"
    if not path.exists():
        latentclip.save(tiny_latent_clip(seed=6, cfg=configs.for_family("Latent-ViT-Tiny-test", "sd3")), path)
    h = comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device="cpu", dtype="fp32").result[0]
    with pytest.raises(ValueError, match="reads SD3-VAE latents but the model makes SDXL latents"):
        sample(comfy, model, search_sampler(comfy, reward_of(comfy, h)), {"samples": torch.zeros(1, 4, 32, 32)})


def test_interrupt_stops_within_one_step(comfy, handle, model):
    import comfy.model_management as mm
    with interrupt_at_progress(2) as seen, pytest.raises(mm.InterruptProcessingException):
        sample(comfy, model, search_sampler(comfy, reward_of(comfy, handle), particles=2), {"samples": torch.zeros(1, 4, 32, 32)},
               steps=20)
    assert max(seen) <= 3, seen


def test_pixel_reward_in_the_chain_decodes_at_each_scoring_point(comfy, handle, model):
    import open_clip
    from test_reno_nodes import tiny_taesd_vae
    path = comfy.models / "open_clip" / "open_clip_pytorch_model.bin"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-S-32", pretrained=None).state_dict(), path)
    pixel = comfy.run_node("PixelCLIPReward", clip_name=path.name, model_name="", vae=tiny_taesd_vae(),
                           text="a red fox", weight=0.01).result[0]
    sampler = search_sampler(comfy, reward_of(comfy, handle, chain=pixel), "euler_ancestral", particles=2)
    out = sample(comfy, model, sampler, {"samples": torch.zeros(1, 4, 32, 32)})
    terms = sampler.last_summary["history"]["terms"]
    assert "pixel0" in terms and "match1" in terms and len(terms["pixel0"]) == STEPS
    assert torch.isfinite(out["samples"]).all()


def test_inpainting_mask_keeps_the_unmasked_area_for_every_particle(comfy, handle, model):
    source = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 32, 32)
    mask[:, :, 16:] = 1.0                       # only the right half is sampled
    latent = comfy.run_node("SetLatentNoiseMask", samples={"samples": source}, mask=mask)[0]
    out = sample(comfy, model, search_sampler(comfy, reward_of(comfy, handle), "euler_ancestral", particles=3), latent,
                 batch=2)
    assert torch.allclose(out["samples"][..., :14], source[..., :14], atol=1e-4)
    assert not torch.allclose(out["samples"][..., 18:], source[..., 18:], atol=1e-2)


def test_history_reports_the_run_of_the_latent_it_is_given(comfy, handle, model):
    """One Search Sampler feeding two SamplerCustom nodes: each history node reports its own run."""
    sampler = search_sampler(comfy, reward_of(comfy, handle), "euler_ancestral", particles=2, strategy="best_of_n")
    first = sample(comfy, model, sampler, {"samples": torch.zeros(1, 4, 32, 32)}, seed=1)
    first_summary = sampler.last_summary
    second = sample(comfy, model, sampler, {"samples": torch.zeros(1, 4, 32, 32)}, seed=2)
    assert sampler.last_summary["best_reward"] != first_summary["best_reward"]
    text, _ = comfy.run_node("LatentCLIPSearchHistory", sampler=sampler, samples=first).result
    assert json.loads(text)["best_reward"] == first_summary["best_reward"]
    text, _ = comfy.run_node("LatentCLIPSearchHistory", sampler=sampler, samples=second).result
    assert json.loads(text)["best_reward"] == sampler.last_summary["best_reward"]
    with pytest.raises(ValueError, match="samples is not a LATENT that this Search Sampler returned"):
        comfy.run_node("LatentCLIPSearchHistory", sampler=sampler, samples={"samples": torch.zeros(1, 4, 32, 32)})


#: LatentCLIPSearchSampler as the first release saved it (workflows/latent_clip_search_fk_sdxl.api.json at
#: a7bc98a): no score_every_step.
FIRST_RELEASE_INPUTS = {"particles": 4, "strategy": "fk_steering", "potential": "difference", "temperature": 100.0,
                        "interval": 2, "start": 4, "prune_steps": "", "keep": 0.5, "seed": 0, "max_batch": 0}


def test_a_graph_saved_by_the_first_release_validates_and_keeps_its_behaviour(comfy, handle, model, tiny_ckpt):
    graph = {"1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": tiny_ckpt, "device": "cpu", "dtype": "fp32"}},
             "2": {"class_type": "LatentCLIPReward", "inputs": {"latent_clip": ["1", 0], "text": "a red fox", "mode": "match",
                                                               "weight": 0.01}},
             "3": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
             "4": {"class_type": "LatentCLIPSearchSampler", "inputs": {"reward": ["2", 0], "sampler": ["3", 0],
                                                                      **FIRST_RELEASE_INPUTS}},
             "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
             "6": {"class_type": "LatentCLIPSearchHistory", "inputs": {"sampler": ["4", 0], "samples": ["5", 0]}},
             "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}
    import asyncio
    valid = asyncio.run(comfy.execution.validate_prompt("old-graph", graph, None))
    assert valid[0], valid[1:]
    sampler = comfy.run_node("LatentCLIPSearchSampler", reward=reward_of(comfy, handle),
                             sampler=comfy.run_node("KSamplerSelect", sampler_name="euler_ancestral")[0],
                             **{**FIRST_RELEASE_INPUTS, "interval": 1, "start": 2}).result[0]
    sample(comfy, model, sampler, {"samples": torch.zeros(1, 4, 32, 32)})
    assert sampler.last_summary["history"]["trace"] == {}    # that release scored at scoring points only
