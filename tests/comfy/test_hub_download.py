"""Load Latent-CLIP offers the authors' releases by repo id, before and after their download; choosing one
downloads it from a (stand-in) Hub once, converts it into models/latent_clip and uses it, and a graph naming
the repo id (what the shipped workflows name) or the converted file runs unchanged afterwards; a missing repo
or an unreachable Hub is one clear execution error within seconds and the server keeps serving; the list
holds nothing the loader would refuse. Own server: it needs HF_ENDPOINT/HF_HOME pointing at the stand-in."""
import importlib.util
import os
import re
import time
from pathlib import Path

import pytest
import torch

import comfy_server as _srv
from latentclip import api, hub as lc_hub

HERE = Path(__file__).resolve().parent
REPO_ID = "wendlerc/latent-clip-b-8-512-34b-80k"
MISSING = "wendlerc/latent-clip-b-4-512-13b-80k"
LOCAL = "latent-clip-b-8-512-34b-80k.safetensors"


def _standin_module():
    spec = importlib.util.spec_from_file_location("latentclip_tests_hub_standin", HERE.parent / "core" / "hub_standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    harness = _srv._sibling("conftest", "latentclip_tests_comfy_conftest")
    if harness.COMFYUI is None:
        pytest.skip(harness.SKIP_REASON)
    standin = _standin_module()
    d = tmp_path_factory.mktemp("release")
    model = harness.tiny_latent_clip(seed=3)
    torch.save(standin.authors_layout(model.open_clip_state_dict()), d / "epoch_34.pt")
    hub = standin.StandInHub({REPO_ID: {"checkpoints/epoch_34.pt": d / "epoch_34.pt"}})
    with hub:
        old = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HOME")}
        os.environ.update(HF_ENDPOINT=hub.url, HF_HOME=str(d / "hf_home"))   # inherited by the server process
        srv = _srv.ComfyServer(harness.COMFYUI)
        try:
            srv.add_tiny_latent_clip()
            srv.start()
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        try:
            yield srv, hub, model
        finally:
            srv.stop()


@pytest.fixture(autouse=True)
def _log_on_failure(request, setup):
    yield from _srv.log_tail_on_failure(request, setup[0])


def _score_graph(srv, ckpt_name):
    import safetensors.torch
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    safetensors.torch.save_file({"latent_tensor": x, "latent_format_version_0": torch.tensor([])},
                                str(srv.input_dir / "hub_latent.latent"))
    return x, {
        "1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": ckpt_name, "device": "cpu", "dtype": "fp32"}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "hub_latent.latent"}},
        "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                          "text": "a red square"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }


def _options(srv):
    return srv.object_info()["LatentCLIPLoader"]["input"]["required"]["ckpt_name"][1]["options"]


def test_release_is_offered_downloaded_once_converted_and_used(setup):
    import latentclip
    srv, hub, model = setup
    options = _options(srv)
    assert _srv.TINY_CKPT in options and REPO_ID in options and MISSING in options
    x, graph = _score_graph(srv, REPO_ID)
    events = []
    result = api.run_workflow(graph, srv.url, on_event=lambda kind, data: events.append((kind, data)), timeout=120)
    entry = result.history
    assert "execution_success" in _srv.status_messages(entry), entry["status"]
    size = (hub.repos[REPO_ID]["checkpoints/epoch_34.pt"]).stat().st_size
    loader_progress = [(d["value"], d["max"]) for k, d in events if k == "progress" and str(d.get("node")) == "1"]
    assert (size, size) in loader_progress, loader_progress      # ComfyUI's progress bar followed the download
    assert sorted(p.name for p in (srv.models / "latent_clip").iterdir()) == sorted([_srv.TINY_CKPT, LOCAL])
    assert hub.downloads() == [f"/{REPO_ID}/resolve/main/checkpoints/epoch_34.pt"]
    report = entry["outputs"]["4"]["text"][0]
    scores = [float(s) for s in re.findall(r"#\d+: (-?\d+\.\d+) \(cos", report)]
    expected = latentclip.clip_score(model.float(), x, "a red square").tolist()
    assert scores == pytest.approx(expected, abs=0.05 * max(abs(e) for e in expected))   # fp16 file, fp32 compute
    options = _options(srv)
    assert REPO_ID in options and LOCAL not in options           # on disk now: still offered by its repo id only
    before = list(hub.requests)
    for name in (REPO_ID, LOCAL):                                # a saved workflow keeps working, no new download
        _, graph = _score_graph(srv, name)
        graph["3"]["inputs"]["text"] = f"a blue circle {name}"
        assert "execution_success" in _srv.status_messages(srv.run(graph, timeout=120))
    assert hub.requests == before


def test_missing_repo_is_one_clear_error_and_the_server_keeps_serving(setup):
    srv, hub, _ = setup
    _, graph = _score_graph(srv, MISSING)
    entry = srv.run(graph, timeout=120)
    error = _srv.status_messages(entry).get("execution_error")
    assert error and error["node_type"] == "LatentCLIPLoader"
    message = error["exception_message"]
    assert MISSING in message and "does not exist" in message and "python -m latentclip convert" in message
    assert not [p for p in (srv.models / "latent_clip").iterdir() if p.suffix == ".pt" or "13b" in p.name]
    _, graph = _score_graph(srv, _srv.TINY_CKPT)
    assert "execution_success" in _srv.status_messages(srv.run(graph, timeout=120))


def test_an_arbitrary_repo_id_is_refused_before_anything_runs(setup):
    srv, hub, _ = setup
    _, graph = _score_graph(srv, "someone/latent-clip-lookalike")
    status, body = srv.submit(graph)
    assert status == 400 and "someone/latent-clip-lookalike" in str(body)
    assert not [r for r in hub.requests if "someone" in r[1]]


def test_the_list_offers_no_fifo_dangling_link_or_folder_the_loader_would_refuse(setup):
    srv = setup[0]
    folder = srv.models / "latent_clip"
    made = [folder / "queue.safetensors", folder / "gone.safetensors", folder / "linked.safetensors"]
    os.mkfifo(made[0])
    made[1].symlink_to(folder / "deleted.safetensors")
    made[2].symlink_to(folder / _srv.TINY_CKPT)                  # a link to a real file stays usable
    try:
        options = _options(srv)
        assert "queue.safetensors" not in options and "gone.safetensors" not in options
        assert "linked.safetensors" in options and _srv.TINY_CKPT in options
        shipped = [r for r in options if r.startswith("mini")]         # the pack's weights/: its Latent-CLIPs only
        assert shipped == ["mini/mini-latent-clip.safetensors", "mini16/mini16-latent-clip.safetensors"], shipped
        assert [r for r in options if "/" in r and r not in shipped] == list(lc_hub.RELEASED)
    finally:
        for p in made:
            p.unlink()


def test_unreachable_hub_is_one_error_within_seconds_naming_repo_and_steps(setup):
    """Last in this module: it closes the stand-in Hub, so its port refuses connections."""
    srv, hub, _ = setup
    hub.__exit__(None, None, None)
    repo = "wendlerc/latent-clip-b-4-512-plus-13b-80k"
    log_before = len(srv.log_path.read_text(errors="replace"))
    entry = srv.run(_score_graph(srv, repo)[1], timeout=120)
    messages = _srv.status_messages(entry)
    error = messages.get("execution_error")
    assert error and error["node_type"] == "LatentCLIPLoader", messages
    message = error["exception_message"]
    assert repo in message and "could not be reached" in message and "python -m latentclip convert" in message
    seconds = (error["timestamp"] - messages["execution_start"]["timestamp"]) / 1000
    assert seconds < 5, f"the error took {seconds:.1f} s"
    time.sleep(0.5)   # let the server flush its log
    log = srv.log_path.read_text(errors="replace")[log_before:]
    assert "Retry" not in log and log.count("!!! Exception during processing !!!") == 1, log[-3000:]
    _, graph = _score_graph(srv, _srv.TINY_CKPT)
    assert "execution_success" in _srv.status_messages(srv.run(graph, timeout=120))
