"""The gradient features under a GPU's moves, on a CPU-only machine (see gpu_emulation.py).

(a) A real server whose every ``Module.to`` under inference mode copies tensors, as a move to a GPU
does, runs each gradient graph (ReNO with a Latent-CLIP reward and with the pixel-CLIP reward,
SamplerCustom with the ReNO sampler, KSampler with safety guidance) and the scoring and zero-shot
graphs twice, with ``POST /free`` (unload every model) in between, so the second run reloads.
(b) ComfyUI's ModelPatcher with ``torch.device("meta")`` standing in for the GPU: after a full and
a partial (lowvram) load, every tensor the Latent-CLIP's and the pixel CLIP's forward passes read
is on the load device; a plain ModelPatcher's partial load would not manage it.
"""
import json
import math
import os
import re
import shutil
import time

import pytest
import torch

import comfy_server as _srv
import gpu_emulation
import soak
from conftest import tiny_reward_latent_clip

RENO_CKPT = "tiny-reno.safetensors"   # a tiny Latent-CLIP with a trained CLIP's logit scale (100)
PIXEL_CLIP = "tiny-pixel-clip.safetensors"
ITERATIONS = 4
ON_GPU = os.environ.get("LATENTCLIP_TEST_GPU") == "1"   # tests/gpu/run.sh: real moves, no emulation
RESULTS = {}   # what each graph achieved, per run (printed at the end: pytest -s)


def _write_models(srv):
    import latentclip
    import open_clip
    import safetensors.torch
    srv.add_tiny_latent_clip()
    latentclip.save(tiny_reward_latent_clip(seed=3), srv.models / "latent_clip" / RENO_CKPT)
    torch.manual_seed(0)
    pixel = open_clip.create_model("ViT-S-32", pretrained=None)
    with torch.no_grad():
        pixel.logit_scale.fill_(math.log(100.0))
    safetensors.torch.save_file({k: v.contiguous() for k, v in pixel.state_dict().items()},
                                str(srv.models / "open_clip" / PIXEL_CLIP))
    soak.write_latent(srv, "emulation.latent", torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(4)))


@pytest.fixture(scope="module")
def server():
    harness = _srv._sibling("conftest", "latentclip_tests_comfy_conftest")
    if harness.COMFYUI is None:
        pytest.skip(harness.SKIP_REASON)
    srv = _srv.ComfyServer(harness.COMFYUI, extra_packs=[soak.FIXTURE_PACK], env={gpu_emulation.ENV: "0" if ON_GPU else "1"})
    _write_models(srv)
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.workdir, ignore_errors=True)
    if RESULTS:
        print("\nemulated GPU moves: " + json.dumps(RESULTS, indent=1))


@pytest.fixture(autouse=True)
def _log_on_failure(request, server):
    yield from _srv.log_tail_on_failure(request, server)


# -- graphs ----------------------------------------------------------------------------------------
def _loader(ckpt=RENO_CKPT, dtype="fp32"):
    if ON_GPU and dtype == "fp32":   # on a GPU, what users get: `auto` picks fp16 there
        dtype = "auto"
    return {"1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": ckpt, "device": "default", "dtype": dtype}},
            "2": {"class_type": "LoadLatent", "inputs": {"latent": "emulation.latent"}}}


def _preview(g, *sources):
    for i, src in enumerate(sources):
        g[f"9{i}"] = {"class_type": "PreviewAny", "inputs": {"source": list(src)}}
    return g


def reno_latent(dtype="fp32"):
    g = _loader(dtype=dtype)
    g.update(soak.reno_graph(RENO_CKPT, ITERATIONS, seed=1, text="a red fox"))
    g["1"]["inputs"]["ckpt_name"] = RENO_CKPT
    return _preview(g, ("13", 2))


def reno_pixel():
    g = reno_latent()
    g["18"] = {"class_type": "LatentCLIPTestTinyVAE", "inputs": {"seed": 0}}
    g["12"] = {"class_type": "PixelCLIPReward", "inputs": {"clip_name": PIXEL_CLIP, "model_name": "", "vae": ["18", 0],
                                                           "text": "a red fox", "weight": 0.01}}
    return g


def reno_sampler_custom():
    g = reno_latent()
    del g["13"], g["90"]
    g["14"] = {"class_type": "LatentCLIPReNOSampler", "inputs": {"reward": ["12", 0], "seed": 0, "iterations": ITERATIONS,
               "learning_rate": 5.0, "optimizer": "sgd", "grad_clip": 0.1, "regularization": 0.01}}
    g["15"] = {"class_type": "SDTurboScheduler", "inputs": {"model": ["10", 0], "steps": 1, "denoise": 1.0}}
    g["16"] = {"class_type": "SamplerCustom", "inputs": {"model": ["10", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0,
               "positive": ["10", 1], "negative": ["10", 2], "sampler": ["14", 0], "sigmas": ["15", 0],
               "latent_image": ["11", 0]}}
    g["17"] = {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["16", 0], "text": "a red fox"}}
    g["19"] = {"class_type": "SamplerCustom", "inputs": dict(g["16"]["inputs"], sampler=["20", 0])}
    g["20"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["21"] = {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["19", 0], "text": "a red fox"}}
    return _preview(g, ("17", 1), ("21", 1))


def search_fk(dtype="fp32", strategy="fk_steering"):
    """A search (FK steering with lookahead by default) on 3 particles x 4 steps, plus its history, with the
    moved Latent-CLIP."""
    g = reno_latent(dtype)
    del g["13"], g["90"]
    g["14"] = {"class_type": "LatentCLIPSearchSampler", "inputs": {
        "reward": ["12", 0], "sampler": ["20", 0], "particles": 3, "strategy": strategy, "potential": "difference",
        "temperature": 30.0, "interval": 1, "start": 1, "prune_steps": "2" if strategy == "prune" else "",
        "keep": 0.5, "seed": 0, "max_batch": 0, "score_every_step": True}}
    g["15"] = {"class_type": "BasicScheduler", "inputs": {"model": ["10", 0], "scheduler": "karras", "steps": 4,
                                                         "denoise": 1.0}}
    g["16"] = {"class_type": "SamplerCustom", "inputs": {"model": ["10", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0,
               "positive": ["10", 1], "negative": ["10", 2], "sampler": ["14", 0], "sigmas": ["15", 0],
               "latent_image": ["11", 0]}}
    g["17"] = {"class_type": "LatentCLIPSearchHistory", "inputs": {"sampler": ["14", 0], "samples": ["16", 0]}}
    g["20"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
    return _preview(g, ("17", 0))


def safety(dtype="fp32"):
    g = _loader(dtype=dtype)
    g["10"] = {"class_type": "LatentCLIPTestTinySDXL", "inputs": {"seed": 0}}
    g["11"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 2}}
    g["12"] = {"class_type": "LatentCLIPSafetyGuidance", "inputs": {"model": ["10", 0], "latent_clip": ["1", 0],
               "concepts": "a red fox", "anchors": "", "scale": 0.1, "start_percent": 0.0, "end_percent": 1.0,
               "threshold": 0.0}}
    g["13"] = {"class_type": "KSampler", "inputs": {"model": ["12", 0], "seed": 0, "steps": 3, "cfg": 1.0,
               "sampler_name": "euler", "scheduler": "simple", "positive": ["10", 1], "negative": ["10", 2],
               "latent_image": ["11", 0], "denoise": 1.0}}
    g["14"] = {"class_type": "LatentCLIPGuidanceReport", "inputs": {"model": ["12", 0], "samples": ["13", 0]}}
    return _preview(g, ("14", 0))


def scoring():
    g = _loader()
    g["3"] = {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a cat"}}
    g["4"] = {"class_type": "LatentCLIPZeroShot", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                            "labels": "cat\ndog", "template": "a photo of {}"}}
    return _preview(g, ("3", 1), ("4", 1))


def _ok(entry):
    assert entry["status"]["status_str"] == "success", json.dumps(_srv.status_messages(entry).get("execution_error"))[:3000]
    return entry["outputs"]


def _free(server):
    """POST /free with unload_models until ComfyUI's model management holds no model.

    Repeated because ComfyUI's prompt worker only wakes for the flag while it waits on its queue: a
    POST that lands while it is still collecting garbage after the last prompt is seen only later.
    """
    deadline = time.monotonic() + 60
    while True:
        status, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
        assert status == 200
        time.sleep(1.0)
        loaded = soak.stats(server)["loaded_models"]
        if not loaded:
            return
        assert time.monotonic() < deadline, loaded


def _reno_losses(outputs, node="13"):
    text = outputs[node]["text"][0]
    pairs = re.search(r"loss initial -> best: (.*)", text).group(1)
    return [tuple(float(v) for v in p.split(" -> ")) for p in pairs.split(", ")]


def _twice(server, graph, check):
    """Run ``graph``, unload every model, run it again; ``check`` each run's outputs."""
    results = []
    for run in range(2):
        if run:
            _free(server)
        results.append(check(_ok(server.run(graph, timeout=300))))
    return results


# -- (a) tests ---------------------------------------------------------------------------------------
def test_the_server_emulates_gpu_moves(server):
    assert soak.stats(server)["emulated_gpu_moves"] is (not ON_GPU)


@pytest.mark.parametrize("name,graph", [("reno_latent", reno_latent), ("reno_latent_bf16", lambda: reno_latent("bf16")),
                                        ("reno_pixel", reno_pixel)])
def test_reno_lowers_the_loss_after_moves_and_reloads(server, name, graph):
    def check(outputs):
        losses = _reno_losses(outputs)
        assert all(best < initial for initial, best in losses), losses
        return losses
    RESULTS[name] = _twice(server, graph(), check)
    assert RESULTS[name][0] == RESULTS[name][1]   # same seed, same result after a reload


def test_sampler_custom_reno_beats_plain_euler_after_moves_and_reloads(server):
    def check(outputs):
        reno = float(outputs["17"]["text"][0].split()[1])
        euler = float(outputs["21"]["text"][0].split()[1])
        assert reno > euler, (reno, euler)
        return {"reno_score": reno, "euler_score": euler}
    RESULTS["sampler_custom_reno"] = _twice(server, reno_sampler_custom(), check)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_search_fk_steering_after_moves_and_reloads(server, dtype):
    def check(outputs):
        summary = json.loads(outputs["90"]["text"][0])
        h = summary["history"]
        assert h["lookahead"] is True and [e["step"] for e in h["events"]] == [1, 2, 3]
        assert summary["nfe_per_item"] == 3 * 4                     # the lookahead call is reused, not repeated
        assert all(math.isfinite(r) for row in h["reward"] for r in row[0])
        return summary["best_reward"]
    RESULTS[f"search_fk_{dtype}"] = first, second = _twice(server, search_fk(dtype), check)
    assert first == pytest.approx(second, abs=1e-5)                  # same seed, same result after a reload


@pytest.mark.parametrize("strategy", ["best_of_n", "prune"])
def test_search_best_of_n_and_prune_after_moves_and_reloads(server, strategy):
    def check(outputs):
        summary = json.loads(outputs["90"]["text"][0])
        nfe = summary["nfe_per_item"]
        assert nfe == 3 * 4 if strategy == "best_of_n" else 2 * 3 < nfe < 3 * 4   # prune drops particles after step 2
        assert all(math.isfinite(r) for r in summary["best_reward"])
        return summary["best_reward"]
    RESULTS[f"search_{strategy}"] = first, second = _twice(server, search_fk(strategy=strategy), check)
    assert first == pytest.approx(second, abs=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_safety_guidance_lowers_the_concept_probability_after_moves_and_reloads(server, dtype):
    def check(outputs):
        text = outputs["14"]["text"][0]
        pairs = [(float(a), float(b)) for a, b in re.findall(r"P\(concept\) ([\d.]+) -> ([\d.]+)", text)]
        assert pairs and all(after < before for before, after in pairs), text
        return pairs
    RESULTS[f"safety_{dtype}"] = _twice(server, safety(dtype), check)


def test_scoring_and_zero_shot_after_moves_and_reloads(server):
    def check(outputs):
        scores = [float(line.split()[1]) for line in outputs["3"]["text"][0].splitlines()]
        assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
        assert outputs["4"]["text"][0]
        return scores
    first, second = _twice(server, scoring(), check)
    assert first == pytest.approx(second, abs=1e-6)


def test_models_are_under_model_management_and_nothing_is_left_patched(server):
    stats = soak.stats(server)
    assert stats["cached_pixel_clips"] == 1 and stats["unet_extra_functions"] == 0 and stats["grad_tensors"] == 0
