"""Scoring API: validation, resolution policy, dtypes, zero-shot and ranking."""
import pytest
import torch
import torch.nn.functional as F

import latentclip
from latentclip import InputError, LatentCLIP


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LatentCLIP("Latent-ViT-Tiny-test").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def test_bad_latents_give_one_clear_sentence(model):
    cases = [
        (torch.randn(1, 16, 64, 64), "16 channels"),
        (torch.randn(4, 64, 64), "4 dimensions"),
        (torch.randn(0, 4, 64, 64), "empty batch"),
        (torch.full((1, 4, 64, 64), float("nan")), "NaN"),
        (torch.full((1, 4, 64, 64), float("inf")), "NaN or infinite"),
        (torch.randn(1, 4, 1, 1), "smaller than"),
    ]
    for x, words in cases:
        before = x.clone()
        with pytest.raises(InputError, match=words) as e:
            model.encode_latents(x)
        assert "\n" not in str(e.value)
        assert torch.equal(x, before) or torch.isnan(before).all()


def test_bad_texts(model):
    x = torch.randn(2, 4, 64, 64)
    with pytest.raises(InputError, match="empty"):
        latentclip.cosine(model, x, [""])
    with pytest.raises(InputError, match="whitespace"):
        latentclip.cosine(model, x, ["  "])
    with pytest.raises(InputError, match="3 lines but the batch has 2"):
        latentclip.cosine(model, x, ["a", "b", "c"])
    with pytest.raises(InputError, match="k is 3"):
        latentclip.rank(model, x, "a cat", k=3)


def test_scores_match_manual_formulas(model):
    x = torch.randn(3, 4, 64, 64)
    texts = ["a cat", "a dog", "a cat"]
    with torch.no_grad():
        img = F.normalize(model.encode_latents(x), dim=-1)
        txt = F.normalize(model.encode_text(texts), dim=-1)
    cos = (img * txt).sum(-1)
    assert torch.allclose(latentclip.cosine(model, x, texts), cos, atol=1e-6)
    assert torch.allclose(latentclip.clip_score(model, x, texts), model.logit_scale.exp() * cos, atol=1e-5)
    probs = latentclip.zero_shot(model, x, ["cat", "dog"], template="a {}")
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(-1), torch.ones(3))
    assert torch.allclose(probs, (100 * img @ txt[:2].T).softmax(-1), atol=1e-5)
    idx, scores = latentclip.rank(model, x, "a cat", k=2)
    assert idx.tolist() == scores.argsort(descending=True)[:2].tolist()


def test_text_cache_reuses_embeddings(model):
    a = model.encode_text_cached(["a cat", "a dog"])
    assert "a cat" in model._text_cache
    b = model.encode_text_cached(["a dog"])
    assert torch.equal(a[1], b[0])


def test_resolution_policies(model):
    x64 = torch.randn(1, 4, 64, 64)
    x128 = torch.nn.functional.interpolate(x64, scale_factor=2, mode="nearest")  # same content at 1024 px
    with torch.no_grad():
        a = model.encode_latents(x64)
        b = model.encode_latents(x128)  # area-pooled back to 64x64
        assert torch.allclose(a, b, atol=1e-5)
        wide = model.encode_latents(torch.randn(2, 4, 64, 96))
        native = model.encode_latents(torch.randn(2, 4, 64, 96), policy="native")
    assert wide.shape == native.shape == (2, 32)
    with pytest.raises(InputError, match="multiple of the patch size"):
        model.encode_latents(torch.randn(1, 4, 60, 64), policy="native")
    with pytest.raises(InputError, match="resize policy"):
        model.encode_latents(x64, policy="crop")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(model, dtype):
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        ref = model.encode_latents(x)
        ref_t = model.encode_text(["a cat"])
        low = LatentCLIP(model.config)
        low.load_open_clip_state_dict(model.open_clip_state_dict())
        low = low.to(dtype)
        got = low.encode_latents(x).float()
        assert low.encode_latents(torch.randn(1, 4, 32, 48)).shape == (1, 32)  # upsampled in float32
        got_t = low.encode_text(["a cat"]).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
    assert ((got_t - ref_t).norm() / ref_t.norm()).item() < 1e-2


def test_inputs_are_not_modified(model):
    x = torch.randn(2, 4, 96, 80)
    before = x.clone()
    latentclip.cosine(model, x, "a cat")
    latentclip.zero_shot(model, x, ["a", "b"])
    assert torch.equal(x, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(model):
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        ref = model.encode_latents(x)
        gpu = LatentCLIP(model.config)
        gpu.load_open_clip_state_dict(model.open_clip_state_dict())
        got = gpu.cuda().encode_latents(x).cpu()
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_rank_keeps_batch_order_among_equal_scores(model):
    """topk orders ties arbitrarily (it put #2 before #0 here); Select Best keeps the first of equals."""
    a = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    b = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    x = torch.cat([a, b, a, a, b])
    order, scores = latentclip.rank(model, x, "a photo of a cat")
    ties_first = [0, 2, 3] if scores[0] > scores[1] else [1, 4]
    assert order[:len(ties_first)].tolist() == ties_first
    assert latentclip.rank(model, x, "a photo of a cat", k=1)[0].tolist() == ties_first[:1]


@pytest.mark.parametrize("call, name", [(latentclip.zero_shot, "labels"), (latentclip.concept_probabilities, "concepts")])
@pytest.mark.parametrize("given, repeated", [(["dog", "cat", "dog"], "dog"), (["Cat", " cat "], "cat"),
                                             (["a  dog", "A dog"], "a dog")])
def test_a_label_given_twice_is_refused_naming_it(model, call, name, given, repeated):
    """A repeat (the tokenizer lowercases and collapses spaces) split the softmax: dog/cat/dog gave dog 0.5."""
    with pytest.raises(InputError, match=rf"^{name}: '{repeated}' is given twice \(.* ignoring case") as e:
        call(model, torch.randn(2, 4, 64, 64), given)
    assert "\n" not in str(e.value)


def test_a_string_is_one_label_or_concept(model):
    """A str was iterated per character: zero_shot(m, x, "cat") scored 'c', 'a' and 't'."""
    x = torch.randn(2, 4, 64, 64)
    assert torch.equal(latentclip.zero_shot(model, x, "cat"), latentclip.zero_shot(model, x, ["cat"]))
    assert latentclip.zero_shot(model, x, "cat").shape == (2, 1)
    assert torch.equal(latentclip.concept_probabilities(model, x, "nudity"),
                       latentclip.concept_probabilities(model, x, ["nudity"]))
    assert latentclip.concept_probabilities(model, x, "nudity").shape == (2, 1)
