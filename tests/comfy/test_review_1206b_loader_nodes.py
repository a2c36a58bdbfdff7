"""Review 1206b, Load Latent-CLIP with a release by repo id: when the first models/latent_clip folder (the one a
user configured in extra_model_paths.yaml) cannot be written (a read-only shared disk, a link to an unmounted
one), the download goes to the next registered folder that can be, never into the pack's own weights/; with none
writable it is one error naming the folder. The node has no output-folder input, so "give a writable folder" left
the user with nothing to change."""
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_latent_clip
from test_hub_download import _standin_module

REPO_ID = "wendlerc/latent-clip-b-8-512-34b-80k"
LOCAL = "latent-clip-b-8-512-34b-80k.safetensors"


@pytest.fixture
def loaders(comfy):
    return sys.modules[comfy.node("LatentCLIPLoader").__module__]


@pytest.fixture
def standin(comfy, tmp_path, monkeypatch):
    hub_mod = _standin_module()
    torch.save(hub_mod.authors_layout(tiny_latent_clip(seed=5).open_clip_state_dict()), tmp_path / "epoch_34.pt")
    with hub_mod.StandInHub({REPO_ID: {"checkpoints/epoch_34.pt": tmp_path / "epoch_34.pt"}}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield srv


@pytest.fixture
def latent_clip_folders(comfy):
    """Set the registered latent_clip folders for one test; ComfyUI's own list is restored after it."""
    import folder_paths
    saved = list(folder_paths.folder_names_and_paths["latent_clip"][0])

    def use(folders):
        folder_paths.folder_names_and_paths["latent_clip"][0][:] = [str(f) for f in folders]
        folder_paths.filename_list_cache.pop("latent_clip", None)

    yield use
    folder_paths.folder_names_and_paths["latent_clip"][0][:] = saved
    folder_paths.filename_list_cache.pop("latent_clip", None)


def _read_only(monkeypatch, folder: Path):
    """``folder`` as a read-only mount looks to os.access (the tests run as root, who may write anywhere)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(path).startswith(str(folder)):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("first", ["read-only", "link to an unmounted disk"])
def test_a_release_goes_to_the_next_writable_folder_when_the_first_cannot_be_written(
        comfy, loaders, standin, latent_clip_folders, tmp_path, monkeypatch, first):
    user = tmp_path / "shared" / "latent_clip"
    if first == "read-only":
        user.mkdir(parents=True)
        _read_only(monkeypatch, user)
    else:
        user.parent.mkdir(parents=True)
        user.symlink_to(tmp_path / "nas" / "latent_clip", target_is_directory=True)
    ours = tmp_path / "ComfyUI" / "models" / "latent_clip"
    latent_clip_folders([user, ours, loaders.SHIPPED_WEIGHTS])
    handle = comfy.run_node("LatentCLIPLoader", ckpt_name=REPO_ID, device="cpu", dtype="fp32").result[0]
    assert (ours / LOCAL).is_file() and Path(handle.patcher.model.source) == ours / LOCAL
    assert not (Path(loaders.SHIPPED_WEIGHTS) / LOCAL).exists()
    assert len(standin.downloads()) == 1
    before = list(standin.requests)     # found there from now on: no second download
    comfy.run_node("LatentCLIPLoader", ckpt_name=REPO_ID, device="cpu", dtype="fp32")
    assert standin.requests == before


def test_with_no_writable_folder_the_error_names_the_users_folder_and_weights_stays_untouched(
        comfy, loaders, standin, latent_clip_folders, tmp_path, monkeypatch):
    from latentclip.hub import DownloadError
    user = tmp_path / "shared" / "latent_clip"
    user.mkdir(parents=True)
    _read_only(monkeypatch, user)
    latent_clip_folders([user, loaders.SHIPPED_WEIGHTS])
    shipped_before = sorted(os.listdir(loaders.SHIPPED_WEIGHTS))
    with pytest.raises(DownloadError, match="cannot be written") as e:
        comfy.run_node("LatentCLIPLoader", ckpt_name=REPO_ID, device="cpu", dtype="fp32")
    assert str(user) in str(e.value)
    assert sorted(os.listdir(loaders.SHIPPED_WEIGHTS)) == shipped_before
    assert standin.downloads() == []
