"""Review 1207b of nodes/miniworld.py and latentclip/pixel_clip.py, through ComfyUI's loader and executor:

* a pixel CLIP file with a NaN weight is refused in one sentence naming clip_name and the tensor; the mini-world
  ReNO workflow with it used to "succeed" with ``loss initial -> best: nan -> inf`` and the unoptimised image;
* the Mini-world Judge refuses images holding NaN or infinite values (what a NaN latent decodes to) in one
  sentence naming the images; it used to judge them as black images ("no (color, shape, object, count)").
"""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO

MINI_PIXEL = REPO / "weights" / "mini" / "mini-pixel-clip.safetensors"
PROMPT = "a red circle"


def _errors(res):
    return [d for e, d in res["messages"] if e == "execution_error"]


# -- pixel CLIP with NaN weights ------------------------------------------------------------------
def _reno_graph(clip_name: str) -> dict:
    return {
        "1": {"class_type": "LatentCLIPMiniWorldLoader", "inputs": {"world": "mini"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "PixelCLIPReward", "inputs": {"clip_name": clip_name, "model_name": "", "vae": ["1", 2],
                                                          "text": PROMPT, "weight": 0.01}},
        "10": {"class_type": "LatentCLIPReNO", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "reward": ["9", 0], "seed": 0, "iterations": 2, "learning_rate": 5.0, "optimizer": "sgd",
            "grad_clip": 0.1, "regularization": 0.01, "gradient_checkpointing": False, "steps": 4, "cfg": 1.0}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 2]}},
    }


def test_reno_with_a_pixel_clip_file_holding_nan_is_refused_naming_clip_name(comfy):
    from latentclip.checkpoints import read_safetensors_header
    sd = load_file(str(MINI_PIXEL))
    sd["positional_embedding"] = sd["positional_embedding"].clone()
    sd["positional_embedding"][0, 0] = float("nan")
    name = "review-1207b-nan-pixel.safetensors"
    save_file(sd, str(comfy.models / "open_clip" / name), metadata=read_safetensors_header(MINI_PIXEL)["__metadata__"])
    res = comfy.run_prompt(_reno_graph(name))
    assert res["valid"], res
    errors = _errors(res)
    assert not res["success"] and errors, res["outputs"]
    assert errors[0]["exception_message"].strip() == (
        f"clip_name '{name}' stores NaN or infinite values in 'positional_embedding'; expected finite weights "
        "(a damaged download or a half-precision export that overflowed)"), errors[0]


def test_reno_with_the_shipped_mini_pixel_clip_still_runs(comfy):
    name = "review-1207b-pixel.safetensors"
    shutil.copy(MINI_PIXEL, comfy.models / "open_clip" / name)
    res = comfy.run_prompt(_reno_graph(name))
    assert res["valid"] and res["success"], _errors(res)
    assert "nan" not in res["outputs"]["10"]["text"][0]


# -- the Judge and NaN images ---------------------------------------------------------------------
def _circle(dtype=torch.float32):
    img = torch.full((64, 64, 3), 0.9)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    img[(yy - 32) ** 2 + (xx - 32) ** 2 <= 12 ** 2] = torch.tensor([215, 40, 40]) / 255.0
    return img.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_judge_refuses_images_holding_nan_in_one_sentence(comfy, dtype, value):
    images = torch.stack([_circle(dtype), _circle(dtype), _circle(dtype)])
    images[1, 5, 7, 0] = value
    before = images.clone()
    with pytest.raises(Exception) as e:
        comfy.run_node("LatentCLIPMiniWorldJudge", images=images, prompt=PROMPT)
    assert type(e.value).__name__ == "InputError"
    assert str(e.value) == ("images holds NaN or infinite values (image 2 of 3); expected finite pixels in [0, 1], "
                            "as VAE Decode makes from finite latents"), str(e.value)
    assert torch.equal(images.isnan(), before.isnan()) and torch.equal(images.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_judge_still_judges_finite_images_of_any_float_dtype(comfy, dtype):
    res = comfy.run_node("LatentCLIPMiniWorldJudge", images=torch.stack([_circle(dtype)] * 2), prompt=PROMPT)
    assert res.result[0] == 2, res.result[1]


# -- latents the mini-world's statistics cannot standardise ----------------------------------------
@pytest.fixture(scope="module")
def mini(comfy):
    model, clip, _ = comfy.run_node("LatentCLIPMiniWorldLoader", world="mini").result
    encode = lambda text: comfy.run_node("CLIPTextEncode", clip=clip, text=text)[0]   # noqa: E731
    return {"model": model, "positive": encode(PROMPT), "negative": encode("")}


@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (2, 3, 8, 8), (1, 16, 1, 8, 8)])
def test_a_latent_of_another_channel_count_is_refused_in_one_sentence(comfy, mini, shape):
    """A 16-channel latent (VAE Encode with a Flux/SD3 VAE) used to end in torch's 'The size of tensor a (16) must
    match the size of tensor b (4)'; a video latent [1, 16, 1, 8, 8] was broadcast against the per-channel
    statistics and reported as "16x4x8x8". (Empty latents are not standardised: the model's own check names them.)"""
    latent = {"samples": torch.randn(shape, generator=torch.Generator().manual_seed(0))}
    before = latent["samples"].clone()
    with pytest.raises(Exception) as e:
        comfy.run_node("KSampler", **mini, seed=0, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple",
                       latent_image=latent, denoise=1.0)
    assert type(e.value).__name__ == "InputError", e.value
    got = "x".join(str(s) for s in shape[1:])
    assert str(e.value) == (f"latent_image is {got} but the mini-world draws 4-channel image latents "
                            "[batch, 4, height, width]: start from a 64x64 Empty Latent Image or encode with Load "
                            "mini-world's VAE"), str(e.value)
    assert torch.equal(latent["samples"], before)

