"""Safety guidance patch and report, on ComfyUI's real samplers with a tiny SDXL-architecture model.

Random weights prove the mechanics (the hook runs, moves x0 along the Latent-CLIP gradient, leaves
everything else alone), not that a real concept is avoided.
"""
import copy
import sys

import pytest
import torch

import latentclip
from conftest import tiny_conditioning, tiny_sdxl

STEPS = 6
DOG = "an image of a dog"   # what concept "a dog" is scored as


@pytest.fixture(scope="module")
def unet(comfy):
    return tiny_sdxl()


@pytest.fixture(scope="module")
def handle(comfy, tiny_ckpt):
    return comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp32").result[0]


def sample(model, cfg, seed=0, spy=None):
    """KSampler's path: comfy.sample.sample under inference mode, as the executor runs it."""
    import comfy.sample
    if spy is not None:
        model = model.clone()
        model.set_model_sampler_post_cfg_function(spy)
    latent = torch.zeros(2, 4, 32, 32)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "normal", tiny_conditioning(1, 2),
                                   tiny_conditioning(2, 2), latent, seed=seed, disable_pbar=True)


def guide(comfy, model, handle, concepts="a dog", anchors="", scale=0.1, start=0.0, end=1.0, threshold=0.0):
    return comfy.run_node("LatentCLIPSafetyGuidance", model=model, latent_clip=handle, concepts=concepts,
                          anchors=anchors, scale=scale, start_percent=start, end_percent=end,
                          threshold=threshold).result[0]


def report(comfy, model, samples):
    out = comfy.run_node("LatentCLIPGuidanceReport", model=model, samples={"samples": samples})
    assert out.ui.as_dict()["text"][0] == out.result[0]
    return out.result[0]


def _records(comfy, model):
    """The guidance records on a MODEL, through the pack module ComfyUI's loader imported."""
    return sys.modules[comfy.node("LatentCLIPGuidanceReport").__module__].records_of(model)


def options_snapshot(model):
    return (copy.copy(model.model_options), list(model.model_options.get("sampler_post_cfg_function", [])),
            {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in model.wrappers.items()},
            {k: list(v) for k, v in model.additional_models.items()})


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_guidance_lowers_concept_similarity_and_reports(comfy, unet, handle, cfg):
    before = options_snapshot(unet)
    patched = guide(comfy, unet, handle, scale=0.1)
    assert patched is not unet and options_snapshot(unet) == before
    seen = []

    def spy(args):  # a later post-CFG hook: was the uncond pass skipped at this call?
        seen.append(args["uncond"] is None)
        return args["denoised"]

    base = sample(unet, cfg)
    out = sample(patched, cfg, spy=spy)
    assert seen == [cfg == 1.0] * STEPS        # cfg 1 keeps skipping the uncond pass; cfg > 1 runs it
    model = handle.load()
    cos_base, cos_out = latentclip.cosine(model, base, DOG), latentclip.cosine(model, out, DOG)
    assert (cos_out < cos_base - 0.05).all(), (cos_base, cos_out)
    assert options_snapshot(unet) == before    # sampling the patch changed nothing on the input MODEL

    (record,) = _records(comfy, patched)
    run = record.runs[-1]
    assert run["calls"] == STEPS and run["in_window"] == STEPS and run["sampler_steps"] == STEPS
    text = report(comfy, patched, out)
    assert f"{STEPS} model calls" in text and "latest run" not in text
    assert text.count(f"guided {STEPS}/{STEPS} calls") == 2
    for item in record.summary(run):
        assert item["prob_after"] < item["prob_before"] and item["cos_after"] < item["cos_before"]
        assert 0 < item["max_relative_move"] <= 0.2 + 1e-4



def test_scale_zero_and_never_firing_are_bit_identical(comfy, unet, handle):
    before = options_snapshot(unet)
    base = sample(unet, 2.0)
    assert guide(comfy, unet, handle, scale=0.0) is unet     # no hook at all
    never = guide(comfy, unet, handle, scale=0.5, threshold=1.0)  # probability is never above 1
    out = sample(never, 2.0)
    assert torch.equal(out, base)
    assert options_snapshot(unet) == before
    (record,) = _records(comfy, never)
    assert record.runs[-1]["in_window"] == STEPS
    assert all(not any(s["fired"]) for s in record.runs[-1]["steps"])
    assert "guided 0/6 calls" in report(comfy, never, out)
    assert "no Latent-CLIP safety guidance" in report(comfy, unet, out)


def test_chained_patches_both_fire_and_respect_their_windows(comfy, unet, handle):
    first = guide(comfy, unet, handle, concepts="a dog", scale=0.05)
    first_hooks = list(first.model_options["sampler_post_cfg_function"])
    second = guide(comfy, first, handle, concepts="a cat\na car", anchors="a landscape", scale=0.05, end=0.5)
    assert first.model_options["sampler_post_cfg_function"] == first_hooks and len(first_hooks) == 1
    assert len(second.model_options["sampler_post_cfg_function"]) == 2
    assert len(second.get_additional_models_with_key("latent_clip_safety")) == 1  # one Latent-CLIP, loaded once
    out = sample(second, 1.0, seed=3)
    base = sample(unet, 1.0, seed=3)
    rec_dog, rec_cat = _records(comfy, second)
    assert rec_dog.concepts == ["a dog"] and rec_cat.concepts == ["a cat", "a car"]
    assert all(all(s["fired"]) for s in rec_dog.runs[-1]["steps"]) and rec_dog.runs[-1]["in_window"] == STEPS
    cat_run = rec_cat.runs[-1]
    assert cat_run["calls"] == STEPS and 0 < cat_run["in_window"] < STEPS   # end_percent 0.5 stops it early
    assert all(s["sigma"] >= rec_cat.settings["sigma_end"] for s in cat_run["steps"])
    model = handle.load()
    assert (latentclip.cosine(model, out, DOG) < latentclip.cosine(model, base, DOG)).all()
    text = report(comfy, second, out)
    assert "guidance #%d" % rec_dog.patch_id in text and "anchors a landscape" in text
    assert text.count(f"guided {STEPS}/{STEPS}") == 2 and text.count(f"guided {cat_run['in_window']}/") == 2
    other = report(comfy, second, torch.zeros_like(out))    # not this run's output: says so
    assert "latest run" in other
    out2 = sample(second, 1.0, seed=4)                       # a new run gets a new, bounded record
    assert rec_dog.runs[-1]["run"] == 2 and len(rec_dog.runs[-1]["steps"]) == STEPS
    assert "run 1:" in report(comfy, second, out) and "run 2:" in report(comfy, second, out2)


def test_refuses_other_vae_family_and_bad_inputs(comfy, unet, handle):
    path = comfy.models / "latent_clip" / "mini-family.safetensors"
    if not path.exists():
        latentclip.save(latentclip.LatentCLIP("mini-latent"), path)
    mini = comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device="cpu", dtype="fp32").result[0]
    assert mini.vae_family == "mini"
    with pytest.raises(ValueError, match="reads MINI-VAE latents but the model makes SDXL latents"):
        guide(comfy, unet, mini)
    with pytest.raises(ValueError, match="concepts is empty"):
        guide(comfy, unet, handle, concepts=" \n ")
    with pytest.raises(ValueError, match="start_percent"):
        guide(comfy, unet, handle, start=0.8, end=0.2)
