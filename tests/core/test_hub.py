"""Released Latent-CLIPs from a (stand-in) Hugging Face Hub: download once, convert to fp16 safetensors,
reuse; clear errors when the repo is missing or the Hub is offline; the same from the command line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import latentclip
from latentclip import hub
from latentclip.checkpoints import read_safetensors_header
from hub_standin import StandInHub, authors_layout

REPO = "wendlerc/latent-clip-b-8-512-34b-80k"
ROOT = Path(__file__).resolve().parents[2]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = latentclip.LatentCLIP("Latent-ViT-Tiny-test").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The repo's files in the authors' layout: an older and the last epoch, a README."""
    d = tmp_path_factory.mktemp("release")
    model = tiny_model(0)
    torch.save(authors_layout(model.open_clip_state_dict()), d / "epoch_34.pt")
    torch.save(authors_layout(tiny_model(1).open_clip_state_dict()), d / "epoch_12.pt")
    (d / "README.md").write_text("Latent-CLIP\n")
    files = {"checkpoints/epoch_34.pt": d / "epoch_34.pt", "checkpoints/epoch_12.pt": d / "epoch_12.pt",
             "README.md": d / "README.md"}
    return model, files


@pytest.fixture
def standin(release, tmp_path, monkeypatch):
    with StandInHub({REPO: release[1]}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        yield srv


def test_released_repo_ids_are_known():
    assert len(hub.RELEASED) == 5 and all(hub.is_repo_id(r) for r in hub.RELEASED)
    assert not hub.is_repo_id("latent-clip-b-8-512.safetensors") and not hub.is_repo_id("sub/file.pt")
    assert hub.local_name(REPO) == "latent-clip-b-8-512-34b-80k.safetensors"


def test_fetch_downloads_the_last_epoch_converts_to_fp16_and_reuses_it(standin, release, tmp_path):
    model, files = release
    seen = []
    out = tmp_path / "models" / "latent_clip"
    path = hub.fetch(REPO, out, progress=lambda done, total: seen.append((done, total)))
    assert path == out / "latent-clip-b-8-512-34b-80k.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [path.name]             # no pickle, no temp file left
    assert standin.downloads() == [f"/{REPO}/resolve/main/checkpoints/epoch_34.pt"]
    size = files["checkpoints/epoch_34.pt"].stat().st_size
    assert seen[-1] == (size, size) and len(seen) >= 2                       # the progress callback saw the bytes
    header = read_safetensors_header(path)
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert not [k for k in dtypes if "vae" in k or "optimizer" in k or k.startswith("module.")]
    assert {d for k, d in dtypes.items() if k != "logit_scale"} == {"F16"}
    assert path.stat().st_size < files["checkpoints/epoch_34.pt"].stat().st_size / 2
    loaded = latentclip.load(path)
    latents = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        a = loaded.encode_latents(latents)
        b = model.encode_latents(latents)
    assert torch.allclose(a, b, rtol=0, atol=2e-2 * b.abs().max().item())
    before = list(standin.requests)
    assert hub.fetch(REPO, out) == path and standin.requests == before      # no second download, no request


def test_missing_repo_is_one_error_naming_the_repo_and_the_manual_steps(standin, tmp_path):
    with pytest.raises(hub.DownloadError) as e:
        hub.fetch("wendlerc/latent-clip-b-4-512-13b-80k", tmp_path / "out")
    text = str(e.value)
    assert "wendlerc/latent-clip-b-4-512-13b-80k" in text and "does not exist" in text
    assert "python -m latentclip convert" in text and standin.url in text
    assert not (tmp_path / "out").exists()


def test_a_pickle_that_asks_for_code_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "epoch_34.pt"
    torch.save({"state_dict": tiny_model().open_clip_state_dict(), "x": Payload()}, evil)
    with StandInHub({REPO: {"checkpoints/epoch_34.pt": evil}}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        with pytest.raises(latentclip.CheckpointError, match=f"{REPO} .checkpoints/epoch_34.pt. was downloaded but refused"):
            hub.fetch(REPO, tmp_path / "out")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "latentclip", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT)


def test_cli_download_then_offline(standin, tmp_path):
    env = {"HF_ENDPOINT": standin.url, "HF_HOME": str(tmp_path / "hf_home")}
    r = _cli(["download", REPO, "--out", str(tmp_path / "dl")], env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dl" / "latent-clip-b-8-512-34b-80k.safetensors").is_file()
    assert "latent-clip-b-8-512-34b-80k.safetensors" in r.stdout
    # offline, the checkpoint already in the Hugging Face cache is converted again
    r = _cli(["download", REPO, "--out", str(tmp_path / "other")], {**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    from latentclip.miniworld.manifest import content_sha256     # safetensors orders its metadata by hash
    assert content_sha256(tmp_path / "other" / "latent-clip-b-8-512-34b-80k.safetensors") == \
        content_sha256(tmp_path / "dl" / "latent-clip-b-8-512-34b-80k.safetensors")
    # offline with nothing cached: one line naming the repo and the manual steps
    r = _cli(["download", REPO, "--out", str(tmp_path / "third")],
             {**env, "HF_HOME": str(tmp_path / "empty_home"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert REPO in r.stderr and "HF_HUB_OFFLINE" in r.stderr and "python -m latentclip convert" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "third").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_before_downloading(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    (tmp_path / "a-file").write_text("the user's file")
    with pytest.raises(hub.DownloadError, match=r"cannot be made: '.*a-file' is a file; give a folder"):
        hub.fetch(REPO, tmp_path / "a-file" / "models")
    assert (tmp_path / "a-file").read_text() == "the user's file"
    assert not (tmp_path / "hf_home").exists()                          # nothing was downloaded


def _closed_port_url() -> str:
    import socket
    with socket.socket() as s:       # a port that was free a moment ago and nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("setting", ["offline", "unreachable"])
def test_offline_or_unreachable_hub_fails_fast_once_naming_repo_and_manual_steps(setting, tmp_path, monkeypatch, caplog):
    """huggingface_hub alone retried for ~30 s, logging every attempt; the probe answers at once."""
    import time
    url = _closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    if setting == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(hub.DownloadError) as e:
        hub.fetch(REPO, tmp_path / "out")
    elapsed = time.perf_counter() - t0
    assert elapsed < 5, f"the error took {elapsed:.1f} s"
    text = str(e.value)
    assert REPO in text and "python -m latentclip convert" in text and f"{url}/{REPO}" in text
    assert ("HF_HUB_OFFLINE" if setting == "offline" else "could not be reached") in text
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]     # nothing logged before the error
    assert not (tmp_path / "out").exists()


def test_cli_download_from_an_unreachable_hub_is_one_line_and_fast(tmp_path, capsys, monkeypatch):
    import time
    from latentclip import __main__ as cli
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    t0 = time.perf_counter()
    assert cli.main(["download", REPO, "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Could not download " + REPO) and "convert" in err[0]
