"""The pack's methods do what they claim, measured in a real ComfyUI server on the shipped mini-world.

Every graph uses only what ships in weights/mini (Load mini-world, the mini Latent-CLIP through Load
Latent-CLIP); the Mini-world Judge (an analytic pixel checker, no CLIP) counts the images that show the
prompt. Seeds are fixed, so the counts are reproducible; each threshold is the measured gap with margin
(docs/miniworld_comfyui.md gives the measurements and the commands).
"""
import re

import pytest

from comfy_server import comfy_server, server_log_on_failure, status_messages  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("server_log_on_failure")
MINI_LCLIP = "mini/mini-latent-clip.safetensors"


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def mini_front(prompt, batch):
    return {"1": node("LatentCLIPMiniWorldLoader", world="mini"),
            "2": node("CLIPTextEncode", text=prompt, clip=["1", 1]),
            "3": node("CLIPTextEncode", text="", clip=["1", 1]),
            "4": node("EmptyLatentImage", width=64, height=64, batch_size=batch),
            "8": node("LatentCLIPLoader", ckpt_name=MINI_LCLIP, device="default", dtype="auto")}


def judged(graph, name, latent, prompt):
    graph[f"{name}_decode"] = node("VAEDecode", samples=latent, vae=["1", 2])
    graph[name] = node("LatentCLIPMiniWorldJudge", images=[f"{name}_decode", 0], prompt=prompt)


def correct_counts(server, graph, timeout=240) -> dict:
    """{judge node id: images the judge accepts} after running ``graph`` in the server."""
    entry = server.run(graph, timeout=timeout)
    assert "execution_success" in status_messages(entry), status_messages(entry)
    out = {}
    for nid, o in entry["outputs"].items():
        text = (o.get("text") or [""])[0]
        m = re.match(r"judge: (\d+)/(\d+)", str(text))
        if m:
            out[nid] = int(m.group(1))
    print(out)   # the measured counts (pytest -s)
    return out


def test_ksampler_on_the_mini_generator_draws_the_prompt(comfy_server):
    """The MODEL/CLIP/VAE triple works with stock nodes: at cfg 3 nearly every image shows a single-object prompt
    (measured 8/8), against a third for a prompt the images do not show."""
    g = mini_front("a red circle", 8)
    g["5"] = node("KSampler", model=["1", 0], seed=5, steps=4, cfg=3.0, sampler_name="euler", scheduler="simple",
                  positive=["2", 0], negative=["3", 0], latent_image=["4", 0], denoise=1.0)
    judged(g, "right", ["5", 0], "a red circle")
    judged(g, "wrong", ["5", 0], "a blue square")
    counts = correct_counts(comfy_server, g)
    assert counts["right"] >= 7 and counts["wrong"] == 0, counts


def test_fk_search_beats_best_of_n_at_equal_model_calls(comfy_server):
    """8 particles x 8 steps (64 model rows per image) each; measured on 24 images: best-of-N 2, FK 6."""
    prompt = "a red triangle to the left of a blue circle"
    g = mini_front(prompt, 24)
    g["5"] = node("KSamplerSelect", sampler_name="euler_ancestral")
    g["6"] = node("BasicScheduler", scheduler="simple", steps=8, denoise=1.0, model=["1", 0])
    g["9"] = node("LatentCLIPReward", latent_clip=["8", 0], text=prompt, mode="match", weight=0.01)
    for i, (strategy, start) in enumerate((("best_of_n", 0), ("fk_steering", 2))):
        g[f"search{i}"] = node("LatentCLIPSearchSampler", reward=["9", 0], sampler=["5", 0], particles=8,
                               strategy=strategy, potential="difference", temperature=30.0, interval=1, start=start,
                               prune_steps="", keep=0.5, seed=0, max_batch=0, score_every_step=False)
        g[f"sample{i}"] = node("SamplerCustom", add_noise=True, noise_seed=5, cfg=1.0, model=["1", 0], positive=["2", 0],
                               negative=["3", 0], sampler=[f"search{i}", 0], sigmas=["6", 0], latent_image=["4", 0])
        judged(g, strategy, [f"sample{i}", 0], prompt)
    counts = correct_counts(comfy_server, g)
    assert counts["fk_steering"] >= counts["best_of_n"] + 3, counts


def test_reno_with_the_latent_clip_reward_lifts_the_judges_count(comfy_server):
    """LatentCLIPReNO (4 steps, 15 iterations) on 8 noises: the judge accepts more of the optimised images."""
    prompt = "two blue triangles"
    g = mini_front(prompt, 8)
    g["9"] = node("LatentCLIPReward", latent_clip=["8", 0], text=prompt, mode="match", weight=0.01)
    g["10"] = node("LatentCLIPReNO", model=["1", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0],
                   reward=["9", 0], seed=0, iterations=15, learning_rate=0.0, optimizer="sgd", grad_clip=0.1,
                   regularization=0.01, gradient_checkpointing=False, steps=4, cfg=1.0)
    judged(g, "initial", ["10", 1], prompt)
    judged(g, "best", ["10", 0], prompt)
    counts = correct_counts(comfy_server, g)
    assert counts["best"] >= counts["initial"] + 2, counts   # measured 3 -> 7


def test_safety_guidance_cuts_the_concept_rate(comfy_server):
    """'a red object' leaves the shape open; guidance away from 'a triangle' (anchors circle, square, scale 1) on
    the same 32 seeds: measured 9 -> 3 images with a single triangle, prompt success 20 -> 20."""
    g = mini_front("a red object", 32)
    sampler = dict(seed=7, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", positive=["2", 0],
                   negative=["3", 0], latent_image=["4", 0], denoise=1.0)
    g["5"] = node("KSampler", model=["1", 0], **sampler)
    g["11"] = node("LatentCLIPSafetyGuidance", model=["1", 0], latent_clip=["8", 0], concepts="a triangle",
                   anchors="a circle\na square", scale=1.0, start_percent=0.0, end_percent=1.0, threshold=0.0)
    g["12"] = node("KSampler", model=["11", 0], **sampler)
    judged(g, "concept_plain", ["5", 0], "a triangle")
    judged(g, "concept_guided", ["12", 0], "a triangle")
    judged(g, "prompt_plain", ["5", 0], "a red object")
    judged(g, "prompt_guided", ["12", 0], "a red object")
    c = correct_counts(comfy_server, g)
    assert c["concept_guided"] <= c["concept_plain"] - 3, c
    assert c["prompt_guided"] >= c["prompt_plain"] - 2, c
