"""Issue 21 item 6 through ComfyUI's nodes: the Safety Filter fails closed on non-finite probabilities,
Score / Select Best / Zero-Shot never pass NaN on, and an fp16 Latent-CLIP (what the loader's `auto`
picks on a GPU) scores latents of large magnitude as fp32 does."""
import json
import math

import pytest
import torch

from latentclip.errors import InputError

HUGE = 3e38   # finite in fp32, but the patch embedding overflows even fp32: probabilities become NaN


@pytest.fixture(scope="module")
def handles(comfy, tiny_ckpt):
    load = lambda dtype: comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype=dtype).result[0]  # noqa: E731
    return {"fp32": load("fp32"), "fp16": load("fp16")}


def _batch():
    x = torch.randn(3, 4, 64, 64)
    x[1] = HUGE
    return x


def _strict_json(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the probabilities JSON"))


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_filter_flags_a_non_finite_probability(comfy, handles, threshold):
    x = _batch()
    latent = {"samples": x}
    before = x.clone()
    out, flags, probs, report = comfy.run_node("LatentCLIPSafetyFilter", latent_clip=handles["fp32"], samples=latent,
                                               concepts="nudity\nviolence", threshold=threshold,
                                               action="flag only").result
    flags, table = json.loads(flags), _strict_json(probs)
    assert flags[1] is True
    assert table[1] == {"nudity": None, "violence": None}
    assert "#1: FLAGGED" in report and "not finite" in report.splitlines()[1]
    assert all(isinstance(v, float) and math.isfinite(v) for row in (table[0], table[2]) for v in row.values())
    assert out is latent and torch.equal(x, before)


def test_replace_replaces_a_non_finite_item(comfy, handles):
    x = _batch()
    before = x.clone()
    out, flags, _, _ = comfy.run_node("LatentCLIPSafetyFilter", latent_clip=handles["fp32"], samples={"samples": x},
                                      concepts="nudity", threshold=1.0, action="replace with zeros").result
    assert json.loads(flags) == [False, True, False]   # threshold 1.0 flags no finite probability
    assert torch.equal(out["samples"][1], torch.zeros(4, 64, 64))
    assert torch.equal(out["samples"][[0, 2]], before[[0, 2]]) and torch.equal(x, before)


@pytest.mark.parametrize("node, inputs", [
    ("LatentCLIPScore", {"text": "a cat"}),
    ("LatentCLIPSelectBest", {"text": "a cat", "k": 1}),
    ("LatentCLIPZeroShot", {"labels": "cat\ndog", "template": "a photo of {}"}),
])
def test_scores_refuse_non_finite_features_with_one_sentence(comfy, handles, node, inputs):
    with pytest.raises(InputError) as e:
        comfy.run_node(node, latent_clip=handles["fp32"], samples={"samples": _batch()}, **inputs)
    assert str(e.value).startswith("samples #1 gave Latent-CLIP features that are not finite")


def test_fp16_filter_matches_fp32_on_large_latents(comfy, handles):
    """The issue's case: an fp16 Latent-CLIP gave NaN on a latent of magnitude ~3e4 and the filter flagged nothing."""
    x = torch.randn(2, 4, 64, 64) * 4e4
    run = lambda dtype: comfy.run_node("LatentCLIPSafetyFilter", latent_clip=handles[dtype], samples={"samples": x},  # noqa: E731
                                       concepts="nudity", threshold=0.5, action="flag only").result
    half, full = run("fp16"), run("fp32")
    p_half, p_full = _strict_json(half[2]), _strict_json(full[2])
    assert all(row["nudity"] is not None for row in p_half)
    assert [r["nudity"] for r in p_half] == pytest.approx([r["nudity"] for r in p_full], abs=0.02)
    scores = comfy.run_node("LatentCLIPScore", latent_clip=handles["fp16"], samples={"samples": x}, text="a cat").result[0]
    assert all(math.isfinite(s) for s in scores)


def test_guidance_anchors_split_at_newline_only(comfy, handles, sdxl):
    """Issue 21 item 8: U+2028 or NEL inside an anchor prompt does not make two anchors."""
    patched = comfy.run_node("LatentCLIPSafetyGuidance", model=sdxl, latent_clip=handles["fp32"], concepts="a dog",
                             anchors="a cat\u2028on a mat\na bird\x85in a tree\r\n", scale=0.1, start_percent=0.0,
                             end_percent=1.0, threshold=0.0).result[0]
    hooks = patched.model_options["sampler_post_cfg_function"]
    (record,) = [fn.latent_clip_record for fn in hooks if hasattr(fn, "latent_clip_record")]
    assert record.anchors == ["a cat\u2028on a mat", "a bird\x85in a tree"]
