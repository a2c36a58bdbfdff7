"""VAE families as data: the family files, ComfyUI's latent formats, latent checks and family configs."""
import json

import pytest
import torch

import latentclip
from latentclip import configs, families
from latentclip.errors import CheckpointError, InputError

COMFY_FORMATS = {"SD15": "sd1", "SDXL": "sdxl", "SDXL_Playground_2_5": "sdxl", "SD3": "sd3", "Flux": "flux",
                 "Wan21": "wan21", "Wan22": "wan22", "HunyuanImage21": "hunyuan_image21",
                 "Mini": "mini", "Mini16": "mini16"}


def test_every_family_file_loads_with_its_shape():
    shapes = {n: (f.channels, f.factor, f.dims) for n in families.family_names() for f in [families.get_family(n)]}
    assert shapes == {"sd1": (4, 8, 2), "sdxl": (4, 8, 2), "sd3": (16, 8, 2), "flux": (16, 8, 2), "wan21": (16, 8, 3),
                      "wan22": (48, 16, 3), "hunyuan_image21": (64, 32, 2), "mini": (4, 8, 2), "mini16": (16, 8, 2)}
    assert configs.VAE_FAMILY_CHANNELS == {n: c for n, (c, _, _) in shapes.items()}
    with pytest.raises(Exception):
        families.get_family("flux").channels = 4   # frozen


@pytest.mark.parametrize("fmt,family", sorted(COMFY_FORMATS.items()))
def test_comfy_latent_formats_map_to_families(fmt, family):
    assert families.family_of_latent_format(fmt) == family


def test_unknown_format_and_family():
    assert families.family_of_latent_format("LTXV") is None
    with pytest.raises(InputError, match="VAE family 'mars' is unknown; expected one of"):
        families.get_family("mars")


def test_comfy_formats_agree_with_comfyui_when_present():
    """Channels and dimensions of each mapped ComfyUI latent format match its family (needs COMFYUI_PATH)."""
    import importlib.util
    import os
    import sys
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH is not set")
    spec = importlib.util.spec_from_file_location("_comfy_latent_formats", os.path.join(root, "comfy", "latent_formats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in families.family_names():
        fam = families.get_family(name)
        for fmt in fam.latent_formats:
            if hasattr(module, fmt):
                cls = getattr(module, fmt)
                assert (cls.latent_channels, cls.latent_dimensions) == (fam.channels, fam.dims), fmt
    sys.modules.pop("_comfy_latent_formats", None)


def test_a_family_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "myvae.json").write_text(json.dumps({"name": "myvae", "channels": 8, "factor": 8, "dims": 2,
                                                     "latent_formats": ["MyVAE"], "description": "a test VAE"}))
    monkeypatch.setattr(families, "FAMILY_DIR", tmp_path)
    families._families.cache_clear()
    try:
        assert families.family_names() == ["myvae"] and families.family_of_latent_format("MyVAE") == "myvae"
        (tmp_path / "bad.json").write_text(json.dumps({"name": "bad", "channels": 0, "factor": 8, "dims": 2,
                                                       "latent_formats": [], "description": ""}))
        families._families.cache_clear()
        with pytest.raises(families.FamilyError, match="'bad.json': channels must be in"):
            families.family_names()
    finally:
        families._families.cache_clear()


CHECKS = [  # family, shape, expected result shape or error words
    ("sdxl", (2, 4, 8, 8), (2, 4, 8, 8)),
    ("flux", (2, 16, 8, 8), (2, 16, 8, 8)),
    ("wan21", (2, 16, 1, 8, 8), (2, 16, 8, 8)),
    ("wan21", (2, 16, 8, 8), (2, 16, 8, 8)),
    ("sdxl", (1, 16, 8, 8), "x has 16 channels but this Latent-CLIP reads 4-channel SDXL-VAE latents "
                            "[batch, 4, height, width]; 16-channel latents come from the FLUX, MINI16, SD3 or WAN21 VAE"),
    ("flux", (1, 4, 8, 8), "come from the MINI, SD1 or SDXL VAE"),
    ("flux", (1, 16, 1, 8, 8), "x is a 5-dimensional [1, 16, 1, 8, 8] latent but this Latent-CLIP reads 16-channel "
                               "FLUX-VAE latents [batch, 16, height, width]; 16-channel 5-dimensional latents come from the WAN21 VAE"),
    ("wan21", (1, 16, 5, 8, 8), "x has 5 latent frames but a Latent-CLIP scores single images"),
    ("wan21", (1, 48, 1, 8, 8), "48-channel 5-dimensional latents come from the WAN22 VAE"),
    ("sd3", (1, 7, 8, 8), "7-channel latents come from another VAE"),
    ("sd3", (16, 8, 8), "x must have 4 dimensions [batch, channels, height, width], got shape [16, 8, 8]"),
    ("wan21", (0, 16, 1, 8, 8), "x is an empty batch"),
]


@pytest.mark.parametrize("family,shape,expected", CHECKS)
def test_check_latents_for_family(family, shape, expected):
    x = torch.randn(*shape)
    if isinstance(expected, tuple):
        out = families.check_latents_for_family(x, family, "x")
        assert tuple(out.shape) == expected and out.data_ptr() == x.data_ptr()   # a view, never a copy
    else:
        with pytest.raises(InputError) as err:
            families.check_latents_for_family(x, family, "x")
        assert expected in str(err.value) and str(err.value).count(". ") == 0


def tiny(family, seed=0):
    torch.manual_seed(seed)
    return latentclip.LatentCLIP(configs.for_family("Latent-ViT-Tiny-test", family)).eval()


def test_a_single_frame_wan_latent_scores_as_its_image_and_keeps_gradients():
    model = tiny("wan21")
    x = torch.randn(2, 16, 1, 64, 64, requires_grad=True)
    feats = model.encode_latents(x)
    assert torch.allclose(feats, model.encode_latents(x.detach()[:, :, 0]), atol=1e-6)
    feats.sum().backward()
    assert x.grad.shape == x.shape and x.grad.abs().sum() > 0
    assert latentclip.clip_score(model, x.detach(), "a cat").shape == (2,)


def test_family_is_saved_and_loaded(tmp_path):
    model = tiny("flux", seed=1)
    path = latentclip.save(model, tmp_path / "flux.safetensors")
    loaded = latentclip.load(path)
    assert loaded.vae_family == "flux" and loaded.latent_channels == 16
    with pytest.raises(InputError, match="reads 16-channel FLUX-VAE latents"):
        loaded.check_latents(torch.randn(1, 4, 64, 64), "samples")


def test_config_and_family_must_agree():
    cfg = configs.get_config("Latent-ViT-Tiny-test")
    cfg["vae_family"] = "sd3"
    with pytest.raises(configs.ConfigError, match="vision_cfg.latent_channels is 4 but vae_family 'sd3' has latent_channels 16"):
        configs.validate_config(cfg)
    cfg = configs.get_config("Latent-ViT-Tiny-test")
    cfg["vision_cfg"]["patch_size"] = 6
    with pytest.raises(configs.ConfigError, match="does not make a whole grid of 6-wide patches"):
        configs.for_family(cfg, "flux")
    assert configs.for_family("Latent-ViT-B-8-512", "wan21") == configs.validate_config(configs.get_config("Latent-ViT-B-8-512-wan21"))


def test_a_16_channel_file_without_family_is_refused(tmp_path):
    import safetensors.torch
    sd = {k: v.contiguous() for k, v in tiny("sd3").open_clip_state_dict().items() if k != "attn_mask"}
    safetensors.torch.save_file(sd, str(tmp_path / "nofamily.safetensors"))
    with pytest.raises(CheckpointError, match="records no vae_family and its image tower reads 16-channel latents"):
        latentclip.load(tmp_path / "nofamily.safetensors")
    safetensors.torch.save_file(sd, str(tmp_path / "flux.safetensors"), metadata={"vae_family": "flux"})
    assert latentclip.load(tmp_path / "flux.safetensors").vae_family == "flux"


def test_metadata_family_and_config_family_must_agree(tmp_path):
    import safetensors.torch
    model = tiny("sd3")
    sd = {k: v.contiguous() for k, v in model.open_clip_state_dict().items() if k != "attn_mask"}
    meta = {"format": "latentclip", "config": json.dumps(model.config), "vae_family": "flux"}
    safetensors.torch.save_file(sd, str(tmp_path / "x.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="vae_family 'flux' disagrees with its config's 'sd3'"):
        latentclip.load(tmp_path / "x.safetensors")


@pytest.mark.parametrize("name", [n for n in configs.list_configs()])
def test_every_shipped_config_agrees_with_its_family(name):
    cfg = configs.validate_config(configs.get_config(name))
    fam = families.get_family(cfg.get("vae_family", "sdxl"))
    assert cfg["vision_cfg"].get("latent_channels", 4) == fam.channels
    assert configs.grid_size(cfg) * cfg["vision_cfg"]["patch_size"] * fam.factor == cfg["vision_cfg"]["image_size"]


def test_the_metadata_family_counts_when_the_config_has_none(tmp_path):
    """Bug fix: a file whose metadata config lacked vae_family loaded as SDXL even with vae_family "flux" beside it."""
    import safetensors.torch
    model = tiny("flux")
    cfg = dict(model.config)
    cfg.pop("vae_family")
    sd = {k: v.contiguous() for k, v in model.open_clip_state_dict().items() if k != "attn_mask"}
    safetensors.torch.save_file(sd, str(tmp_path / "x.safetensors"),
                                metadata={"format": "latentclip", "config": json.dumps(cfg), "vae_family": "flux"})
    assert latentclip.load(tmp_path / "x.safetensors").vae_family == "flux"
