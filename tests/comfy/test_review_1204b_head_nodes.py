"""Review 1204b (head nodes): a head trained on another embedding width is refused when the node runs,
naming head_name; the reward node refused it only once ReNO had loaded every model, without the name."""
import pytest
import torch

from latentclip.heads import Head
from test_head_nodes import head_file
from test_reno_nodes import reno_handle  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def narrow_head(comfy):
    torch.manual_seed(7)
    return head_file(comfy, "narrow-head.safetensors", lambda: Head(16, ["plain", "busy"], 0, "test attribute", "other"))


WANT = (r"^head_name 'narrow-head.safetensors': the head reads 16-dimensional embeddings but the Latent-CLIP makes "
        r"32-dimensional ones; use a head trained on this Latent-CLIP's embedding space$")


def test_a_head_of_another_width_is_refused_by_both_nodes_naming_head_name(comfy, narrow_head, reno_handle):
    with pytest.raises(ValueError, match=WANT):
        comfy.run_node("LatentCLIPHeadReward", latent_clip=reno_handle, head_name=narrow_head, label="busy")
    with pytest.raises(ValueError, match=WANT):
        comfy.run_node("LatentCLIPHeadScore", latent_clip=reno_handle, samples={"samples": torch.randn(1, 4, 64, 64)},
                       head_name=narrow_head, label="busy")
