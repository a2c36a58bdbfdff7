"""Review 1204b (families, model, scoring nodes): bugs found and fixed, one test each."""
import pytest
import torch

from latentclip import LatentCLIP


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LatentCLIP("Latent-ViT-Tiny-test").eval()


def test_a_full_text_cache_still_returns_the_cached_prompts_of_the_same_call(model):
    """A call mixing a cached prompt with new ones when the cache was full cleared the cache and then read the
    cached prompt from it: KeyError (a long session scoring many distinct prompts hit it)."""
    model._text_cache.clear()
    expected = model.encode_text_cached(["a cat", "a dog"])
    model._text_cache.update({f"filler {i}": expected[0] for i in range(4095)})
    got = model.encode_text_cached(["a cat", "a red fox"])
    assert torch.allclose(got[0], expected[0]) and len(model._text_cache) <= 4096
    assert torch.allclose(model.encode_text_cached(["a dog"])[0], expected[1])
