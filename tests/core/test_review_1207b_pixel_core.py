"""Review 1207b, pixel CLIP files: a file with NaN or infinite weights (a corrupt conversion, an fp16 export that
overflowed) is refused when it is read, naming the tensor, as the Latent-CLIP reader does. It used to load, and
every reward it gave was NaN: ReNO then "succeeded" with ``loss nan -> inf`` and returned the unoptimised image."""
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentclip.errors import CheckpointError
from latentclip.checkpoints import read_safetensors_header
from latentclip.pixel_clip import load_pixel_clip

MINI_PIXEL = Path(__file__).resolve().parents[2] / "weights" / "mini" / "mini-pixel-clip.safetensors"


@pytest.fixture(scope="module")
def vit_s_32():
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in open_clip.create_model("ViT-S-32", pretrained=None).state_dict().items()}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_an_open_clip_file_with_non_finite_weights_is_refused_naming_the_tensor(vit_s_32, tmp_path, value, suffix):
    sd = dict(vit_s_32)
    sd["visual.proj"] = sd["visual.proj"].clone()
    sd["visual.proj"][3, 5] = value
    path = tmp_path / f"open_clip_model{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_pixel_clip(path)
    assert str(e.value) == (f"'{path.name}' stores NaN or infinite values in 'visual.proj'; expected finite weights "
                            "(a damaged download or a half-precision export that overflowed)")


def test_an_open_clip_file_in_half_precision_with_finite_weights_still_loads(vit_s_32, tmp_path):
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in vit_s_32.items()}, str(path))
    model, _, name = load_pixel_clip(path)
    assert name == "ViT-S-32" and torch.isfinite(model.visual.proj).all()


def test_the_mini_pixel_clip_with_a_nan_weight_is_refused(tmp_path):
    sd = load_file(str(MINI_PIXEL))
    key = next(k for k, v in sorted(sd.items()) if v.is_floating_point())
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    path = tmp_path / "mini-pixel-clip.safetensors"
    save_file(sd, str(path), metadata=read_safetensors_header(MINI_PIXEL)["__metadata__"])
    with pytest.raises(CheckpointError, match=r"^'mini-pixel-clip\.safetensors' stores NaN or infinite values in "):
        load_pixel_clip(path)
    model, _, name = load_pixel_clip(MINI_PIXEL)          # the shipped file is unchanged and loads
    assert name == "mini-world pixel CLIP"
