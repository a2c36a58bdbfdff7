"""Safety guidance step on random Latent-CLIP weights and random raw latents."""
import pytest
import torch

from latentclip import InputError, LatentCLIP
from latentclip.guidance import safety_guidance, sigma_weight
from latentclip.scoring import cosine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LatentCLIP("Latent-ViT-Tiny-test").eval()


@pytest.fixture(scope="module")
def texts(model):
    with torch.inference_mode():                       # as a ComfyUI node would encode them
        return {k: model.encode_text_cached(v) for k, v in {
            "concept": ["nudity"], "concepts": ["nudity", "violence"], "anchor": ["a quiet landscape"],
            "alt": ["an image of no nudity"]}.items()}


def x0s(b=4, seed=11, side=64):
    return torch.randn(b, 4, side, side, generator=torch.Generator().manual_seed(seed))


def test_step_lowers_concept_similarity_within_bound(model, texts):
    x0 = x0s()
    before = x0.clone()
    new, st = safety_guidance(x0, model, texts["concept"], sigma=10.0, scale=0.05)
    assert torch.equal(x0, before)                                       # input untouched
    cos_before, cos_after = cosine(model, x0, "nudity"), cosine(model, new, "nudity")
    assert (cos_after < cos_before).all()
    assert st.concept_cos_after == pytest.approx(cos_after.tolist(), abs=1e-5)
    rel = (new - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)
    w = 100 / 101
    assert torch.allclose(rel, torch.full_like(rel, 0.05 * w), rtol=1e-3)
    assert all(st.fired) and st.relative_move == pytest.approx(rel.tolist(), rel=1e-3)


def test_large_scale_is_bounded(model, texts):
    x0 = x0s()
    for scale, max_move in ((1e6, 0.2), (50.0, 0.05)):
        new, st = safety_guidance(x0, model, texts["concepts"], sigma=14.6, scale=scale, max_move=max_move)
        rel = (new - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)
        assert (rel <= max_move * (1 + 1e-4)).all() and torch.isfinite(new).all()


def test_anchors_raise_anchor_similarity(model, texts):
    x0 = x0s()
    new, st = safety_guidance(x0, model, texts["concept"], sigma=5.0, scale=0.05, anchor_embeds=texts["anchor"])
    a_before, a_after = cosine(model, x0, "a quiet landscape"), cosine(model, new, "a quiet landscape")
    assert (a_after > a_before).all()
    assert (cosine(model, new, "nudity") < cosine(model, x0, "nudity")).all()
    assert st.anchor_cos_after == pytest.approx(a_after.tolist(), abs=1e-5)
    assert st.prob_before is not None and len(st.prob_before) == 4          # anchors act as alternatives


def test_scale_zero_is_identical(model, texts):
    x0 = x0s()
    new, st = safety_guidance(x0, model, texts["concept"], sigma=10.0, scale=0.0)
    assert new is x0 and torch.equal(new, x0.clone())
    assert not any(st.fired) and st.move_norm == [0.0] * 4


def test_schedule_fades_with_sigma(model, texts):
    assert sigma_weight(torch.tensor([0.0, 1.0, 14.6])).tolist() == pytest.approx([0.0, 0.5, 14.6 ** 2 / (14.6 ** 2 + 1)])
    x0 = x0s()
    sig = torch.tensor([10.0, 1.0, 0.1, 0.0])                             # one sigma per item
    new, st = safety_guidance(x0, model, texts["concept"], sigma=sig, scale=0.1)
    rel = torch.tensor(st.relative_move)
    assert rel[0] > rel[1] > rel[2] > 0 and st.fired == [True, True, True, False]
    assert torch.equal(new[3], x0[3])
    assert rel[1].item() == pytest.approx(0.05, rel=1e-3)


def test_threshold_guides_only_likely_items(model, texts):
    x0 = x0s(b=6)
    _, probe = safety_guidance(x0, model, texts["concept"], sigma=10.0, scale=0.0,
                               alternative_embeds=texts["alt"])
    probs = sorted(probe.prob_before)
    threshold = (probs[2] + probs[3]) / 2
    new, st = safety_guidance(x0, model, texts["concept"], sigma=10.0, scale=0.05,
                              alternative_embeds=texts["alt"], threshold=threshold)
    expected = [p > threshold for p in probe.prob_before]
    assert st.fired == expected and sum(expected) == 3
    for i, fired in enumerate(expected):
        assert torch.equal(new[i], x0[i]) != fired
    assert all(a < b for a, b, f in zip(st.prob_after, st.prob_before, st.fired) if f)


def test_inference_mode_inputs(model, texts):
    with torch.inference_mode():
        x0 = x0s()
        new, st = safety_guidance(x0, model, texts["concept"], sigma=torch.tensor([8.0] * 4), scale=0.05,
                                  anchor_embeds=texts["anchor"])
        assert (torch.tensor(st.concept_cos_after) < torch.tensor(st.concept_cos_before)).all()
        assert torch.equal(x0, x0s()) and new.shape == x0.shape and new.dtype == x0.dtype
        same, st0 = safety_guidance(x0, model, texts["concept"], sigma=8.0, scale=0.0, anchor_embeds=texts["anchor"])
        assert same is x0 and st0.prob_before == pytest.approx(st.prob_before)


def test_half_precision_latents_keep_dtype(model, texts):
    x0 = x0s().half()
    new, st = safety_guidance(x0, model, texts["concept"], sigma=10.0, scale=0.05)
    assert new.dtype == torch.float16 and all(st.fired)


def test_bad_inputs(model, texts):
    x0 = x0s(b=2)
    c = texts["concept"]
    with pytest.raises(InputError, match="threshold > 0 needs"):
        safety_guidance(x0, model, c, sigma=1.0, scale=0.1, threshold=0.5)
    with pytest.raises(InputError, match="threshold"):
        safety_guidance(x0, model, c, sigma=1.0, scale=0.1, threshold=1.5, anchor_embeds=texts["anchor"])
    with pytest.raises(InputError, match="concept_embeds"):
        safety_guidance(x0, model, torch.randn(2, 7), sigma=1.0, scale=0.1)
    with pytest.raises(InputError, match="anchor_embeds"):
        safety_guidance(x0, model, c, sigma=1.0, scale=0.1, anchor_embeds=torch.randn(3))
    with pytest.raises(InputError, match="scale"):
        safety_guidance(x0, model, c, sigma=1.0, scale=-1.0)
    with pytest.raises(InputError, match="sigma"):
        safety_guidance(x0, model, c, sigma=float("nan"), scale=0.1)
    with pytest.raises(InputError, match="sigma"):
        safety_guidance(x0, model, c, sigma=torch.ones(3), scale=0.1)
    with pytest.raises(InputError, match="x0"):
        safety_guidance(torch.randn(2, 16, 64, 64), model, c, sigma=1.0, scale=0.1)
    with torch.inference_mode():
        frozen = LatentCLIP("Latent-ViT-Tiny-test")
    with pytest.raises(InputError, match="inference_mode"):
        safety_guidance(x0, frozen, c, sigma=1.0, scale=0.1)
