"""Review 1205d, Python API scoring: cached prompt features must follow the model's text weights.

``LatentCLIP.encode_text_cached`` keeps each prompt's features per model and forgot them only on a
device/dtype move; weights changed in place (``model.load_state_dict``, an optimiser step of a fine-tuning
loop that evaluates with ``latentclip.zero_shot``) kept the old prompts' features, so scores were those of
the new image tower against the old text tower (tiny model: 4.09 instead of 0.78).
"""
import math

import pytest
import torch

import latentclip
from latentclip import LatentCLIP

torch.set_num_threads(1)


def tiny(seed):
    torch.manual_seed(seed)
    model = LatentCLIP("Latent-ViT-Tiny-test").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.clip.logit_scale.fill_(math.log(100.0))
    return model


def latents(model, b=3, seed=1):
    s = model.latent_size
    return torch.randn(b, 4, s, s, generator=torch.Generator().manual_seed(seed))


def all_scores(model, x):
    return {"clip_score": latentclip.clip_score(model, x, "a cat"),
            "cosine": latentclip.cosine(model, x, ["a cat", "a dog", "a cat"]),
            "zero_shot": latentclip.zero_shot(model, x, ["cat", "dog"], "a photo of {}"),
            "rank": latentclip.rank(model, x, "a cat")[1],
            "concepts": latentclip.concept_probabilities(model, x, ["cat"])}


def assert_same(got, want):
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-5), (key, got[key], want[key])


def test_scores_follow_load_state_dict():
    model, other = tiny(0), tiny(5)
    x = latents(model)
    all_scores(model, x)                    # fills the prompt cache with the first weights
    model.load_state_dict(other.state_dict())
    assert_same(all_scores(model, x), all_scores(tiny(5), x))


def test_scores_follow_an_in_place_update_of_the_text_tower():
    model = tiny(0)
    x = latents(model)
    all_scores(model, x)
    with torch.no_grad():                   # what optimizer.step() does to a trainable text tower
        model.clip.token_embedding.weight.add_(torch.randn_like(model.clip.token_embedding.weight) * 0.5)
        model.clip.text_projection.add_(torch.randn_like(model.clip.text_projection) * 0.5)
    fresh = tiny(0)
    fresh.load_state_dict(model.state_dict())
    assert_same(all_scores(model, x), all_scores(fresh, x))


def test_unchanged_weights_still_use_the_cache(monkeypatch):
    model = tiny(0)
    x = latents(model)
    first = all_scores(model, x)
    calls = []
    real = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts: calls.append(list(texts)) or real(texts))
    assert_same(all_scores(model, x), first)
    assert calls == []
    with torch.inference_mode():            # ComfyUI's executor; weights moved there are inference tensors
        inference = tiny(0).requires_grad_(False)
        inference.load_state_dict(model.state_dict())
        inference = inference.to(torch.float64).to(torch.float32)   # re-created under inference mode
        assert all(p.is_inference() for p in inference.parameters())
        got = latentclip.clip_score(inference, x, "a cat")
        again = latentclip.clip_score(inference, x, "a cat")
    assert torch.allclose(got, first["clip_score"], atol=1e-5) and torch.equal(got, again)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_models_follow_load_state_dict(half):
    model, other = tiny(0).to(half), tiny(5).to(half)
    x = latents(model)
    latentclip.clip_score(model, x, "a cat")
    model.load_state_dict(other.state_dict())
    assert torch.allclose(latentclip.clip_score(model, x, "a cat"), latentclip.clip_score(other, x, "a cat"), atol=1e-3)
