"""Every feature on 16-channel latents in a real ComfyUI server: random Flux- and SD3-family Latent-CLIPs
score, classify and filter LATENTs, steer tiny Flux/SD3-architecture models (ComfyUI's own classes) with
safety guidance and FK search; a Wan 2.1 single-frame 3-D latent is scored; another family is refused
in one sentence naming both. One server for the module (its own, with the tiny-model fixture pack)."""
import json

import pytest
import safetensors.torch
import torch

import latentclip

import comfy_server as _srv
from comfy_server import log_tail_on_failure
import tiny_families

FIXTURE_PACK = _srv.HERE / "families_fixture_pack"
FAMILIES = ("flux", "sd3", "wan21")
SIDE = 32   # latent side: 256-pixel images


def ckpt(family):
    return f"tiny-{family}.safetensors"


@pytest.fixture(scope="module")
def server():
    harness = _srv._sibling("conftest", "latentclip_tests_comfy_conftest")
    if harness.COMFYUI is None:
        pytest.skip(harness.SKIP_REASON)
    srv = _srv.ComfyServer(harness.COMFYUI, extra_packs=[FIXTURE_PACK])
    srv.add_tiny_latent_clip()                                   # an SDXL-family one
    for seed, family in enumerate(FAMILIES):
        latentclip.save(tiny_families.tiny_family_latent_clip(family, seed=seed + 1), srv.models / "latent_clip" / ckpt(family))
    with srv:
        yield srv


@pytest.fixture(autouse=True)
def _log_on_failure(request, server):
    yield from log_tail_on_failure(request, server)


def write_latent(srv, name, x):
    safetensors.torch.save_file({"latent_tensor": x.contiguous(), "latent_format_version_0": torch.tensor([])},
                                str(srv.input_dir / name))
    return name


def loader(family_or_file):
    name = family_or_file if family_or_file.endswith(".safetensors") else ckpt(family_or_file)
    return {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": name, "device": "cpu", "dtype": "fp32"}}


def shown(*node_ids):
    """PreviewAny output nodes for the given nodes' text outputs (ComfyUI runs only what outputs need)."""
    index = {"22": 0, "35": 0}
    return {f"9{n}": {"class_type": "PreviewAny", "inputs": {"source": [n, index.get(n, 1)]}} for n in node_ids}


def succeeded(entry):
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry["outputs"]


def error_of(entry):
    messages = _srv.status_messages(entry)
    assert entry["status"]["status_str"] == "error" and "execution_error" in messages, entry["status"]
    return messages["execution_error"]


def expected_scores(srv, family, x, text):
    model = latentclip.load(srv.models / "latent_clip" / ckpt(family), device="cpu", dtype=torch.float32)
    return latentclip.clip_score(model, x, text).tolist()


def reported_scores(report):
    return [float(line.split(": ")[1].split(" ")[0]) for line in report.splitlines()]


@pytest.mark.parametrize("family,shape", [("flux", (2, 16, SIDE, SIDE)), ("sd3", (2, 16, SIDE, SIDE)),
                                          ("wan21", (2, 16, 1, SIDE, SIDE))])
def test_score_zero_shot_select_and_filter_read_the_family(server, family, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(family)))
    name = write_latent(server, f"{family}.latent", x)
    graph = {
        "1": loader(family),
        "2": {"class_type": "LoadLatent", "inputs": {"latent": name}},
        "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a cat"}},
        "4": {"class_type": "LatentCLIPZeroShot", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                             "labels": "cat\ndog", "template": "a photo of {}"}},
        "5": {"class_type": "LatentCLIPSafetyFilter", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                                 "concepts": "blood", "threshold": 0.0,
                                                                 "action": "replace with zeros"}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"filtered-{family}"}},
        "7": {"class_type": "LatentCLIPSelectBest", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a cat", "k": 1}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"best-{family}"}},
        **shown("3", "4"),
    }
    out = succeeded(server.run(graph))
    assert reported_scores(out["3"]["text"][0]) == pytest.approx(expected_scores(server, family, x, "a cat"), abs=2e-3)
    assert len(out["4"]["text"][0].splitlines()) == 2
    saved = sorted(server.output_dir.rglob(f"filtered-{family}*.latent"))[-1]
    filtered = safetensors.torch.load_file(str(saved))["latent_tensor"]
    assert tuple(filtered.shape) == shape and not filtered.any()      # threshold 0 flags all: zeroed, layout kept
    best = int(torch.tensor(expected_scores(server, family, x, "a cat")).argmax())
    kept = safetensors.torch.load_file(str(sorted(server.output_dir.rglob(f"best-{family}*.latent"))[-1]))["latent_tensor"]
    assert torch.equal(kept, x[best:best + 1])                          # the best item, in the input's layout


def test_a_multi_frame_wan_latent_is_refused(server):
    name = write_latent(server, "wan-video.latent", torch.randn(1, 16, 3, SIDE, SIDE))
    graph = {"1": loader("wan21"), "2": {"class_type": "LoadLatent", "inputs": {"latent": name}},
             "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a"}},
             **shown("3")}
    error = error_of(server.run(graph))
    assert "samples has 3 latent frames but a Latent-CLIP scores single images" in error["exception_message"]


def sampling_graph(family, latent_clip=None):
    """Tiny model -> safety guidance -> KSampler (euler_ancestral) -> report; reward -> FK search -> history."""
    lc = latent_clip or family
    graph = {
        "1": loader(lc),
        "10": {"class_type": "LatentCLIPTestTinyDiT", "inputs": {"architecture": family, "seed": 0}},
        "11": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIDE * 8, "height": SIDE * 8, "batch_size": 1}},
        "20": {"class_type": "LatentCLIPSafetyGuidance", "inputs": {
            "model": ["10", 0], "latent_clip": ["1", 0], "concepts": "blood", "anchors": "a flower", "scale": 0.05,
            "start_percent": 0.0, "end_percent": 1.0, "threshold": 0.0}},
        "21": {"class_type": "KSampler", "inputs": {
            "model": ["20", 0], "seed": 1, "steps": 3, "cfg": 1.0, "sampler_name": "euler_ancestral",
            "scheduler": "simple", "positive": ["10", 1], "negative": ["10", 2], "latent_image": ["11", 0], "denoise": 1.0}},
        "22": {"class_type": "LatentCLIPGuidanceReport", "inputs": {"model": ["20", 0], "samples": ["21", 0]}},
        "30": {"class_type": "LatentCLIPReward", "inputs": {"latent_clip": ["1", 0], "text": "a red fox", "mode": "match",
                                                            "weight": 1.0}},
        "31": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
        "32": {"class_type": "LatentCLIPSearchSampler", "inputs": {
            "reward": ["30", 0], "sampler": ["31", 0], "particles": 3, "strategy": "fk_steering", "potential": "difference",
            "temperature": 30.0, "interval": 1, "start": 0, "prune_steps": "2", "keep": 0.5, "seed": 0, "max_batch": 0,
            "score_every_step": True}},
        "33": {"class_type": "BasicScheduler", "inputs": {"model": ["10", 0], "scheduler": "simple", "steps": 4, "denoise": 1.0}},
        "34": {"class_type": "SamplerCustom", "inputs": {
            "model": ["10", 0], "add_noise": True, "noise_seed": 2, "cfg": 1.0, "positive": ["10", 1],
            "negative": ["10", 2], "sampler": ["32", 0], "sigmas": ["33", 0], "latent_image": ["11", 0]}},
        "35": {"class_type": "LatentCLIPSearchHistory", "inputs": {"sampler": ["32", 0], "samples": ["34", 0]}},
        "36": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["34", 0], "text": "a red fox"}},
        **shown("22", "35", "36"),
    }
    return graph



@pytest.mark.parametrize("family", ["flux", "sd3", "wan21"])
def test_guidance_and_fk_search_steer_a_16_channel_model(server, family):
    """wan21: EmptySD3LatentImage's [B, 16, H, W] becomes [B, 16, 1, H, W] in the sampler (ComfyUI's own rule)."""
    out = succeeded(server.run(sampling_graph(family), timeout=240))
    assert "guided 3/3" in out["22"]["text"][0], out["22"]["text"][0]
    history = json.loads(out["935"]["text"][0])["history"]
    assert history["settings"]["strategy"] == "fk_steering" and history["settings"]["particles"] == 3
    assert history["steps"] == 4 and [e["kind"] for e in history["events"]] == ["resample"] * 3   # after steps 1-3
    assert len(reported_scores(out["36"]["text"][0])) == 1


def reno_graph(family):
    return {
        "1": loader(family),
        "10": {"class_type": "LatentCLIPTestTinyDiT", "inputs": {"architecture": family, "seed": 0}},
        "11": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIDE * 8, "height": SIDE * 8, "batch_size": 1}},
        "30": {"class_type": "LatentCLIPReward", "inputs": {"latent_clip": ["1", 0], "text": "a red fox", "mode": "match",
                                                            "weight": 1.0}},
        "40": {"class_type": "LatentCLIPReNO", "inputs": {
            "model": ["10", 0], "positive": ["10", 1], "negative": ["10", 2], "latent_image": ["11", 0],
            "reward": ["30", 0], "seed": 3, "iterations": 2, "learning_rate": 5.0, "optimizer": "sgd",
            "grad_clip": 0.1, "regularization": 0.01, "steps": 1, "cfg": 1.0}},
        "41": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["40", 0], "text": "a red fox"}},
        **shown("41")}


@pytest.mark.parametrize("family", ["sd3", "wan21"])
def test_reno_optimises_the_noise_of_a_16_channel_model(server, family):
    out = succeeded(server.run(reno_graph(family), timeout=240))
    assert len(reported_scores(out["41"]["text"][0])) == 1                  # ReNO's best latent, scored


def test_reno_on_flux_is_refused_naming_the_model(server):
    """ComfyUI's Flux blocks add in place to tensors autograd saved ('modified by an inplace operation'):
    ReNO says so in one sentence instead of an autograd traceback (docs/families.md)."""
    error = error_of(server.run(reno_graph("flux"), timeout=240))
    assert error["node_type"] == "LatentCLIPReNO"
    assert error["exception_message"].startswith("ReNO cannot backpropagate through this model: the model input (Flux)")


def test_a_latent_clip_of_another_family_is_refused_naming_both(server):
    name = write_latent(server, "flux-for-sdxl.latent", torch.randn(1, 16, SIDE, SIDE))
    graph = {"1": loader(_srv.TINY_CKPT), "2": {"class_type": "LoadLatent", "inputs": {"latent": name}},
             "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a"}},
             **shown("3")}
    message = error_of(server.run(graph))["exception_message"]
    assert "samples has 16 channels but this Latent-CLIP reads 4-channel SDXL-VAE latents" in message and "FLUX" in message
    error = error_of(server.run(sampling_graph("flux", latent_clip=_srv.TINY_CKPT)))
    assert error["node_type"] in ("LatentCLIPSafetyGuidance", "SamplerCustom")
    assert "latent_clip reads SDXL-VAE latents but the model makes FLUX latents" in error["exception_message"]
