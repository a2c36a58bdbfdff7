"""The pixel-CLIP reader (what Pixel-CLIP Reward loads) reads the shipped mini-world pixel CLIP, so the pixel
baseline reward runs on the mini-world with no download."""
from pathlib import Path

import torch

from latentclip import PixelCLIPMatch
from latentclip.miniworld.clips import load_pixel_clip as load_mini
from latentclip.pixel_clip import load_pixel_clip

MINI = Path(__file__).resolve().parents[2] / "weights" / "mini"


def test_the_reader_returns_the_mini_pixel_clip_with_its_own_tokenizer():
    model, tokenizer, name = load_pixel_clip(MINI / "mini-pixel-clip.safetensors")
    reference = load_mini(MINI / "mini-pixel-clip.safetensors")
    assert name == "mini-world pixel CLIP" and tuple(model.visual.image_size) == (64, 64)
    tokens = tokenizer(["a red circle"])
    assert tokens.shape == (1, 16)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), reference.encode_text(["a red circle"]), atol=1e-5)
    assert not next(model.parameters()).is_inference()


def test_the_pixel_reward_prefers_the_prompt_the_image_shows():
    """PixelCLIPMatch on the mini VAE's decode: a rendered red circle scores better on 'a red circle'."""
    from latentclip.miniworld import scenes
    from latentclip.miniworld.vae import images_to_tensor, load_vae
    vae = load_vae(MINI / "mini-vae.safetensors")
    model, tokenizer, _ = load_pixel_clip(MINI / "mini-pixel-clip.safetensors")
    batch = scenes.render_prompts(["a red circle"], seed=0)
    with torch.no_grad():
        latents = vae.encode(images_to_tensor(batch.images))
    losses = {}
    for text in ("a red circle", "a blue square"):
        term = PixelCLIPMatch(model, lambda z: vae.decode(z) * 2 - 1, [text], tokenizer=tokenizer)
        with torch.no_grad():
            losses[text] = float(term.loss(latents).mean())
    assert losses["a red circle"] < losses["a blue square"], losses
