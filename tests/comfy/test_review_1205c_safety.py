"""Review 1205c: Safety Guidance's number inputs.

ComfyUI validates a FLOAT widget only with ``val < min`` and ``val > max``, which a NaN passes (an API
prompt may carry one: Python's json reads ``NaN``). Before: start_percent / end_percent NaN stopped the node
with ``IndexError: index -9223372036854775808 is out of bounds`` from ComfyUI's percent_to_sigma, and a NaN
scale or threshold patched the MODEL and then failed inside the KSampler at its first step, naming no input
of this node. Now each is one sentence from the guidance node naming the input and what is expected.
"""
import math

import pytest

from conftest import tiny_sdxl
from latentclip.errors import InputError


@pytest.fixture(scope="module")
def handle(comfy, tiny_ckpt):
    return comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp32").result[0]


@pytest.fixture(scope="module")
def unet(comfy):
    return tiny_sdxl()


def guide(comfy, unet, handle, **numbers):
    args = {"scale": 0.05, "start_percent": 0.0, "end_percent": 1.0, "threshold": 0.0, **numbers}
    return comfy.run_node("LatentCLIPSafetyGuidance", model=unet, latent_clip=handle, concepts="a dog", anchors="",
                          **args).result[0]


@pytest.mark.parametrize("name", ["scale", "start_percent", "end_percent", "threshold"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_is_one_sentence_naming_the_input(comfy, unet, handle, name, value):
    with pytest.raises(InputError, match=rf"^{name} is {value!r}; expected a finite number from 0 to 1$"):
        guide(comfy, unet, handle, **{name: value})


def test_finite_numbers_still_patch(comfy, unet, handle):
    patched = guide(comfy, unet, handle, scale=0.05, start_percent=0.25, end_percent=0.75, threshold=0.5)
    assert patched is not unet and len(patched.model_options["sampler_post_cfg_function"]) == 1
    assert guide(comfy, unet, handle, scale=0.0) is unet     # scale 0 still returns the input MODEL
