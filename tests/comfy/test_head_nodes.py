"""Head nodes inside a real ComfyUI: a head file in models/latent_clip_heads, scored through a loaded
Latent-CLIP, and chained as a reward term into the ReNO node (tiny SDXL-architecture UNet)."""
import json

import pytest
import torch

from latentclip.heads import Head, latent_probabilities, save_head
from conftest import tiny_conditioning, tiny_sdxl
from test_reno_nodes import reno_handle  # noqa: F401  (fixture)


def head_file(comfy, name: str, make) -> str:
    """``make()``'s head saved once as ``name`` in a models/latent_clip_heads folder ComfyUI lists."""
    folder = comfy.models / "latent_clip_heads"
    folder.mkdir(parents=True, exist_ok=True)
    comfy.folder_paths.add_model_folder_path("latent_clip_heads", str(folder))
    if not (folder / name).exists():
        save_head(make(), folder / name)
    return name


@pytest.fixture(scope="module")
def head_name(comfy):
    torch.manual_seed(7)
    return head_file(comfy, "tiny-head.safetensors", lambda: Head(32, ["plain", "busy"], 8, "test attribute", "tiny"))


@pytest.fixture(scope="module")
def handle(reno_handle):
    return reno_handle   # the ReNO tests' tiny Latent-CLIP with a trained logit scale


def test_head_score_matches_the_core_and_leaves_the_input_alone(comfy, head_name, handle):
    from latentclip.heads import load_head
    x = torch.randn(3, 4, 64, 64)
    before = x.clone()
    scores, labels, table = comfy.run_node("LatentCLIPHeadScore", latent_clip=handle, samples={"samples": x},
                                           head_name=head_name, label="busy").result
    assert torch.equal(x, before)
    head = load_head(comfy.models / "latent_clip_heads" / head_name)
    want = latent_probabilities(handle.load(), head, before)
    assert scores == pytest.approx(want[:, 1].tolist(), abs=1e-4)
    assert labels.splitlines() == [head.labels[i] for i in want.argmax(-1).tolist()]
    assert [sorted(r) for r in json.loads(table)] == [["busy", "plain"]] * 3
    with pytest.raises(ValueError, match="label 'calm' is not one of this head's labels"):
        comfy.run_node("LatentCLIPHeadScore", latent_clip=handle, samples={"samples": x}, head_name=head_name,
                       label="calm")
    with pytest.raises(ValueError, match="not a file in models/latent_clip_heads"):
        comfy.run_node("LatentCLIPHeadScore", latent_clip=handle, samples={"samples": x}, head_name="nope.safetensors")


def test_head_reward_chains_into_reno_and_moves_the_probability(comfy, head_name, handle):
    match = comfy.run_node("LatentCLIPReward", latent_clip=handle, text="a red fox", mode="match", weight=0.0).result[0]
    chain = comfy.run_node("LatentCLIPHeadReward", latent_clip=handle, head_name=head_name, label="busy",
                           mode="increase", weight=1.0, reward=match).result[0]
    assert len(match) == 1 and len(chain) == 2
    latent = {"samples": torch.zeros(2, 4, 32, 32)}
    out = comfy.run_node("LatentCLIPReNO", model=tiny_sdxl(), positive=tiny_conditioning(1, 1),
                         negative=tiny_conditioning(2, 1), latent_image=latent, reward=chain, seed=5, iterations=4,
                         learning_rate=5.0, optimizer="sgd", grad_clip=0.1, regularization=0.01, steps=1, cfg=1.0)
    best, initial, history, _ = out.result
    summary = json.loads(history)
    assert "head1" in summary["history"]
    assert all(b < i for b, i in zip(summary["best_loss"], summary["initial_loss"]))
    from latentclip.heads import load_head
    head = load_head(comfy.models / "latent_clip_heads" / head_name)
    p_best = latent_probabilities(handle.load(), head, best["samples"])[:, 1]
    p_init = latent_probabilities(handle.load(), head, initial["samples"])[:, 1]
    assert (p_best > p_init).all(), (p_best, p_init)
    with pytest.raises(ValueError, match="label 'calm' is not one of"):
        comfy.run_node("LatentCLIPHeadReward", latent_clip=handle, head_name=head_name, label="calm")
