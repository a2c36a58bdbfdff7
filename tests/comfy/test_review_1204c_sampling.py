"""Review 1204c: sampling-path fixes (safety guidance, ReNO, search) found on real ComfyUI samplers with tiny
random models (the mechanics, not image quality)."""
import pytest
import torch

from conftest import tiny_conditioning, tiny_reward_handle, tiny_sdxl
from latentclip.errors import InputError


@pytest.fixture(scope="module")
def handle(comfy, tiny_ckpt):
    return comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp32").result[0]


def test_safety_guidance_weights_an_edm_model_by_its_own_sigma_data(comfy, handle):
    """Playground v2.5 (SDXL family) samples with sigma_data 0.5: its noise share at sigma s is
    s^2 / (s^2 + 0.25). At s = 0.5 that is a half, so the move is half of scale; the EPS formula with
    sigma_data 1 gave a fifth (0.01 of 0.05) and faded the guidance early."""
    model = comfy.run_node("ModelSamplingContinuousEDM", model=tiny_sdxl(), sampling="edm_playground_v2.5",
                           sigma_max=80.0, sigma_min=0.002)[0]
    guided = comfy.run_node("LatentCLIPSafetyGuidance", model=model, latent_clip=handle, concepts="a dog",
                            scale=0.05).result[0]
    record = guided.model_options["sampler_post_cfg_function"][-1].latent_clip_record
    sampler = comfy.run_node("KSamplerSelect", sampler_name="euler")[0]
    cond = tiny_conditioning(0, 1)
    comfy.run_node("SamplerCustom", model=guided, add_noise=True, noise_seed=0, cfg=1.0, positive=cond,
                   negative=cond, sampler=sampler, sigmas=torch.tensor([0.5, 0.1, 0.0]),
                   latent_image={"samples": torch.zeros(1, 4, 32, 32)})
    moves = {round(s["sigma"], 2): s["relative_move"][0] for s in record.runs[-1]["steps"]}
    assert moves[0.5] == pytest.approx(0.025, rel=0.05)
    assert moves[0.1] == pytest.approx(0.05 * 0.01 / 0.26, rel=0.05)


def test_reno_on_a_continuous_edm_schedule_is_one_sentence_not_nan_latents(comfy):
    """The ReNO node takes SDTurboScheduler's timesteps 999, 899, ...; a continuous EDM schedule (Playground
    v2.5, SDXL family) maps 999 to sigma exp(3996) = inf, and ReNO returned NaN latents with loss 'nan -> inf'."""
    model = comfy.run_node("ModelSamplingContinuousEDM", model=tiny_sdxl(), sampling="edm",
                           sigma_max=80.0, sigma_min=0.002)[0]
    handle = tiny_reward_handle(comfy, "tiny-reno.safetensors", device="cpu")
    reward = comfy.run_node("LatentCLIPReward", latent_clip=handle, text="a red fox", mode="match",
                            weight=0.01).result[0]
    with pytest.raises(InputError, match=r"^sigmas .*finite"):
        comfy.run_node("LatentCLIPReNO", model=model, positive=tiny_conditioning(1, 1),
                       negative=tiny_conditioning(2, 1), latent_image={"samples": torch.zeros(1, 4, 32, 32)},
                       reward=reward, seed=5, iterations=2, learning_rate=5.0, optimizer="sgd", grad_clip=0.1,
                       regularization=0.01, steps=1, cfg=1.0)
