"""Review 1205d, scoring nodes inside a real ComfyUI.

- Select Best on single-frame 3-D latents (Wan 2.1, Qwen-Image) with a noise_mask of fewer than 5 dimensions:
  ComfyUI reads such a mask's first axis as latent frames, not batch items (``comfy.utils.reshape_mask``), so
  every item of the batch uses one mask; picking rows of it gave a kept latent another mask than it had.
- Safety Filter with a NaN threshold (an API graph or ``--set N.threshold=NaN``: ComfyUI's FLOAT validation
  lets NaN through its min/max checks): nothing was ever flagged.
"""
import json

import pytest
import torch

import latentclip
import tiny_families as TF


def family_handle(comfy, family, seed=0):
    path = comfy.models / "latent_clip" / f"review-1205d-{family}.safetensors"
    if not path.exists():
        latentclip.save(TF.tiny_family_latent_clip(family, seed), path)
    return comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device="cpu", dtype="fp32").result[0]


@pytest.fixture(scope="module")
def wan(comfy):
    return family_handle(comfy, "wan21")


def used_masks(latent):
    """The mask each item gets from a sampler (KSampler, SamplerCustom: ``comfy.utils.reshape_mask``)."""
    from comfy.utils import reshape_mask
    return reshape_mask(latent["noise_mask"], latent["samples"].shape)


@pytest.mark.parametrize("mask_shape", [(4, 1, 8, 8), (4, 8, 8), (2, 1, 8, 8)])
def test_select_best_keeps_the_mask_a_single_frame_3d_latent_had(comfy, wan, mask_shape):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 1, 32, 32)
    rows = mask_shape[0]
    values = torch.tensor([0.05, 0.3, 0.65, 0.9])[:rows]   # every item uses their middle (0.475; 2 rows: 0.175)
    mask = values.view(rows, *[1] * (len(mask_shape) - 1)).expand(mask_shape).contiguous()
    latent = {"samples": x, "noise_mask": mask, "batch_index": [0, 1, 2, 3]}
    before = used_masks(latent)
    out = comfy.run_node("LatentCLIPSelectBest", latent_clip=wan, samples=latent, text="a cat", k=1).result[0]
    assert out["samples"].shape == (1, 16, 1, 32, 32)
    after = used_masks(out)
    for j, src in enumerate(out["batch_index"]):
        assert torch.equal(after[j], before[src]), (j, src)
    assert torch.equal(latent["noise_mask"], mask)


def test_select_best_still_picks_per_item_masks_of_3d_latents(comfy, wan):
    """A 5-D mask [B, 1, T, H, W] is per item for 3-D latents too: each kept item keeps its own."""
    torch.manual_seed(1)
    x = torch.randn(3, 16, 1, 32, 32)
    mask = torch.stack([torch.full((1, 1, 8, 8), v) for v in (0.0, 0.5, 1.0)])
    latent = {"samples": x, "noise_mask": mask}
    before = used_masks(latent)
    out = comfy.run_node("LatentCLIPSelectBest", latent_clip=wan, samples=latent, text="a cat", k=3).result[0]
    after = used_masks(out)
    for j, src in enumerate(out["batch_index"]):
        assert torch.equal(after[j], before[src]), (j, src)


@pytest.fixture(scope="module")
def sdxl_handle(comfy, tiny_ckpt):
    return comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp32").result[0]


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf")])
def test_safety_filter_refuses_a_threshold_that_is_not_a_number(comfy, sdxl_handle, threshold):
    x = torch.randn(2, 4, 64, 64)
    with pytest.raises(ValueError, match=r"^threshold .* expected a number from 0 to 1"):
        comfy.run_node("LatentCLIPSafetyFilter", latent_clip=sdxl_handle, samples={"samples": x}, concepts="cat",
                       threshold=threshold, action="replace with zeros")


def test_safety_filter_nan_threshold_through_the_executor(comfy, tiny_ckpt, sdxl_handle):
    """ComfyUI's validation passes NaN (every comparison with it is false); the node must not flag nothing."""
    import safetensors.torch
    name = "review_1205d.latent"
    safetensors.torch.save_file({"latent_tensor": torch.randn(1, 4, 64, 64), "latent_format_version_0": torch.tensor([])},
                                str(comfy.workdir / "input" / name))
    prompt = {
        "1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": tiny_ckpt, "device": "cpu", "dtype": "fp32"}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": name}},
        "3": {"class_type": "LatentCLIPSafetyFilter", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                                 "concepts": "cat", "threshold": 0.0,
                                                                 "action": "flag only"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    res = comfy.run_prompt(prompt)
    assert res["valid"] and res["success"], res
    assert json.loads(res["outputs"]["4"]["text"][0]) == [True]
    prompt["3"]["inputs"]["threshold"] = float("nan")
    res = comfy.run_prompt(prompt)
    assert res["valid"], res
    errors = [d for e, d in res["messages"] if e == "execution_error"]
    assert not res["success"] and errors and "threshold nan" in errors[0]["exception_message"]
