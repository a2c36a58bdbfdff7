"""Reward terms: forms, per-item prompts, pixel preprocessing, sums, inference-mode safety."""
import pytest
import torch
import torch.nn.functional as F
import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from latentclip import InputError, LatentCLIP
from latentclip.rewards import LatentAvoid, LatentMatch, PixelCLIPMatch, RewardSum, RewardTerm
from latentclip.scoring import cosine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LatentCLIP("Latent-ViT-Tiny-test").eval()


def tiny_pixel_clip(seed=1):
    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def tiny_decoder(seed=2):
    torch.manual_seed(seed)
    up = torch.nn.ConvTranspose2d(4, 3, kernel_size=2, stride=2)
    return lambda z: torch.tanh(up(z))          # raw latent -> image in [-1, 1]


def latents(b=3, side=32, seed=3):
    return torch.randn(b, 4, side, side, generator=torch.Generator().manual_seed(seed))


def test_match_is_reno_clip_loss(model):
    x = latents()
    term = LatentMatch(model, "a red car")
    loss, metrics = term.evaluate(x)
    s = model.logit_scale.exp().item()
    cos = cosine(model, x, "a red car")
    assert torch.allclose(metrics["cos"], cos, atol=1e-5)
    assert torch.allclose(loss, 100 - s * cos, atol=1e-3)
    assert torch.allclose(term.loss(x), 0.01 * loss)


def test_match_per_item_prompts(model):
    x = latents(b=2)
    prompts = ["a red car", "a blue sky"]
    _, metrics = LatentMatch(model, prompts).evaluate(x)
    assert torch.allclose(metrics["cos"], cosine(model, x, prompts), atol=1e-5)
    with pytest.raises(InputError, match="2 prompts but the batch has 3"):
        LatentMatch(model, prompts).evaluate(latents(b=3))
    with pytest.raises(InputError, match="text"):
        LatentMatch(model, ["ok", "  "])


def test_text_encoded_once(model, monkeypatch):
    term = LatentMatch(model, "a cat")
    calls = []
    monkeypatch.setattr(model, "encode_text", lambda *a: calls.append(a))
    term.evaluate(latents())
    term.evaluate(latents())
    assert calls == []


def test_avoid_forms(model):
    x = latents()
    s = model.logit_scale.exp().item()
    cos1 = cosine(model, x, "fire")
    loss1, _ = LatentAvoid(model, "fire").evaluate(x)
    assert torch.allclose(loss1, s * cos1, atol=1e-4)
    loss2, m2 = LatentAvoid(model, ["fire", "smoke"]).evaluate(x)
    cmax = torch.maximum(cos1, cosine(model, x, "smoke"))
    assert torch.allclose(m2["cos"], cmax, atol=1e-5)
    assert (loss2 >= s * cmax - 1e-4).all() and (loss2 <= s * (cmax + torch.log(torch.tensor(2.0)) / 100) + 1e-4).all()
    margin = float(cos1.max()) + 0.01          # every item below the margin: no loss, no push
    loss3, _ = LatentAvoid(model, "fire", margin=margin).evaluate(x)
    assert torch.equal(loss3, torch.zeros_like(loss3))
    with pytest.raises(InputError, match="margin"):
        LatentAvoid(model, "fire", margin=3.0)


def test_avoid_gradient_step_lowers_similarity(model):
    x = latents().requires_grad_(True)
    term = LatentAvoid(model, "fire")
    loss, m = term.evaluate(x)
    (g,) = torch.autograd.grad(loss.sum(), [x])
    step = 0.05 * x.detach().flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
    _, m_after = term.evaluate(x.detach() - step.view(-1, 1, 1, 1) * g)
    assert (m_after["cos"] < m["cos"]).all()


def test_terms_built_under_inference_mode_backprop(model):
    with torch.inference_mode():
        term = LatentMatch(model, "a cat")
        avoid = LatentAvoid(model, ["fire", "smoke"])
    assert not term.text_features.is_inference() and not avoid.text_features.is_inference()
    x = latents().requires_grad_(True)
    total, _ = RewardSum([term, avoid]).evaluate(x)
    (g,) = torch.autograd.grad(total.sum(), [x])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_inference_weights_refused():
    with torch.inference_mode():
        m = LatentCLIP("Latent-ViT-Tiny-test")
    with pytest.raises(InputError, match="inference_mode"):
        LatentMatch(m, "a cat")


def test_pixel_term_matches_manual_pipeline():
    clip, dec = tiny_pixel_clip(), tiny_decoder()
    term = PixelCLIPMatch(clip, dec, "a red car")
    x = latents(b=2, side=8)
    loss, metrics = term.evaluate(x)
    img = (dec(x) + 1) / 2                                    # 16x16 in [0, 1]
    img = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    img = (img - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f_img = F.normalize(clip.encode_image(img), dim=-1)
        f_txt = F.normalize(clip.encode_text(open_clip.tokenize(["a red car"])), dim=-1)
    cos = (f_img * f_txt).sum(-1)
    assert torch.allclose(metrics["cos"], cos, atol=1e-5)
    assert torch.allclose(loss.detach(), 100 - clip.logit_scale.exp() * cos, atol=1e-3)
    # [0, 1] decoders are read as they are
    term01 = PixelCLIPMatch(clip, lambda z: (dec(z) + 1) / 2, "a red car", image_range="0,1")
    assert torch.allclose(term01.evaluate(x)[1]["cos"], cos, atol=1e-5)


def test_pixel_term_gradient_and_errors():
    clip, dec = tiny_pixel_clip(), tiny_decoder()
    x = latents(b=2, side=8).requires_grad_(True)
    with torch.inference_mode():                      # built inside a ComfyUI node, used in grad mode
        term = PixelCLIPMatch(clip, dec, ["a", "b"])
    loss, _ = term.evaluate(x)
    (g,) = torch.autograd.grad(loss.sum(), [x])
    assert g.abs().sum() > 0
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        PixelCLIPMatch(clip, lambda z: z, "a").evaluate(x.detach())
    with pytest.raises(InputError, match="image_range"):
        PixelCLIPMatch(clip, dec, "a", image_range="0,255")
    with pytest.raises(InputError, match="decoder"):
        PixelCLIPMatch(clip, None, "a")


class NormReward(RewardTerm):
    """Test term outside the package: prefers large latents."""
    name = "norm"

    def __init__(self, weight=1.0):
        self.weight = weight

    def evaluate(self, latents):
        n = latents.flatten(1).norm(dim=1)
        return -n, {"norm": n.detach()}


def test_sum_weights_names_and_values(model):
    x = latents()
    a, b = LatentMatch(model, "a cat", weight=0.5), LatentMatch(model, "a dog", weight=2.0)
    total, values = (RewardSum(a) + [b, NormReward(3.0)]).evaluate(x)
    assert set(values) == {"match", "match/cos", "match_2", "match_2/cos", "norm", "norm/norm"}
    expected = 0.5 * a.evaluate(x)[0] + 2.0 * b.evaluate(x)[0] - 3.0 * x.flatten(1).norm(dim=1)
    assert torch.allclose(total, expected, atol=1e-4)
    assert torch.allclose(values["match"] + values["match_2"] + values["norm"], total, atol=1e-4)
    with pytest.raises(InputError, match="no terms"):
        RewardSum([])
    with pytest.raises(InputError, match="RewardTerm"):
        RewardSum(["match"])
    with pytest.raises(InputError, match="weight"):
        LatentMatch(model, "a cat", weight=float("nan"))


def test_avoid_margin_is_zero_while_every_concept_is_below_it(model):
    """The smooth maximum of several concepts exceeds the true maximum (by up to ln K / 100 for K concepts at
    the same cosine); the margin applies per concept, so nothing below it is penalised."""
    x = latents(b=2)
    concepts = ["a cat", "a cat.", "a cat!", "a cat?"]                # near-equal cosines: the largest excess
    cos = LatentAvoid(model, concepts).evaluate(x)[1]["cos"]          # the true maxima
    margin = float(cos.max()) + 1e-3
    loss, _ = LatentAvoid(model, concepts, margin=margin).evaluate(x)
    assert torch.equal(loss, torch.zeros(2))
    low, _ = LatentAvoid(model, concepts, margin=float(cos.min()) - 0.05).evaluate(x)
    assert (low > 0).all()


def test_pixel_term_crops_non_square_images_instead_of_squashing_them():
    clip = tiny_pixel_clip()
    wide = torch.rand(1, 3, 16, 32) * 2 - 1
    term = PixelCLIPMatch(clip, lambda z: wide, "a red car")
    expected = F.interpolate((wide + 1) / 2, size=(32, 64), mode="bilinear", align_corners=False, antialias=True)
    expected = (expected[..., :, 16:48] - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert torch.allclose(term.preprocess(wide), expected, atol=1e-6)
