"""Review 1204b (checkpoints, hub, heads): a clone without LFS or a saved /blob/ page under a .safetensors
name, a Hub answering 503 with the release cached, a CPU head on a GPU Latent-CLIP."""
import time

import pytest
import torch

import latentclip
from latentclip import CheckpointError, hub
from latentclip.heads import Head, latent_probabilities, load_head
from latentclip.miniworld.manifest import content_sha256
from latentclip.pixel_clip import load_pixel_clip
from latentclip.rewards import LatentHead

from fake_device import fake_device, to_device
from hub_standin import StandInHub, authors_layout

torch.set_num_threads(1)
REPO = "wendlerc/latent-clip-b-8-512-34b-80k"
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 2264932155\n"
HTML = b"<!DOCTYPE html>\n<html><head><title>open_clip_model.safetensors</title>"


@pytest.mark.parametrize("content, says", [
    (LFS, r"is a Git LFS pointer \(\d+ bytes\), not the weights; run `git lfs pull`"),
    (HTML, r"is an HTML page, not the weights; download the file's /resolve/ URL")], ids=["lfs", "html"])
@pytest.mark.parametrize("reader", [latentclip.load, load_pixel_clip, load_head])
def test_a_safetensors_name_on_an_lfs_pointer_or_html_page_says_what_it_is(tmp_path, content, says, reader):
    """Hugging Face repos hold .safetensors files: a clone without LFS or a wget of the /blob/ URL leaves
    these under the weights' name (it was "a corrupt safetensors header declaring 2336927755350992246 bytes")."""
    path = tmp_path / "open_clip_model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="^'open_clip_model.safetensors' " + says):
        reader(path)


def test_a_pixel_clip_file_that_does_not_fit_model_name_says_why(tmp_path):
    """It was "does not fit open_clip model ViT-S-32: Error(s) in loading state_dict for CLIP:", torch's
    header line, with the reason on the lines after it cut off."""
    from safetensors.torch import save_file
    save_file({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "logit_scale": torch.zeros([])}, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pixel_clip(tmp_path / "c.safetensors", model_name="ViT-S-32")
    text = str(e.value)
    assert text.startswith("'c.safetensors' does not fit open_clip model ViT-S-32 (Missing key(s) in state_dict: ")
    assert "give the model_name of the file's architecture, or leave it empty" in text and "\n" not in text


def _tiny_release(folder):
    torch.manual_seed(0)
    model = latentclip.LatentCLIP("Latent-ViT-Tiny-test").eval()
    torch.save(authors_layout(model.open_clip_state_dict()), folder / "epoch_34.pt")
    return {"checkpoints/epoch_34.pt": folder / "epoch_34.pt"}


def test_a_hub_answering_503_uses_the_cached_release_at_once(tmp_path, monkeypatch):
    """A Hub outage (HTTP 503 to everything) with the release already in the HF cache: it was ~23 s of
    huggingface_hub's retries and then a DownloadError; offline or unreachable, the cache was used."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with StandInHub({REPO: _tiny_release(tmp_path)}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        first = hub.fetch(REPO, tmp_path / "a")
        srv._answer = lambda h, body: srv._send(h, 503, b'{"error": "Service Unavailable"}', body)
        t0 = time.perf_counter()
        again = hub.fetch(REPO, tmp_path / "b")
        assert time.perf_counter() - t0 < 10
        assert content_sha256(again) == content_sha256(first)   # safetensors orders its metadata by hash
        monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))   # nothing cached: one fast error
        t0 = time.perf_counter()
        with pytest.raises(hub.DownloadError, match=f"Could not download {REPO} .*503.*python -m latentclip convert"):
            hub.fetch(REPO, tmp_path / "c")
        assert time.perf_counter() - t0 < 5


def test_a_head_loaded_on_the_cpu_scores_a_latent_clip_on_the_gpu():
    """load_head's default device is the CPU; with the Latent-CLIP on a GPU both the score and the reward
    failed with "Expected all tensors to be on the same device"."""
    torch.manual_seed(0)
    model = latentclip.LatentCLIP("Latent-ViT-Tiny-test").eval().requires_grad_(False)
    head = Head(model.config["embed_dim"], ["calm", "busy"], 8).eval().requires_grad_(False)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        want = latent_probabilities(model, head, x)
    with fake_device():
        to_device(model)
        got = latent_probabilities(model, head, x)
        assert got.device == torch.device("cuda", 0) and head.net[0].weight.device.type == "cpu"
        xx = x.to("cuda").requires_grad_()
        loss, _ = LatentHead(model, head, "calm").evaluate(xx)
        loss.sum().backward()
        assert xx.grad.device == torch.device("cuda", 0) and torch.isfinite(xx.grad.cpu()).all()
        assert torch.allclose(got.detach().cpu(), want, atol=1e-5)
