"""The mini-world readers take any path: hostile metadata or a damaged file is a CheckpointError, found early."""
import json
import resource
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentclip.errors import CheckpointError
from latentclip.miniworld.clips import load_pixel_clip
from latentclip.miniworld.generator import load_generator
from latentclip.miniworld.vae import load_vae

MINI = Path(__file__).resolve().parents[2] / "weights" / "mini"
READERS = {"mini-vae.safetensors": (load_vae, "channels"), "generator.safetensors": (load_generator, "config"),
           "mini-pixel-clip.safetensors": (load_pixel_clip, "config")}


def rewrite(tmp_path, name, edit_meta):
    src = MINI / name
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    edit_meta(meta)
    out = tmp_path / name
    save_file(load_file(str(src)), str(out), metadata=meta)
    return out


@pytest.mark.parametrize("name", sorted(READERS))
def test_shipped_files_still_load(name):
    reader, _ = READERS[name]
    assert reader(MINI / name) is not None


@pytest.mark.parametrize("name", sorted(READERS))
@pytest.mark.parametrize("value", ["not json {", "123", '"text"', json.dumps({"unknown": 1})])
def test_metadata_that_does_not_describe_the_module_is_refused(tmp_path, name, value, no_network):
    reader, key = READERS[name]
    path = rewrite(tmp_path, name, lambda m: m.__setitem__(key, value))
    with pytest.raises(CheckpointError, match=name):
        reader(path)


@pytest.mark.parametrize("name", sorted(READERS))
@pytest.mark.parametrize("value", ["[]", "null"])
def test_empty_metadata_loads_the_defaults_or_is_refused(tmp_path, name, value):
    """Readers whose modules have defaults may build them from an empty config: then the weights must fit."""
    reader, key = READERS[name]
    path = rewrite(tmp_path, name, lambda m: m.__setitem__(key, value))
    try:
        assert reader(path) is not None
    except CheckpointError as e:
        assert name in str(e)


@pytest.mark.parametrize("name", sorted(READERS))
def test_a_config_far_larger_than_the_file_is_refused_before_it_is_built(tmp_path, name):
    reader, key = READERS[name]

    def grow(meta):
        cfg = json.loads(meta[key])
        if isinstance(cfg, list):                       # the VAE's channel widths
            cfg = [c * 64 for c in cfg]
        else:                                           # every width-like number x64
            def scale(d):
                for k, v in d.items():
                    if isinstance(v, dict):
                        scale(v)
                    elif isinstance(v, int) and not isinstance(v, bool) and "width" in k or k in ("dim", "channels"):
                        d[k] = v * 64
            scale(cfg)
        meta[key] = json.dumps(cfg)

    path = rewrite(tmp_path, name, grow)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=name):
        reader(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 512, f"refusing {name} raised peak memory by {grown_mib:.0f} MiB"


def test_a_truncated_file_is_refused_on_its_header(tmp_path):
    data = (MINI / "mini-vae.safetensors").read_bytes()
    path = tmp_path / "mini-vae.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_vae(path)


def test_a_config_whose_buffers_outgrow_the_file_is_refused(tmp_path):
    """Only parameters were sized: a pixel CLIP with a long context holds exactly the weights its config
    asks for, yet its causal mask (context x context, not stored) was then allocated; at context 40000
    that is 6 GB. Buffers larger than the whole file are now refused like oversized weights."""
    import torch
    from latentclip.miniworld.clips import PIXEL_CFG, PixelCLIP, save_clip
    cfg = json.loads(json.dumps(PIXEL_CFG))
    cfg["vision_cfg"].update(width=8, layers=1, head_width=8)
    cfg["text_cfg"].update(width=8, heads=1, layers=1, context_length=2000)   # a 4M-value mask, 0.4M weights
    torch.manual_seed(0)
    path = save_clip(PixelCLIP(cfg), "pixel", tmp_path / "long.safetensors", dtype="fp32")
    with pytest.raises(CheckpointError, match="long.safetensors.*buffer values"):
        load_pixel_clip(path)
    cfg["text_cfg"]["context_length"] = 16          # the same tiny model with the shipped context still loads
    assert load_pixel_clip(save_clip(PixelCLIP(cfg), "pixel", tmp_path / "short.safetensors")) is not None
