"""The mini-world as a ComfyUI model family (nodes/miniworld.py), run through ComfyUI's own node code in process:
stock KSampler on the mini MODEL is the generator's own sampler, the VAE is the mini VAE, the CLIP speaks the
grammar, and the pack's loaders list and accept the shipped mini files."""
import pytest
import torch

from latentclip.errors import InputError
from latentclip.miniworld import generator as G
from latentclip.miniworld.vae import load_vae

from conftest import REPO, tiny_sdxl

MINI = REPO / "weights" / "mini"


def out(result, i=0):
    return result.result[i] if hasattr(result, "result") else result[i]


@pytest.fixture(scope="module")
def world(comfy):
    r = comfy.run_node("LatentCLIPMiniWorldLoader", world="mini")
    return out(r, 0), out(r, 1), out(r, 2)


def encode(comfy, clip, text):
    return out(comfy.run_node("CLIPTextEncode", clip=clip, text=text))


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ksampler_on_the_mini_model_is_the_generators_own_sampler(comfy, world, cfg):
    """euler + simple with 4 steps are the generator's Euler steps at t = 1, .75, .5, .25 (and its CFG)."""
    import comfy.sample as comfy_sample
    model, clip, _ = world
    latent = {"samples": torch.zeros(3, 4, 8, 8)}
    result = out(comfy.run_node("KSampler", model=model, seed=11, steps=4, cfg=cfg, sampler_name="euler",
                                scheduler="simple", positive=encode(comfy, clip, "two green squares"),
                                negative=encode(comfy, clip, ""), latent_image=latent, denoise=1.0))
    generator = G.load_generator(MINI / "generator.safetensors")
    with torch.no_grad():
        expected = generator.sample(comfy_sample.prepare_noise(latent["samples"], 11), "two green squares", 4, cfg)
    assert torch.allclose(result["samples"], expected, atol=1e-4)


def test_vae_decode_and_encode_are_the_mini_vae(comfy, world):
    _, _, vae = world
    mini = load_vae(MINI / "mini-vae.safetensors")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = out(comfy.run_node("VAEDecode", vae=vae, samples={"samples": latents}))
    with torch.no_grad():
        expected = mini.decode(latents)
    assert images.shape == (2, 64, 64, 3)
    assert torch.allclose(images, expected.permute(0, 2, 3, 1), atol=1e-5)
    encoded = out(comfy.run_node("VAEEncode", vae=vae, pixels=images))["samples"]
    with torch.no_grad():
        assert torch.allclose(encoded, mini.encode(images.permute(0, 3, 1, 2)), atol=1e-4)


def test_a_word_outside_the_grammar_is_refused_in_one_sentence(comfy, world):
    with pytest.raises(InputError, match="'dog', which is not a word of the mini-world grammar"):
        encode(comfy, world[1], "a red dog")


def test_the_loaders_list_the_shipped_mini_clips_and_the_vae_families_match(comfy, world):
    import sys
    import folder_paths
    loader = sys.modules[comfy.node("LatentCLIPMiniWorldLoader").__module__]
    bridge = sys.modules[loader.__name__.rsplit(".", 1)[0] + ".comfy_bridge"]   # as ComfyUI's loader imported it
    check_vae_family, model_vae_family = bridge.check_vae_family, bridge.model_vae_family
    assert "mini/mini-latent-clip.safetensors" in folder_paths.get_filename_list("latent_clip")
    assert "mini/mini-pixel-clip.safetensors" in folder_paths.get_filename_list("open_clip")
    handle = out(comfy.run_node("LatentCLIPLoader", ckpt_name="mini/mini-latent-clip.safetensors", device="default",
                                dtype="auto"))
    assert model_vae_family(world[0]) == "mini"
    check_vae_family(handle, world[0])     # accepted: ReNO, guidance and search take the pair
    with pytest.raises(InputError, match="MINI-VAE latents but the model makes SDXL latents"):
        check_vae_family(handle, tiny_sdxl())


def test_the_judge_node_counts_what_the_images_show(comfy):
    from latentclip.miniworld import scenes
    batch = scenes.render_prompts(["a red circle", "two blue squares"], seed=0)
    images = torch.from_numpy(batch.images).float() / 255
    r = comfy.run_node("LatentCLIPMiniWorldJudge", images=images, prompt="a red circle")
    assert out(r, 0) == 1 and out(r, 1).startswith("judge: 1/2 images show 'a red circle'")
