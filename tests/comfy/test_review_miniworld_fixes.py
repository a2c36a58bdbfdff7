"""Review r4 fixes on the mini-world nodes, through ComfyUI's own loader and executor:

* D1: a latent other than 8x8 (Empty Latent Image left at 512x512) is refused in one sentence naming latent_image
  and the 64x64 Empty Latent Image to set, in KSampler, SamplerCustom and ReNO (was torch's broadcast error);
* D5: FK steering's item 0 is the same in a batch of 3 as alone, with the deterministic euler sampler (one
  resampling generator per item; was one for the batch);
* D7: the Judge reports progress per image and stops when the queue is interrupted (per image, and inside a
  large image's analysis).
"""
import time

import pytest
import torch

from conftest import interrupt_at_progress

PROMPT = "a red circle"


def out(result, i=0):
    return result.result[i] if hasattr(result, "result") else result[i]


# -- D1 -------------------------------------------------------------------------------------------
def _graph(sampler: str, width: int, height: int) -> dict:
    g = {
        "1": {"class_type": "LatentCLIPMiniWorldLoader", "inputs": {"world": "mini"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
    }
    common = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}
    if sampler == "KSampler":
        g["10"] = {"class_type": "KSampler", "inputs": {**common, "seed": 0, "steps": 4, "cfg": 1.0,
                                                        "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    elif sampler == "SamplerCustom":
        g["5"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        g["6"] = {"class_type": "BasicScheduler", "inputs": {"scheduler": "simple", "steps": 4, "denoise": 1.0,
                                                              "model": ["1", 0]}}
        g["10"] = {"class_type": "SamplerCustom", "inputs": {**common, "add_noise": True, "noise_seed": 0, "cfg": 1.0,
                                                             "sampler": ["5", 0], "sigmas": ["6", 0]}}
    else:
        g["8"] = {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": "mini/mini-latent-clip.safetensors",
                                                               "device": "default", "dtype": "auto"}}
        g["9"] = {"class_type": "LatentCLIPReward", "inputs": {"latent_clip": ["8", 0], "text": PROMPT, "mode": "match",
                                                               "weight": 0.01}}
        g["10"] = {"class_type": "LatentCLIPReNO", "inputs": {
            **common, "reward": ["9", 0], "seed": 0, "iterations": 2, "learning_rate": 0.0, "optimizer": "sgd",
            "grad_clip": 0.1, "regularization": 0.01, "gradient_checkpointing": False, "steps": 4, "cfg": 1.0}}
    g["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}}
    return g


@pytest.mark.parametrize("sampler, width, height, got", [
    ("KSampler", 512, 512, "4x64x64 (a 512x512 image)"),
    ("KSampler", 64, 128, "4x16x8 (a 64x128 image)"),
    ("SamplerCustom", 512, 512, "4x64x64 (a 512x512 image)"),
    ("LatentCLIPReNO", 512, 512, "4x64x64 (a 512x512 image)"),
])
def test_a_latent_that_is_not_8x8_is_refused_in_one_sentence(comfy, sampler, width, height, got):
    res = comfy.run_prompt(_graph(sampler, width, height))
    assert res["valid"], res
    errors = [d for e, d in res["messages"] if e == "execution_error"]
    assert not res["success"] and errors, res["messages"]   # (sent to the client and kept in the history)
    msg = errors[0]["exception_message"].strip()
    assert errors[0]["node_type"] == sampler and errors[0]["exception_type"].endswith("InputError"), errors[0]
    assert msg == (f"latent_image is {got} but the mini-world draws 64x64 images, i.e. 4x8x8 latents: "
                   "set Empty Latent Image to 64x64"), msg


def test_the_64x64_empty_latent_still_samples(comfy):
    res = comfy.run_prompt(_graph("KSampler", 64, 64))
    assert res["valid"] and res["success"], [d for e, d in res["messages"] if e == "execution_error"]


# -- D5 -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini(comfy):
    r = comfy.run_node("LatentCLIPMiniWorldLoader", world="mini")
    model, clip = out(r, 0), out(r, 1)
    handle = out(comfy.run_node("LatentCLIPLoader", ckpt_name="mini/mini-latent-clip.safetensors", device="default",
                                dtype="auto"))
    encode = lambda text: out(comfy.run_node("CLIPTextEncode", clip=clip, text=text))
    reward = out(comfy.run_node("LatentCLIPReward", latent_clip=handle, text=PROMPT, mode="match", weight=0.01))
    sigmas = out(comfy.run_node("BasicScheduler", model=model, scheduler="simple", steps=8, denoise=1.0))
    return {"model": model, "positive": encode(PROMPT), "negative": encode(""), "reward": reward, "sigmas": sigmas}


def _search(comfy, mini, strategy, batch):
    inner = out(comfy.run_node("KSamplerSelect", sampler_name="euler"))
    sampler = out(comfy.run_node(
        "LatentCLIPSearchSampler", reward=mini["reward"], sampler=inner, particles=4, strategy=strategy,
        potential="difference", temperature=30.0, interval=1, start=2, prune_steps="3, 5", keep=0.5, seed=0,
        max_batch=0, score_every_step=False))
    samples = out(comfy.run_node("SamplerCustom", model=mini["model"], add_noise=True, noise_seed=5, cfg=1.0,
                                 positive=mini["positive"], negative=mini["negative"], sampler=sampler,
                                 sigmas=mini["sigmas"], latent_image={"samples": torch.zeros(batch, 4, 8, 8)}), 0)
    return samples["samples"], sampler.last_summary["history"]


@pytest.mark.parametrize("strategy", ["fk_steering", "best_of_n", "prune"])
def test_item_0_of_a_batch_of_3_is_the_item_alone_with_euler(comfy, mini, strategy):
    alone, h1 = _search(comfy, mini, strategy, 1)
    batch, h3 = _search(comfy, mini, strategy, 3)
    assert batch.shape[0] == 3
    assert (batch[:1] - alone).abs().max() <= 1e-5, float((batch[:1] - alone).abs().max())
    if strategy == "fk_steering":
        first = lambda h: [e["ancestors"][0] for e in h["events"] if e["kind"] == "resample"]
        assert first(h3) == first(h1) and len(first(h1)) == 6


# -- D7 -------------------------------------------------------------------------------------------
def _judge_graph(batch: int, side: int = 64) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": batch,
                                                         "color": 0xD72828}},
            "2": {"class_type": "LatentCLIPMiniWorldJudge", "inputs": {"images": ["1", 0], "prompt": PROMPT}}}


def test_the_judge_reports_progress_per_image(comfy):
    import comfy.utils as comfy_utils
    seen = []
    comfy_utils.set_progress_bar_global_hook(lambda current, total, preview, node_id=None: seen.append((current, total)))
    try:
        res = comfy.run_prompt(_judge_graph(3))
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
    assert res["valid"] and res["success"], res["messages"]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert res["outputs"]["2"]["text"][0].startswith("judge: 0/3 images show 'a red circle'")


def test_the_judge_stops_when_the_queue_is_interrupted(comfy):
    with interrupt_at_progress(1) as seen:
        res = comfy.run_prompt(_judge_graph(3))
    events = [e for e, _ in res["messages"]]
    assert not res["success"] and "execution_interrupted" in events and "execution_error" not in events, events
    assert seen == [1]          # the second image was never judged


def test_the_judges_analysis_of_one_large_image_polls_and_can_be_stopped():
    """The core judge stays ComfyUI-free: ``poll`` is called while one image is analysed, and may raise."""
    from latentclip.miniworld import judge
    img = torch.full((512, 512, 3), 0.9)
    img[64:-64, 64:-64] = torch.tensor([215, 40, 40]) / 255.0
    calls = []

    class Stop(Exception):
        pass

    def poll():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    t = time.perf_counter()
    with pytest.raises(Stop):
        judge.check(img, PROMPT, poll=poll)
    assert len(calls) == 3 and time.perf_counter() - t < 1.0
    small = torch.full((64, 64, 3), 0.9)
    small[16:48, 16:48] = torch.tensor([215, 40, 40]) / 255.0
    assert judge.check(small, "a red square", poll=lambda: None) == judge.check(small, "a red square")
