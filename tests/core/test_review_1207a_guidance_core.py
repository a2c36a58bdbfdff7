"""Review 1207a, latentclip.guidance: an item whose x0 prediction diverged (NaN/inf, as an fp16 UNet that
overflowed gives) is left as it is and not guided; the other items are guided exactly as in a batch without
it. Before, ``safety_guidance`` refused the whole batch with "x0 contains NaN or infinite values", which inside
a sampler stopped every image of the batch with an error naming no input of the user's graph."""
import math

import pytest
import torch

from latentclip import InputError, LatentCLIP
from latentclip.guidance import safety_guidance

from fake_device import FakeDeviceTensor, fake_device, to_device
from test_guidance import model  # noqa: F401  (the module's Latent-CLIP fixture)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def texts(model):  # noqa: F811
    with torch.inference_mode():
        return model.encode_text_cached(["nudity"]), model.encode_text_cached(["a quiet landscape"])


def x0s(b=4, seed=11, side=32):
    return torch.randn(b, 4, side, side, generator=torch.Generator().manual_seed(seed))


def broken(x0, rows=(1, 2)):
    x = x0.clone()
    x[rows[0], 2, 3, 4] = float("nan")
    x[rows[1], 0, 0, 0] = float("inf")
    return x


@pytest.mark.parametrize("threshold, scale", [(0.0, 0.05), (0.3, 0.05), (0.0, 0.0)])
def test_a_diverged_item_is_left_alone_and_the_others_are_guided_as_without_it(model, texts, threshold, scale):
    concept, anchor = texts
    clean = x0s()
    x0 = broken(clean)
    kept = x0.clone()
    args = dict(sigma=torch.tensor([8.0, 8.0, 8.0, 2.0]), scale=scale, anchor_embeds=anchor, threshold=threshold)
    new, st = safety_guidance(x0, model, concept, **args)     # raised InputError "x0 contains NaN ..." before
    ref, ref_st = safety_guidance(clean[[0, 3]], model, concept, **{**args, "sigma": torch.tensor([8.0, 2.0])})
    assert torch.equal(x0.nan_to_num(), kept.nan_to_num()) and torch.equal(x0.isnan(), kept.isnan())   # untouched
    assert torch.equal(new[1:3].nan_to_num(), x0[1:3].nan_to_num()) and torch.equal(new[1:3].isnan(), x0[1:3].isnan())
    assert torch.allclose(new[[0, 3]], ref, atol=1e-6)
    assert st.fired[1:3] == [False, False] and [st.fired[0], st.fired[3]] == ref_st.fired
    assert st.move_norm[1:3] == [0.0, 0.0] and st.relative_move[1:3] == [0.0, 0.0]
    for key in ("concept_cos_before", "concept_cos_after", "anchor_cos_before", "anchor_cos_after",
                "prob_before", "prob_after"):
        values, expected = getattr(st, key), getattr(ref_st, key)
        assert all(math.isnan(v) for v in values[1:3]), key              # not the score of a made-up latent
        assert [values[0], values[3]] == pytest.approx(expected, abs=1e-5), key


def test_a_diverged_item_inside_inference_mode_as_a_sampler_calls_it(model, texts):
    """ComfyUI runs the hook under torch.inference_mode: the finite-item mask made there must not reach autograd
    (torch.where saved it for backward, and autograd refused an inference tensor)."""
    x0 = broken(x0s())
    with torch.inference_mode():
        new, st = safety_guidance(x0, model, texts[0], sigma=8.0, scale=0.05, anchor_embeds=texts[1])
    ref, _ = safety_guidance(x0s()[[0, 3]], model, texts[0], sigma=8.0, scale=0.05, anchor_embeds=texts[1])
    assert st.fired == [True, False, False, True] and torch.allclose(new[[0, 3]], ref, atol=1e-6)


def test_every_item_diverged_returns_them_unguided(model, texts):
    x0 = torch.full((2, 4, 32, 32), float("nan"))
    new, st = safety_guidance(x0, model, texts[0], sigma=8.0, scale=0.05)
    assert new.isnan().all() and st.fired == [False, False] and st.move_norm == [0.0, 0.0]


def test_a_diverged_item_on_the_device(model, texts):
    """The finite-item bookkeeping is made on x0's device; the Latent-CLIP and latents on cuda:0 give the CPU run."""
    cpu_new, cpu_st = safety_guidance(broken(x0s()), model, *texts[:1], sigma=8.0, scale=0.05, anchor_embeds=texts[1],
                                      threshold=0.3)
    lc = to_device(LatentCLIP("Latent-ViT-Tiny-test").eval())
    lc.load_state_dict(model.state_dict())
    with fake_device():
        new, st = safety_guidance(broken(x0s()).to("cuda"), lc, texts[0], sigma=torch.tensor(8.0).to("cuda"),
                                  scale=0.05, anchor_embeds=texts[1], threshold=0.3)
        assert isinstance(new, FakeDeviceTensor)
        new = new.cpu()
    assert torch.allclose(new.nan_to_num(), cpu_new.nan_to_num(), atol=1e-5) and st.fired == cpu_st.fired


def test_what_is_not_a_latent_is_still_one_sentence(model, texts):
    with pytest.raises(InputError, match="x0 must be a torch.Tensor"):
        safety_guidance([1.0], model, texts[0], sigma=1.0, scale=0.1)
    with pytest.raises(InputError, match="x0 is an empty batch"):
        safety_guidance(torch.zeros(0, 4, 32, 32), model, texts[0], sigma=1.0, scale=0.1)
    with pytest.raises(InputError, match="x0 has 16 channels"):
        safety_guidance(torch.full((1, 16, 32, 32), float("nan")), model, texts[0], sigma=1.0, scale=0.1)
