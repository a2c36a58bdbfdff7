"""Review 1204e, Search Sampler in a real ComfyUI: a pixel reward decodes particles in chunks that fit,
a partial schedule's denoised output is the winner's x0, an empty prune_steps names the input."""
import pytest
import torch

from conftest import tiny_conditioning, tiny_sdxl
from test_search_nodes import handle, reward_of, search_sampler  # noqa: F401  (module-scoped tiny Latent-CLIP)


@pytest.fixture(scope="module")
def model(comfy):
    return tiny_sdxl()


def run(comfy, model, sampler, latent, steps=4, split=None, batch=1, seed=9):
    """SamplerCustom at cfg 1.5; ``split``: keep the first ``split`` steps (SplitSigmas' high part). Returns both outputs."""
    sigmas = comfy.run_node("BasicScheduler", model=model, scheduler="karras", steps=steps, denoise=1.0)[0]
    if split is not None:
        sigmas = comfy.run_node("SplitSigmas", sigmas=sigmas, step=split)[0]
    return comfy.run_node("SamplerCustom", model=model, add_noise=True, noise_seed=seed, cfg=1.5,
                          positive=tiny_conditioning(1, batch), negative=tiny_conditioning(2, batch), sampler=sampler,
                          sigmas=sigmas, latent_image=latent)


@pytest.fixture(scope="module")
def pixel_vae(comfy):
    """The tiny TAESD VAE of the pixel reward, its decode recording the rows of every call."""
    from test_reno_nodes import tiny_taesd_vae
    vae = tiny_taesd_vae()
    decode, vae.rows = vae.first_stage_model.decode, []

    def recording(z, *args, **kwargs):
        vae.rows.append(z.shape[0])
        return decode(z, *args, **kwargs)
    vae.first_stage_model.decode = recording
    return vae


def pixel_reward(comfy, handle, vae):
    import open_clip
    path = comfy.models / "open_clip" / "open_clip_pytorch_model.bin"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-S-32", pretrained=None).state_dict(), path)
    pixel = comfy.run_node("PixelCLIPReward", clip_name=path.name, model_name="", vae=vae, text="a red fox",
                           weight=0.01).result[0]
    return reward_of(comfy, handle, chain=pixel)


def test_a_pixel_reward_decodes_at_most_max_batch_rows_and_scores_the_same(comfy, handle, model, pixel_vae):
    """All particles went through one VAE decode whatever max_batch said: 8 particles of an SDXL
    image at 1024 px in one decode do not fit a GPU, and max_batch could not help."""
    reward = pixel_reward(comfy, handle, pixel_vae)
    latent = {"samples": torch.zeros(2, 4, 32, 32)}
    pixel_vae.rows.clear()
    whole = search_sampler(comfy, reward, "euler_ancestral", particles=3)
    a = run(comfy, model, whole, latent, batch=2)[0]
    assert max(pixel_vae.rows) == 6          # 3 particles x 2 images fit this machine's free memory at once
    pixel_vae.rows.clear()
    chunked = search_sampler(comfy, reward, "euler_ancestral", particles=3, max_batch=2)
    b = run(comfy, model, chunked, latent, batch=2)[0]
    assert pixel_vae.rows and max(pixel_vae.rows) == 2, pixel_vae.rows
    assert torch.allclose(a["samples"], b["samples"], atol=1e-5)
    rewards = [torch.tensor(s.last_summary["history"]["reward"]) for s in (chunked, whole)]
    assert torch.allclose(*rewards, atol=1e-5)


def test_a_pixel_reward_decodes_what_free_memory_holds(comfy, handle, model, pixel_vae, monkeypatch):
    import comfy.model_management as mm
    reward = pixel_reward(comfy, handle, pixel_vae)
    one = pixel_vae.memory_used_decode([1, 4, 32, 32], pixel_vae.vae_dtype)
    free = int(2.5 * one)                                                           # two images' decodes fit
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free)
    pixel_vae.rows.clear()
    run(comfy, model, search_sampler(comfy, reward, "euler_ancestral", particles=3), {"samples": torch.zeros(1, 4, 32, 32)})
    assert pixel_vae.rows and max(pixel_vae.rows) == 2, pixel_vae.rows


@pytest.mark.parametrize("strategy", ["best_of_n", "fk_steering"])
def test_a_partial_schedule_gives_the_winners_x0_as_denoised_output(comfy, handle, model, strategy):
    """SplitSigmas' high part ends above sigma 0: SamplerCustom's denoised_output (and the last preview)
    is the x0 predicted at the last step, as the plain sampler gives it; it was the noisy sample."""
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    plain_out, plain_x0 = run(comfy, model, comfy.run_node("KSamplerSelect", sampler_name="euler")[0], latent, steps=6,
                              split=3)
    sampler = search_sampler(comfy, reward_of(comfy, handle), "euler", particles=1, strategy=strategy, start=1)
    out, x0 = run(comfy, model, sampler, latent, steps=6, split=3)
    assert torch.allclose(out["samples"], plain_out["samples"], atol=1e-5)
    assert not torch.allclose(plain_x0["samples"], plain_out["samples"], atol=1e-2)   # the x0 is not the noisy sample
    assert torch.allclose(x0["samples"], plain_x0["samples"], atol=1e-5)


def test_a_full_schedule_still_gives_the_returned_sample_as_denoised_output(comfy, handle, model):
    sampler = search_sampler(comfy, reward_of(comfy, handle), "euler_ancestral", particles=3)
    out, x0 = run(comfy, model, sampler, {"samples": torch.zeros(1, 4, 32, 32)})
    assert torch.allclose(x0["samples"], out["samples"], atol=1e-6)


def test_prune_with_empty_prune_steps_names_the_input(comfy, handle):
    with pytest.raises(ValueError, match="^prune_steps is empty; expected the steps after which to prune, e.g. '2, 4'"):
        search_sampler(comfy, reward_of(comfy, handle), strategy="prune", prune_steps=" , ")
