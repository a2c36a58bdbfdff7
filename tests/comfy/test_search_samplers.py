"""Every sampler KSamplerSelect lists x every search strategy, on the tiny models (docs/search.md, "Samplers").

For each pair, either the Search Sampler is refused at the start with one sentence naming the sampler
and what to pick instead, or:
* one particle gives exactly the plain SamplerCustom result (same sampler, seed, sigmas);
* the reported best reward is the reward of the returned sample (one and two particles);
* UNet rows evaluated = particles x the plain sampler's (best_of_n and fk_steering, one and two particles).
"""

import pytest
import torch

import latentclip
from conftest import tiny_conditioning, tiny_sdxl
from test_search_nodes import handle  # noqa: F401  (the module-scoped tiny Latent-CLIP fixture, shared)

STEPS = 3          # FK resamples after steps 1 and 2 (auto start), prune after step 1: three intervals
SIDE = 16
TEXT = "a red fox"
#: The pairs refused at the start, by strategy (best_of_n runs every sampler uncut).
MULTISTEP = {"lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
             "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ipndm", "ipndm_v", "deis", "res_multistep",
             "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
             "gradient_estimation_cfg_pp", "er_sde", "sa_solver", "sa_solver_pece", "uni_pc", "uni_pc_bh2"}
WHOLE_SCHEDULE = {"heunpp2", "dpm_fast", "dpm_adaptive", "lcm_upscale"}


#: KSamplerSelect's list in ComfyUI v0.3.64 (checked against the running ComfyUI by the first test).
SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
            "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
            "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
            "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
            "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
            "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]


def test_the_matrix_covers_every_sampler_comfyui_lists(comfy):
    import comfy.samplers as samplers
    missing = [n for n in samplers.KSampler.SAMPLERS if n not in SAMPLERS]
    assert not missing, f"new samplers in KSamplerSelect's list: {missing}; add them to SAMPLERS and docs/search.md"




class CountedModel:
    """A tiny SDXL whose UNet rows are counted through a unet function wrapper (ComfyUI's own hook)."""

    def __init__(self):
        self.rows = 0
        self.patcher = tiny_sdxl().clone()

        def count(apply_model, args):
            self.rows += args["input"].shape[0]
            return apply_model(args["input"], args["timestep"], **args["c"])
        self.patcher.set_model_unet_function_wrapper(count)


@pytest.fixture(scope="module")
def counted(comfy):
    return CountedModel()


@pytest.fixture(scope="module")
def reward(comfy, handle):
    return comfy.run_node("LatentCLIPReward", latent_clip=handle, text=TEXT, mode="match", weight=0.01).result[0]


def run(comfy, counted, sampler, seed=11, latent=None, add_noise=True, steps=STEPS):
    """SamplerCustom at cfg 1.5 on the counted tiny SDXL; returns (raw samples, UNet rows it took)."""
    latent = latent if latent is not None else {"samples": torch.zeros(1, 4, SIDE, SIDE)}
    sigmas = comfy.run_node("BasicScheduler", model=counted.patcher, scheduler="karras", steps=steps, denoise=1.0)[0]
    before = counted.rows
    out = comfy.run_node("SamplerCustom", model=counted.patcher, add_noise=add_noise, noise_seed=seed, cfg=1.5,
                         positive=tiny_conditioning(1), negative=tiny_conditioning(2), sampler=sampler,
                         sigmas=sigmas, latent_image=latent)[0]
    return out["samples"], counted.rows - before


def search(comfy, reward, name, strategy, particles, **kw):
    inner = comfy.run_node("KSamplerSelect", sampler_name=name)[0]
    args = dict(reward=reward, sampler=inner, particles=particles, strategy=strategy, potential="difference",
                temperature=30.0, interval=1, start=0, prune_steps="1", keep=0.5, seed=3, max_batch=0)
    args.update(kw)
    return comfy.run_node("LatentCLIPSearchSampler", **args).result[0]


def refused(name, strategy):
    return strategy != "best_of_n" and (name in MULTISTEP or name in WHOLE_SCHEDULE)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_with_every_strategy(comfy, handle, counted, reward, name):
    plain, plain_rows = run(comfy, counted, comfy.run_node("KSamplerSelect", sampler_name=name)[0])
    assert plain_rows > 0 and torch.isfinite(plain).all()
    for strategy in ("best_of_n", "prune", "fk_steering"):
        if refused(name, strategy):
            with pytest.raises(ValueError, match=rf"^sampler {name} .* so {strategy} cannot steer it; pick .*"):
                search(comfy, reward, name, strategy, 1)
            continue
        for particles in (1, 2):
            sampler = search(comfy, reward, name, strategy, particles)
            out, rows = run(comfy, counted, sampler)
            summary = sampler.last_summary
            where = f"{name} / {strategy} / {particles} particle(s)"
            if particles == 1:
                assert torch.allclose(out, plain, atol=1e-6, rtol=0), f"{where}: differs from plain SamplerCustom"
            # the reported best reward is the returned sample's reward (r = cos - 1 for this match term)
            returned = float(latentclip.cosine(handle.load(), out, TEXT)) - 1.0
            assert summary["best_reward"][0] == pytest.approx(returned, abs=1e-4), where
            assert summary["lookahead_misses"] == 0, where
            if strategy != "prune" or particles == 1:
                assert rows == particles * plain_rows, f"{where}: {rows} UNet rows, plain {plain_rows}"
            assert summary["nfe_rows"] * 2 == rows, where   # each guided call is a cond and an uncond row


def test_add_noise_off_every_particle_starts_from_the_given_latent(comfy, counted, reward):
    """SamplerCustom with add_noise off passes zero noise: no particle may get noise of its own on top."""
    latent = {"samples": torch.randn(1, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(4))}
    plain, _ = run(comfy, counted, comfy.run_node("KSamplerSelect", sampler_name="euler")[0], latent=latent,
                   add_noise=False)
    sampler = search(comfy, reward, "euler", "best_of_n", 3)
    out, _ = run(comfy, counted, sampler, latent=latent, add_noise=False)
    final = sampler.last_summary["history"]["reward"][-1][0]
    assert max(final) - min(final) < 1e-5, final      # a deterministic sampler from one start: three equal particles
    assert torch.allclose(out, plain, atol=1e-4, rtol=1e-5)   # (a batch of 3 rounds differently from a batch of 1)


def test_nan_latent_is_refused_before_any_model_call_naming_latent_image(comfy, counted, reward):
    latent = {"samples": torch.zeros(1, 4, SIDE, SIDE)}
    latent["samples"][0, 0, 0, 0] = float("nan")
    before = counted.rows
    with pytest.raises(ValueError, match="^latent_image contains NaN or infinite values"):
        run(comfy, counted, search(comfy, reward, "euler_ancestral", "fk_steering", 2), latent=latent)
    assert counted.rows == before


def test_default_fk_on_a_one_step_schedule_blames_the_schedule_not_start(comfy, counted, reward):
    with pytest.raises(ValueError) as err:
        run(comfy, counted, search(comfy, reward, "euler_ancestral", "fk_steering", 2), steps=1)
    text = str(err.value)
    assert "start" not in text and "best_of_n" in text and "1 step" in text, text


def test_cfg_pp_sampler_under_fk_gets_its_uncond_prediction_at_every_step(comfy, counted, reward):
    """The CFG++ samplers read uncond_denoised from a post-CFG hook; the lookahead's stored call must
    feed the next interval's hook (it raised a TypeError, or for dpmpp_2s_ancestral_cfg_pp gave ~4x the
    standard deviation). With 3 particles: no model call beyond particles x plain, results near plain's scale."""
    for name in ("dpmpp_2s_ancestral_cfg_pp", "euler_ancestral_cfg_pp"):
        plain, plain_rows = run(comfy, counted, comfy.run_node("KSamplerSelect", sampler_name=name)[0])
        sampler = search(comfy, reward, name, "fk_steering", 3, temperature=0.0)
        out, rows = run(comfy, counted, sampler)
        assert rows == 3 * plain_rows and sampler.last_summary["lookahead_misses"] == 0
        assert 0.5 < float(out.std() / plain.std()) < 2.0, (name, float(out.std()), float(plain.std()))


def test_the_table_in_docs_is_this_matrix():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "search.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in SAMPLERS:
            rows[cells[0]] = cells[1:]
    assert list(rows) == SAMPLERS
    for name, cells in rows.items():
        for strategy, cell in zip(("best_of_n", "prune", "fk_steering"), cells):
            assert cell.startswith("refused") == refused(name, strategy), (name, strategy, cell)


def test_lcm_upscale_runs_uncut_and_is_refused_where_the_search_cuts_the_schedule(comfy, counted, reward):
    """ComfyUI's SamplerLCMUpscale derives its upscale steps from the sigmas it is given: cut into intervals
    it would upscale once per interval (fk_steering gave 162x162 for a 48x48 result)."""
    up = comfy.run_node("SamplerLCMUpscale", scale_ratio=1.5, scale_steps=-1, upscale_method="bilinear")[0]
    plain, _ = run(comfy, counted, up, steps=4)
    assert plain.shape[-2:] == (SIDE * 3 // 2, SIDE * 3 // 2)
    inner = dict(reward=reward, sampler=up, particles=2, potential="difference", temperature=30.0, interval=1,
                 start=0, prune_steps="1", keep=0.5, seed=3, max_batch=0)
    best, _ = run(comfy, counted, comfy.run_node("LatentCLIPSearchSampler", strategy="best_of_n", **inner).result[0],
                  steps=4)
    assert best.shape == plain.shape
    for strategy in ("prune", "fk_steering"):
        with pytest.raises(ValueError, match=rf"^sampler lcm_upscale reads the whole schedule .* so {strategy} cannot"):
            comfy.run_node("LatentCLIPSearchSampler", strategy=strategy, **inner)


def test_prune_on_a_one_step_schedule_blames_the_schedule():
    from latentclip.errors import InputError
    from latentclip.search import SearchSettings
    with pytest.raises(InputError, match="^prune drops particles between steps and a schedule of 1 step has no step"):
        SearchSettings(strategy="prune", prune_at=(1,)).validate(1)
