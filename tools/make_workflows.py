"""Writes the example workflows from one API-format definition each, and a thumbnail per workflow.

    python tools/make_workflows.py --server http://127.0.0.1:8188 [--out example_workflows] [--api-out workflows/api]

For each entry of WORKFLOWS: ``example_workflows/<title>.json`` in UI (save) format, which ComfyUI's Templates
browser lists as a card named by the file, with ``<title>.jpg`` as its picture; and ``workflows/api/<slug>.json``
in API format, the graph scripts, the headless runner (``python -m latentclip.api run``) and the tests share.
ComfyUI lists every ``*.json`` directly inside a pack's ``example_workflows/`` and ``workflows/`` as a template
card (an API graph there would open as an empty canvas), never a subfolder's: hence ``workflows/api/``.
The UI format is derived with the live server's /object_info (widget order, socket types), so
the files match the nodes as the server defines them. Nodes are laid out in columns by graph depth, each
sized from its slot and widget counts no smaller than the front end draws it, with room for what a run adds
(an image preview, the pack's text box), so no node covers another before or after Run.
The folders' generated files are replaced: they are artefacts of this script.
"""
from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent

TURBO = "sd_xl_turbo_1.0_fp16.safetensors"
#: A released Latent-CLIP is named by its Hugging Face repo id: Load Latent-CLIP downloads and converts it on
#: first use and keeps listing the repo id, so the workflows run before and after the download unchanged.
LCLIP = "wendlerc/latent-clip-b-8-512-34b-80k"
PIXEL_CLIP = "open_clip_pytorch_model.bin"
CHECKPOINT_SOURCES = {TURBO: "stabilityai/sdxl-turbo", "sd_xl_base_1.0.safetensors": "stabilityai/stable-diffusion-xl-base-1.0"}
LCLIP_WHERE = (f"- the SDXL-VAE Latent-CLIP {LCLIP}: Load Latent-CLIP downloads and converts it on the first run "
               "(about 0.3 GB, into models/latent_clip); offline, put its converted file there by hand "
               "(`python -m latentclip convert epoch_34.pt ...`) or pick any other file of models/latent_clip.")


def where(graph: dict) -> str:
    """The note's 'Model files' paragraph: the checkpoint this graph loads, then the Latent-CLIP."""
    ckpts = sorted({n["inputs"]["ckpt_name"] for n in graph.values() if n["class_type"] == "CheckpointLoaderSimple"})
    lines = [f"- models/checkpoints/{c} ({CHECKPOINT_SOURCES.get(c, 'any SDXL-family checkpoint')})" for c in ckpts]
    return "Model files:\n" + "\n".join(lines + [LCLIP_WHERE])


#: Where the api graphs live, relative to the repository root (shared by the runner, tests and users).
API_DIR = "workflows/api"


def node(class_type, title=None, **inputs):
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}


def turbo_front(prompt, batch=4, seed=42):
    """SDXL-Turbo, one step, cfg 1: the sampler whose output the Latent-CLIP nodes judge."""
    return {
        "1": node("CheckpointLoaderSimple", "Load SDXL-Turbo", ckpt_name=TURBO),
        "2": node("CLIPTextEncode", "Prompt", text=prompt, clip=["1", 1]),
        "3": node("CLIPTextEncode", "Negative (unused at cfg 1)", text="", clip=["1", 1]),
        "4": node("EmptyLatentImage", "Batch of candidates", width=512, height=512, batch_size=batch),
        "5": node("KSamplerSelect", sampler_name="euler_ancestral"),
        "6": node("SDTurboScheduler", steps=1, denoise=1.0, model=["1", 0]),
        "7": node("SamplerCustom", "SDXL-Turbo 1 step", add_noise=True, noise_seed=seed, cfg=1.0, model=["1", 0],
                  positive=["2", 0], negative=["3", 0], sampler=["5", 0], sigmas=["6", 0], latent_image=["4", 0]),
        "8": node("LatentCLIPLoader", "Load Latent-CLIP (models/latent_clip)", ckpt_name=LCLIP, device="default", dtype="auto"),
    }


def best_of_n():
    g = turbo_front("a photo of a red fox in the snow")
    g.update({
        "9": node("LatentCLIPScore", "Score every candidate (no decode)", latent_clip=["8", 0], samples=["7", 0],
                  text="a photo of a red fox in the snow"),
        "10": node("PreviewAny", "Scores", source=["9", 1]),
        "11": node("LatentCLIPSelectBest", "Keep the best (no decode)", latent_clip=["8", 0], samples=["7", 0],
                   text="a photo of a red fox in the snow", k=1),
        "12": node("VAEDecode", "Decode only the winner", samples=["11", 0], vae=["1", 2]),
        "13": node("SaveImage", images=["12", 0], filename_prefix="latent_clip_best"),
    })
    return g


def zero_shot():
    g = turbo_front("a photo of an animal", batch=4, seed=7)
    g.update({
        "9": node("LatentCLIPZeroShot", "Classify latents", latent_clip=["8", 0], samples=["7", 0],
                  labels="cat\ndog\nhorse\nbird", template="a photo of a {}"),
        "10": node("PreviewAny", "Best label per item", source=["9", 0]),
        "11": node("PreviewAny", "Probabilities (JSON)", source=["9", 1]),
    })
    return g


def safety_filter():
    g = turbo_front("a crowded street festival at night", batch=4, seed=3)
    g.update({
        "9": node("LatentCLIPSafetyFilter", "Flag unwanted concepts", latent_clip=["8", 0], samples=["7", 0],
                  concepts="nudity\nblood", threshold=0.5, action="replace with zeros"),
        "10": node("PreviewAny", "Filter report", source=["9", 3]),
        "11": node("VAEDecode", samples=["9", 0], vae=["1", 2]),
        "12": node("SaveImage", images=["11", 0], filename_prefix="latent_clip_filtered"),
    })
    return g


def reno(pixel=False):
    """SDXL-Turbo + ReNO: the paper's headline use; pixel=True is ReNO's own pixel-CLIP baseline."""
    prompt = "a green bench to the left of a red bicycle"
    g = turbo_front(prompt, batch=1, seed=0)
    del g["5"], g["6"], g["7"]
    if pixel:
        g["8"] = node("LatentCLIPPixelReward", "Pixel-CLIP reward (decodes every iteration)", clip_name=PIXEL_CLIP,
                      model_name="ViT-H-14", vae=["1", 2], text=prompt, weight=0.01)
    else:
        g["9"] = node("LatentCLIPReward", "Latent-CLIP reward (no decode)", latent_clip=["8", 0], text=prompt,
                      mode="match", weight=0.01)
    reward = ["8", 0] if pixel else ["9", 0]
    g.update({
        "10": node("LatentCLIPReNO", "ReNO: optimise the initial noise", model=["1", 0], positive=["2", 0],
                   negative=["3", 0], latent_image=["4", 0], reward=reward, seed=0, iterations=50,
                   learning_rate=5.0, optimizer="sgd", grad_clip=0.1, regularization=0.01, steps=1, cfg=1.0),
        "11": node("VAEDecode", "Decode best", samples=["10", 0], vae=["1", 2]),
        "12": node("SaveImage", images=["11", 0], filename_prefix="reno_pixel_best" if pixel else "reno_latent_best"),
        "13": node("VAEDecode", "Decode initial (un-optimised)", samples=["10", 1], vae=["1", 2]),
        "14": node("SaveImage", images=["13", 0], filename_prefix="reno_initial"),
        "15": node("PreviewImage", "Reward history", images=["10", 3]),
        "16": node("PreviewAny", "History (JSON)", source=["10", 2]),
    })
    return g


def reno_sampler_custom():
    """The same optimisation as a SAMPLER inside SamplerCustom."""
    prompt = "three yellow balloons above a blue car"
    g = turbo_front(prompt, batch=1, seed=1)
    g["9"] = node("LatentCLIPReward", "Latent-CLIP reward", latent_clip=["8", 0], text=prompt, mode="match", weight=0.01)
    g["5"] = node("LatentCLIPReNOSampler", "ReNO sampler", reward=["9", 0], seed=0, iterations=50, learning_rate=5.0,
                  optimizer="sgd", grad_clip=0.1, regularization=0.01)
    g["10"] = node("VAEDecode", samples=["7", 0], vae=["1", 2])
    g["11"] = node("SaveImage", images=["10", 0], filename_prefix="reno_sampler")
    return g


def safety_guidance():
    """Guidance patch in front of a standard KSampler, and ReNO with a match plus an avoid reward."""
    prompt = "a crowded street festival at night"
    g = turbo_front(prompt, batch=2, seed=11)
    del g["5"], g["6"], g["7"]
    g.update({
        "9": node("LatentCLIPSafetyGuidance", "Steer away from concepts (every step)", model=["1", 0],
                  latent_clip=["8", 0], concepts="nudity\nblood", anchors="a fully clothed person", scale=0.05,
                  start_percent=0.0, end_percent=0.8, threshold=0.0),
        "10": node("KSampler", "Any sampler, any steps", model=["9", 0], seed=11, steps=4, cfg=1.0,
                   sampler_name="euler_ancestral", scheduler="sgm_uniform", positive=["2", 0], negative=["3", 0],
                   latent_image=["4", 0], denoise=1.0),
        "11": node("LatentCLIPGuidanceReport", "How often guidance fired", model=["9", 0], samples=["10", 0]),
        "12": node("PreviewAny", "Guidance report", source=["11", 0]),
        "13": node("VAEDecode", samples=["10", 0], vae=["1", 2]),
        "14": node("SaveImage", images=["13", 0], filename_prefix="safety_guided"),
        "15": node("LatentCLIPReward", "Match the prompt", latent_clip=["8", 0], text=prompt, mode="match", weight=0.01),
        "16": node("LatentCLIPReward", "Avoid the concepts", latent_clip=["8", 0], text="nudity\nblood", mode="avoid",
                   weight=0.01, reward=["15", 0]),
        "17": node("LatentCLIPReNO", "SDXL-Turbo ReNO: match + avoid", model=["1", 0], positive=["2", 0],
                   negative=["3", 0], latent_image=["4", 0], reward=["16", 0], seed=0, iterations=30,
                   learning_rate=5.0, optimizer="sgd", grad_clip=0.1, regularization=0.01, steps=1, cfg=1.0),
        "18": node("VAEDecode", samples=["17", 0], vae=["1", 2]),
        "19": node("SaveImage", images=["18", 0], filename_prefix="safety_reno"),
    })
    return g


WORKFLOWS = {
    "latent_clip_reno_sdxl_turbo": (lambda: reno(False), "ReNO on SDXL-Turbo with a Latent-CLIP reward: 50 iterations "
                                    "of noise optimisation, no VAE decode inside the loop. Compare with the pixel "
                                    "baseline workflow on the same seed."),
    "latent_clip_reno_pixel_baseline_sdxl_turbo": (lambda: reno(True), "ReNO's pixel-CLIP baseline: the same graph, "
                                                   "but every iteration decodes with the VAE and scores with an "
                                                   f"open_clip ViT-H-14 from models/open_clip/{PIXEL_CLIP}."),
    "latent_clip_reno_sampler_custom": (reno_sampler_custom, "ReNO as a SAMPLER for SamplerCustom with "
                                        "SDTurboScheduler sigmas (add_noise must stay on)."),
    "latent_clip_safety_guidance": (safety_guidance, "Two ways to steer away from concepts without decoding: a "
                                    "MODEL patch in front of KSampler (with a report), and SDXL-Turbo ReNO with a match "
                                    "reward plus an avoid reward."),
    "latent_clip_best_of_n_sdxl_turbo": (best_of_n, "Best-of-N without decoding: SDXL-Turbo makes 4 candidates, "
                                         "Latent-CLIP scores the latents and only the best is decoded."),
    "latent_clip_zero_shot": (zero_shot, "Zero-shot classification of latents straight from the sampler."),
    "latent_clip_safety_filter": (safety_filter, "Flags latents that show a listed concept and zeroes them "
                                  "before decoding. A score, not a guarantee: see the README's safety section."),
}

# -- inference-time search (issue 14) --------------------------------------------------------------
SDXL_BASE = "sd_xl_base_1.0.safetensors"


def _search_graph(ckpt, prompt, steps, cfg, scheduler, sampler_name, search, seed, prefix):
    """A SamplerCustom graph whose SAMPLER is LatentCLIPSearchSampler wrapping a KSamplerSelect sampler."""
    return {
        "1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
        "2": node("CLIPTextEncode", "Prompt", text=prompt, clip=["1", 1]),
        "3": node("CLIPTextEncode", "Negative", text="blurry, low quality", clip=["1", 1]),
        "4": node("EmptyLatentImage", width=1024, height=1024, batch_size=1),
        "5": node("KSamplerSelect", "Stepping between scoring points", sampler_name=sampler_name),
        "6": node("BasicScheduler", scheduler=scheduler, steps=steps, denoise=1.0, model=["1", 0]),
        "8": node("LatentCLIPLoader", "Load Latent-CLIP (models/latent_clip)", ckpt_name=LCLIP, device="default", dtype="auto"),
        "9": node("LatentCLIPReward", "Latent-CLIP reward (no decode)", latent_clip=["8", 0], text=prompt,
                  mode="match", weight=0.01),
        "10": node("LatentCLIPSearchSampler", "Search: particles steered by x0 rewards", reward=["9", 0],
                   sampler=["5", 0], **search),
        "7": node("SamplerCustom", add_noise=True, noise_seed=seed, cfg=cfg, model=["1", 0], positive=["2", 0],
                  negative=["3", 0], sampler=["10", 0], sigmas=["6", 0], latent_image=["4", 0]),
        "11": node("VAEDecode", "Decode only the winner", samples=["7", 0], vae=["1", 2]),
        "12": node("SaveImage", images=["11", 0], filename_prefix=prefix),
        "13": node("LatentCLIPSearchHistory", "Search history", sampler=["10", 0], samples=["7", 0]),
        "14": node("PreviewImage", "Rewards per step", images=["13", 1]),
        "15": node("PreviewAny", "History (JSON)", source=["13", 0]),
    }


def search_fk_sdxl():
    """SDXL base, 20 steps of euler_ancestral, 4 particles with FK steering every 2 steps."""
    return _search_graph(SDXL_BASE, "a red cube on top of a blue sphere, studio photo", 20, 6.0, "karras",
                         "euler_ancestral", dict(particles=4, strategy="fk_steering", potential="difference",
                                                 temperature=30.0, interval=2, start=0, prune_steps="", keep=0.5,
                                                 seed=0, max_batch=0, score_every_step=True), 3, "search_fk_sdxl")


def search_prune_turbo():
    """A few-step model (SDXL-Turbo; Lightning/DMD2/Hyper LoRAs alike): best-of-8 that halves after steps 1 and 2."""
    g = _search_graph(TURBO, "three yellow balloons above a blue car", 4, 1.0, "sgm_uniform", "lcm",
                      dict(particles=8, strategy="prune", potential="difference", temperature=30.0, interval=1,
                           start=1, prune_steps="1, 2", keep=0.5, seed=0, max_batch=0, score_every_step=True), 5,
                      "search_prune_turbo")
    g["4"]["inputs"].update(width=512, height=512)
    return g


WORKFLOWS.update({
    "latent_clip_search_fk_sdxl": (search_fk_sdxl, "Inference-time search on SDXL (20 steps, euler_ancestral): 4 "
                                   f"particles, FK steering every 2 steps from step 5 (start 0 = auto: a quarter of the steps) on Latent-CLIP rewards of x0 "
                                   f"predictions, no decode until the winner. models/checkpoints/{SDXL_BASE}."),
    "latent_clip_search_prune_turbo": (search_prune_turbo, "Few-step best-of-8 with pruning (SDXL-Turbo, 4 lcm steps): "
                                       "the worse half of the particles is dropped after steps 1 and 2, saving their "
                                       "remaining steps; only the winner is decoded."),
})

# The Templates browser shows the UI file's name as the card title: readable names, one per slug.
# A slug without a title here gets one made from the slug.
TITLES = {
    "latent_clip_best_of_n_sdxl_turbo": "Best of N without decoding - SDXL-Turbo",
    "latent_clip_zero_shot": "Zero-shot classification of latents",
    "latent_clip_safety_filter": "Safety filter on latents",
    "latent_clip_reno_sdxl_turbo": "ReNO with a Latent-CLIP reward - SDXL-Turbo",
    "latent_clip_reno_pixel_baseline_sdxl_turbo": "ReNO with the pixel-CLIP baseline reward - SDXL-Turbo",
    "latent_clip_reno_sampler_custom": "ReNO as a SamplerCustom sampler",
    "latent_clip_safety_guidance": "Safety guidance and ReNO avoid reward",
    "latent_clip_search_fk_sdxl": "Search with FK steering - SDXL 20 steps",
    "latent_clip_search_prune_turbo": "Search best-of-8 with pruning - SDXL-Turbo",
}


# -- "Start here": the mini-world, no downloads (issue 22) -----------------------------------------------
MINI_LCLIP = "mini/mini-latent-clip.safetensors"
MINI_PIXEL_CLIP = "mini/mini-pixel-clip.safetensors"
MINI_WHERE = ("No downloads: everything ships in the pack's weights/mini (a 64x64 world of coloured circles, squares "
              "and triangles; prompts like 'a red circle', 'two blue squares', 'a green triangle to the left of a "
              "yellow circle'). Runs in seconds on a CPU. The Mini-world Judge checks each image against the prompt "
              "by pixels, independently of every CLIP.")


def mini_front(prompt, batch=8, seed=0, sampler=True):
    """The mini generator (a rectified flow, 4 Euler steps, cfg 1), its text encoder, an empty 64x64 batch and the
    mini Latent-CLIP through the pack's own loader."""
    g = {
        "1": node("LatentCLIPMiniWorldLoader", "Load mini-world (no downloads)", world="mini"),
        "2": node("CLIPTextEncode", "Prompt (mini-world grammar)", text=prompt, clip=["1", 1]),
        "3": node("CLIPTextEncode", "Empty prompt (unconditional)", text="", clip=["1", 1]),
        "4": node("EmptyLatentImage", "64x64 batch", width=64, height=64, batch_size=batch),
        "8": node("LatentCLIPLoader", "Load the mini Latent-CLIP", ckpt_name=MINI_LCLIP, device="default", dtype="auto"),
    }
    if sampler:
        g["5"] = node("KSampler", "Mini generator, 4 steps", model=["1", 0], seed=seed, steps=4, cfg=1.0,
                      sampler_name="euler", scheduler="simple", positive=["2", 0], negative=["3", 0],
                      latent_image=["4", 0], denoise=1.0)
    return g


def see(g, first_id: int, latent, prompt, title, prefix=None):
    """Decode ``latent`` with the mini VAE, show the images and the judge's verdicts; returns the next free id."""
    g[str(first_id)] = node("VAEDecode", f"Decode: {title}", samples=latent, vae=["1", 2])
    g[str(first_id + 1)] = (node("SaveImage", title, images=[str(first_id), 0], filename_prefix=prefix) if prefix
                            else node("PreviewImage", title, images=[str(first_id), 0]))
    g[str(first_id + 2)] = node("LatentCLIPMiniWorldJudge", f"Judge: {title}", images=[str(first_id), 0], prompt=prompt)
    return first_id + 3


def start_score():
    prompt = "a blue triangle"
    g = mini_front(prompt, batch=8, seed=1)
    g.update({
        "9": node("LatentCLIPScore", "Score every latent (no decode)", latent_clip=["8", 0], samples=["5", 0], text=prompt),
        "10": node("PreviewAny", "Scores", source=["9", 1]),
        "11": node("LatentCLIPSelectBest", "Keep the best 2 (no decode)", latent_clip=["8", 0], samples=["5", 0],
                   text=prompt, k=2),
    })
    n = see(g, 12, ["5", 0], prompt, "all 8 candidates")
    see(g, n, ["11", 0], prompt, "the best 2 by Latent-CLIP", prefix="start_here_best")
    return g


def start_zero_shot():
    g = mini_front("a yellow object", batch=8, seed=2)
    g.update({
        "9": node("LatentCLIPZeroShot", "Which shape? (latents)", latent_clip=["8", 0], samples=["5", 0],
                  labels="circle\nsquare\ntriangle", template="a yellow {}"),
        "10": node("PreviewAny", "Shape per latent", source=["9", 0]),
        "11": node("VAEDecode", "Decode", samples=["5", 0], vae=["1", 2]),
        "12": node("PreviewImage", "The images", images=["11", 0]),
        "13": node("VAEEncode", "Encode the images again", pixels=["11", 0], vae=["1", 2]),
        "14": node("LatentCLIPZeroShot", "Which shape? (re-encoded)", latent_clip=["8", 0], samples=["13", 0],
                   labels="circle\nsquare\ntriangle", template="a yellow {}"),
        "15": node("PreviewAny", "Shape per re-encoded latent", source=["14", 0]),
    })
    return g


def start_safety():
    """'a red object' leaves the shape open: the generator draws a triangle in about 40% of its images."""
    prompt = "a red object"
    g = mini_front(prompt, batch=8, seed=SAFETY_SEED)
    g.update({
        "9": node("LatentCLIPSafetyFilter", "Flag triangles, blank them", latent_clip=["8", 0], samples=["5", 0],
                  concepts=SAFETY_FILTER_CONCEPT, threshold=0.5, action="replace with zeros"),
        "10": node("PreviewAny", "Filter report", source=["9", 3]),
        "11": node("LatentCLIPSafetyGuidance", "Steer away from triangles (every step)", model=["1", 0],
                   latent_clip=["8", 0], concepts="a triangle", anchors="a circle\na square", scale=SAFETY_SCALE,
                   start_percent=0.0, end_percent=1.0, threshold=0.0),
        "12": node("KSampler", "Same seed, guided", model=["11", 0], seed=SAFETY_SEED, steps=4, cfg=1.0,
                   sampler_name="euler", scheduler="simple", positive=["2", 0], negative=["3", 0], latent_image=["4", 0], denoise=1.0),
        "13": node("LatentCLIPGuidanceReport", "How often guidance fired", model=["11", 0], samples=["12", 0]),
        "14": node("PreviewAny", "Guidance report", source=["13", 0]),
    })
    n = see(g, 15, ["5", 0], prompt, "unguided")
    n = see(g, n, ["9", 0], prompt, "filtered (blank = flagged)")
    see(g, n, ["12", 0], prompt, "guided", prefix="start_here_guided")
    return g


def start_reno(pixel=False):
    prompt = RENO_PROMPT
    g = mini_front(prompt, batch=4, seed=0, sampler=False)
    if pixel:
        g["9"] = node("LatentCLIPPixelReward", "Pixel-CLIP reward (decodes every iteration)", clip_name=MINI_PIXEL_CLIP,
                      model_name="", vae=["1", 2], text=prompt, weight=0.01)
    else:
        g["9"] = node("LatentCLIPReward", "Latent-CLIP reward (no decode)", latent_clip=["8", 0], text=prompt,
                      mode="match", weight=0.01)
    g["10"] = node("LatentCLIPReNO", "ReNO: optimise the initial noise", model=["1", 0], positive=["2", 0],
                   negative=["3", 0], latent_image=["4", 0], reward=["9", 0], seed=0, iterations=RENO_ITERATIONS,
                   learning_rate=0.0, optimizer="sgd", grad_clip=0.1, regularization=0.01,
                   gradient_checkpointing=False, steps=4, cfg=1.0)
    g["11"] = node("PreviewImage", "Reward per iteration", images=["10", 3])
    g["12"] = node("PreviewAny", "History (JSON)", source=["10", 2])
    n = see(g, 13, ["10", 1], prompt, "initial noise")
    see(g, n, ["10", 0], prompt, "after ReNO", prefix="start_here_reno_pixel" if pixel else "start_here_reno")
    return g


def start_reno_sampler():
    prompt = "two yellow circles"
    g = mini_front(prompt, batch=4, seed=4, sampler=False)
    g.update({
        "9": node("LatentCLIPReward", "Latent-CLIP reward", latent_clip=["8", 0], text=prompt, mode="match", weight=0.01),
        "5": node("LatentCLIPReNOSampler", "ReNO sampler", reward=["9", 0], seed=0, iterations=RENO_ITERATIONS,
                  learning_rate=0.0, optimizer="sgd", grad_clip=0.1, regularization=0.01, gradient_checkpointing=False),
        "6": node("BasicScheduler", "4 steps", scheduler="simple", steps=4, denoise=1.0, model=["1", 0]),
        "7": node("SamplerCustom", "SamplerCustom with the ReNO sampler", add_noise=True, noise_seed=4, cfg=1.0,
                  model=["1", 0], positive=["2", 0], negative=["3", 0], sampler=["5", 0], sigmas=["6", 0],
                  latent_image=["4", 0]),
    })
    see(g, 10, ["7", 0], prompt, "ReNO sampler result", prefix="start_here_reno_sampler")
    return g


def start_search():
    """The three strategies side by side on one prompt, 8 particles over 8 steps each: 64 model rows per image for
    best-of-8 and FK steering, 38 for prune (half the particles dropped after steps 3 and 5)."""
    prompt = "a red triangle to the left of a blue circle"
    g = mini_front(prompt, batch=2, seed=SEARCH_SEED, sampler=False)
    g.update({
        "5": node("KSamplerSelect", "Stochastic stepping", sampler_name="euler_ancestral"),
        "6": node("BasicScheduler", "8 steps", scheduler="simple", steps=8, denoise=1.0, model=["1", 0]),
        "9": node("LatentCLIPReward", "Latent-CLIP reward (no decode)", latent_clip=["8", 0], text=prompt,
                  mode="match", weight=0.01),
    })
    n = 10
    for strategy, extra in (("best_of_n", {}), ("prune", {"prune_steps": "3, 5"}), ("fk_steering", {"start": 2})):
        settings = dict(particles=8, strategy=strategy, potential="difference", temperature=30.0, interval=1, start=0,
                        prune_steps="", keep=0.5, seed=0, max_batch=0, score_every_step=True)
        settings.update(extra)
        g[str(n)] = node("LatentCLIPSearchSampler", f"Search: {strategy}", reward=["9", 0], sampler=["5", 0], **settings)
        g[str(n + 1)] = node("SamplerCustom", f"SamplerCustom ({strategy})", add_noise=True, noise_seed=SEARCH_SEED,
                             cfg=1.0, model=["1", 0], positive=["2", 0], negative=["3", 0], sampler=[str(n), 0],
                             sigmas=["6", 0], latent_image=["4", 0])
        g[str(n + 2)] = node("LatentCLIPSearchHistory", f"History ({strategy})", sampler=[str(n), 0],
                             samples=[str(n + 1), 0])
        g[str(n + 3)] = node("PreviewImage", f"Rewards per step ({strategy})", images=[str(n + 2), 1])
        n = see(g, n + 4, [str(n + 1), 0], prompt, f"{strategy} winners")
    return g


#: Measured settings (docs/miniworld_comfyui.md): the guidance scale and ReNO's iterations on the mini-world.
SAFETY_SCALE = 1.0
RENO_ITERATIONS = 15
# The cards' seeds and prompts, each picked by the rule its note states (docs/miniworld_comfyui.md has the counts over
# more seeds; tests/comfy/test_review_workflow_fixes.py runs each card and checks what its note says).
#: The Safety card's seed: the first from 0 at which guidance lowers the number of images with a triangle (seed 0:
#: 3 -> 3). The filter's concept: the plural, the best of four phrasings measured on seeds 0-11 ("a triangle" flags
#: 90 of 96 images; "triangles" 37, 36 of them with a triangle, of 42 with one).
SAFETY_SEED = 1
SAFETY_FILTER_CONCEPT = "triangles"
#: The ReNO cards' prompt: the one tests/comfy/test_miniworld_semantics.py measures ReNO on; the seed stays 0.
RENO_PROMPT = "two blue triangles"
#: The Search card's seed: the first from 0 at which FK steering draws the prompt in both images.
SEARCH_SEED = 2
START_HERE = {
    "latent_clip_start_score": (start_score, "Start here. The mini generator makes 8 latents for the prompt; "
                                "Latent-CLIP scores them without decoding and keeps the best 2."),
    "latent_clip_start_zero_shot": (start_zero_shot, "Zero-shot: which shape is in each latent, read by the "
                                    "Latent-CLIP from the generator's latents and from VAE-encoded images."),
    "latent_clip_start_safety": (start_safety, "Safety on latents: 'a red object' often comes out as a triangle. "
                                 f"The filter (concept '{SAFETY_FILTER_CONCEPT}') flags and blanks triangles after "
                                 "sampling; the guidance patch steers the same seeds away from triangles while "
                                 f"sampling (with a report). On this card's seed ({SAFETY_SEED}, the first from 0 at "
                                 "which guidance lowers the count; seed 0 stays at 3 -> 3): 5 of the 8 unguided images "
                                 "show a triangle, 3 of the guided ones; the filter flags and blanks 4 images, all with a "
                                 "triangle (it misses one). Over seeds 0-11 (96 images) the filter flagged 37 images, "
                                 "36 of them with a triangle, of the 42 with one. The guidance over 32 seeds: "
                                 "docs/miniworld_comfyui.md."),
    "latent_clip_start_reno": (lambda: start_reno(False), "ReNO with a Latent-CLIP reward: the initial noise of 4 "
                               "images is optimised so that the 4-step generator draws the prompt; no decode in the "
                               "loop. Compare 'initial noise' with 'after ReNO': on this card's seed (0) the Judge "
                               "finds 2/4 images right before ReNO and 3/4 after. Over seeds 0-9 (40 images): 24 "
                               "right before, 39 after."),
    "latent_clip_start_reno_pixel": (lambda: start_reno(True), "ReNO with the pixel-CLIP baseline reward: the same "
                                     "loop, but every iteration decodes with the mini VAE and scores with the mini "
                                     "pixel CLIP. On this card's seed (0) the Judge finds 2/4 images right before "
                                     "ReNO and 4/4 after. Over seeds 0-9 (40 images): 24 right before, 38 after."),
    "latent_clip_start_reno_sampler": (start_reno_sampler, "ReNO as a SAMPLER inside SamplerCustom (add_noise on), "
                                       "with the generator's own 4-step schedule."),
    "latent_clip_start_search": (start_search, "Inference-time search with each strategy: best-of-8, prune and FK "
                                 "steering, 8 particles over 8 steps each, steered by Latent-CLIP rewards of x0 "
                                 "predictions; each with its reward history. Model rows per image: 64 for best-of-8 "
                                 "and FK steering (8 x 8), 38 for prune (it drops half the particles after steps 3 "
                                 f"and 5). On this card's seed ({SEARCH_SEED}, the first from 0 at which FK steering "
                                 "draws both images right) the Judge finds best-of-8 0/2, prune 0/2, FK steering 2/2. "
                                 "Over seeds 0-11 (24 images): best-of-8 2, prune 3, FK steering 11."),
}
START_TITLES = {
    "latent_clip_start_score": "Start here 1 - Score and pick the best (mini-world, no downloads)",
    "latent_clip_start_zero_shot": "Start here 2 - Zero-shot classification (mini-world)",
    "latent_clip_start_safety": "Start here 3 - Safety filter and guidance (mini-world)",
    "latent_clip_start_reno": "Start here 4 - ReNO with a Latent-CLIP reward (mini-world)",
    "latent_clip_start_reno_pixel": "Start here 5 - ReNO with the pixel-CLIP reward (mini-world)",
    "latent_clip_start_reno_sampler": "Start here 6 - ReNO sampler in SamplerCustom (mini-world)",
    "latent_clip_start_search": "Start here 7 - Search, every strategy (mini-world)",
}
WORKFLOWS = {**START_HERE, **WORKFLOWS}
TITLES.update(START_TITLES)


def title_of(slug: str) -> str:
    return TITLES.get(slug) or slug.removeprefix("latent_clip_").replace("_", " ").capitalize()


_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def _order(graph):
    """Topological depth of each node, for a left-to-right layout and execution order."""
    depth = {}

    def visit(nid):
        if nid not in depth:
            deps = [v[0] for v in graph[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((visit(d) for d in deps), default=-1)
        return depth[nid]

    for nid in graph:
        visit(nid)
    return depth


# Front-end geometry (LiteGraph as ComfyUI's front end draws it): title bar, slot row, widget row, and
# the extra height of a multiline text box. Sizes below are upper bounds of what the front end computes.
TITLE_H, SLOT_H, WIDGET_H, MULTILINE_H, PAD_H = 30, 20, 24, 56, 26
COL_GAP, ROW_GAP, NOTE_W, NOTE_H = 60, 40, 420, 260
FRONTEND_WIDGETS = {"PreviewAny": 1}   # widgets the front end adds (a multiline preview box)
# Room the nodes take once a run has filled them, reserved in the saved size so that nothing covers a node below
# after Run. Measured in front end 1.27.10 (headless Chromium, nodes 320 px wide): a PreviewImage of 8 mini-world
# images (64x64) grows to 246 px of body, a SaveImage of 2 to 270 px; the reserve is 300 px of body for either.
# The pack's nodes that report text get it in a read-only text box (web/js/show_text.js) on their first result: it
# needs 42 px more at least; TEXT_RESERVE_H leaves room for a few lines of it.
IMAGE_NODES = ("PreviewImage", "SaveImage")
IMAGE_RESERVE_H = 300
TEXT_NODES = ("LatentCLIPScore", "LatentCLIPZeroShot", "LatentCLIPSelectBest", "LatentCLIPSafetyFilter",
              "LatentCLIPGuidanceReport", "LatentCLIPReNO", "LatentCLIPSearchHistory", "LatentCLIPMiniWorldJudge",
              "LatentCLIPHeadScore")   # the nodes returning ui.PreviewText
TEXT_RESERVE_H = 120


def node_size(ui_node: dict, info_node: dict) -> list:
    """[width, height] of the node body, at least what the front end computes for it."""
    rows = multiline = 0
    for section in ("required", "optional"):
        for name in info_node["input_order"].get(section, []):
            spec = info_node["input"][section][name]
            if not _is_widget(spec):
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            rows += 1 + bool(opts.get("control_after_generate") or name in ("seed", "noise_seed"))
            multiline += bool(opts.get("multiline"))
    extra = FRONTEND_WIDGETS.get(ui_node["type"], 0)
    rows, multiline = rows + extra, multiline + extra
    slots = max(len(ui_node["inputs"]), len(ui_node["outputs"]))
    height = SLOT_H * slots + WIDGET_H * rows + MULTILINE_H * multiline + PAD_H
    height += TEXT_RESERVE_H if ui_node["type"] in TEXT_NODES else 0
    height = max(height, IMAGE_RESERVE_H if ui_node["type"] in IMAGE_NODES else 60)
    width = max(320, 7 * len(ui_node["title"]) + 70)
    return [width, height]


def after_run_size(ui_node: dict) -> list:
    """[width, height] of a node's body at least once a run has filled it: what a layout must keep free below it."""
    w, h = ui_node["size"]
    if ui_node["type"] in IMAGE_NODES:
        h = max(h, IMAGE_RESERVE_H)
    return [w, h]


def overlaps(ui: dict) -> list:
    """Pairs of node ids whose boxes (title bar included, each at its after-run size) cover each other."""
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_H, *after_run_size(n)) for n in ui["nodes"]]
    boxes = [(i, x, y, w, h + TITLE_H) for i, x, y, w, h in boxes]
    return [(a[0], b[0]) for k, a in enumerate(boxes) for b in boxes[k + 1:]
            if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]


def layout(nodes: list, depth: dict) -> None:
    """Columns by graph depth, right of the note; rows stacked by each node's drawn height (title included)."""
    x = 40 + NOTE_W + COL_GAP
    for d in sorted(set(depth.values())):
        column = [n for n in nodes if depth[str(n["id"])] == d]
        y = 40 + TITLE_H
        for n in column:
            n["pos"] = [x, y]
            y += n["size"][1] + TITLE_H + ROW_GAP
        x += max(n["size"][0] for n in column) + COL_GAP


def to_ui(graph: dict, info: dict, note: str, api_path: str = "") -> dict:
    depth = _order(graph)
    nodes, links = [], []
    by_id = {}
    for nid in sorted(graph, key=lambda n: (depth[n], int(n))):
        spec = graph[nid]
        ni = info[spec["class_type"]]
        ui_node = {"id": int(nid), "type": spec["class_type"], "pos": [0, 0], "size": [0, 0], "flags": {},
                   "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                   "title": spec["_meta"]["title"], "properties": {"Node name for S&R": spec["class_type"]},
                   "widgets_values": []}
        for section in ("required", "optional"):
            for name in ni["input_order"].get(section, []):
                s = ni["input"][section][name]
                value = spec["inputs"].get(name)
                if _is_widget(s):
                    if name not in spec["inputs"]:
                        continue
                    ui_node["widgets_values"].append(value)
                    opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
                    if opts.get("control_after_generate") or name in ("seed", "noise_seed"):
                        ui_node["widgets_values"].append("fixed")
                else:
                    ui_node["inputs"].append({"name": name, "type": s[0], "link": None})
        for slot, (otype, oname) in enumerate(zip(ni["output"], ni["output_name"])):
            ui_node["outputs"].append({"name": oname, "type": otype, "links": [], "slot_index": slot})
        ui_node["size"] = node_size(ui_node, ni)
        by_id[nid] = ui_node
        nodes.append(ui_node)
    layout(nodes, depth)
    for nid, spec in graph.items():
        for name, value in spec["inputs"].items():
            if not isinstance(value, list):
                continue
            src, slot = value
            link_id = len(links) + 1
            target = next(i for i, inp in enumerate(by_id[nid]["inputs"]) if inp["name"] == name)
            by_id[nid]["inputs"][target]["link"] = link_id
            by_id[src]["outputs"][slot]["links"].append(link_id)
            links.append([link_id, int(src), slot, int(nid), target, by_id[src]["outputs"][slot]["type"]])
    note_id = max(int(n) for n in graph) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [40, 40 + TITLE_H], "size": [NOTE_W, NOTE_H],
                  "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "title": "Read me",
                  "properties": {}, "widgets_values": [note + "\n\n" + (MINI_WHERE if "LatentCLIPMiniWorldLoader" in
                                                                          {n["class_type"] for n in graph.values()} else where(graph))]})
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]},
                                                   "latentclip": {"api": api_path}}, "version": 0.4}


# -- thumbnails -----------------------------------------------------------------------------------
THUMB_W, THUMB_H, BANNER_H = 800, 600, 110
_PACK_NODE = ("LatentCLIP", "PixelCLIP")


def _font(size: int, bold: bool = False):
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list:
    lines, line = [], ""
    for word in text.split():
        if line and draw.textlength(line + " " + word, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = (line + " " + word).strip()
    return lines + ([line] if line else [])


def thumbnail(ui: dict, title: str) -> Image.Image:
    """The card picture: the workflow's title above a drawing of its graph (this pack's nodes in violet)."""
    img = Image.new("RGB", (THUMB_W, THUMB_H), (30, 32, 38))
    draw = ImageDraw.Draw(img)
    font = _font(34, bold=True)
    for i, line in enumerate(_wrap(draw, title, font, THUMB_W - 40)[:2]):
        draw.text((20, 14 + 42 * i), line, fill=(238, 238, 242), font=font)
    nodes = [n for n in ui["nodes"] if n["type"] != "Note"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] - TITLE_H for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    scale = min((THUMB_W - 40) / (x1 - x0), (THUMB_H - BANNER_H - 20) / (y1 - y0))
    ox = 20 + (THUMB_W - 40 - scale * (x1 - x0)) / 2
    oy = BANNER_H + (THUMB_H - BANNER_H - 20 - scale * (y1 - y0)) / 2

    def at(x, y):
        return ox + scale * (x - x0), oy + scale * (y - y0)

    by_id = {n["id"]: n for n in nodes}
    for _, src, slot, dst, target, _t in ui["links"]:
        a, b = by_id[src], by_id[dst]
        p = at(a["pos"][0] + a["size"][0], a["pos"][1] + SLOT_H * (slot + 0.5))
        q = at(b["pos"][0], b["pos"][1] + SLOT_H * (target + 0.5))
        draw.line([p, ((p[0] + q[0]) / 2, p[1]), ((p[0] + q[0]) / 2, q[1]), q], fill=(120, 126, 140), width=2)
    small = _font(12)
    for n in nodes:
        ours = n["type"].startswith(_PACK_NODE)
        top = at(n["pos"][0], n["pos"][1] - TITLE_H)
        bottom = at(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        title_bottom = at(n["pos"][0], n["pos"][1])[1]
        draw.rounded_rectangle([top, bottom], radius=4, fill=(52, 54, 62), outline=(150, 110, 230) if ours else (90, 94, 104),
                               width=2)
        draw.rectangle([top[0] + 2, top[1] + 2, bottom[0] - 2, title_bottom], fill=(96, 66, 160) if ours else (66, 70, 80))
        label = n.get("title") or n["type"]
        width = bottom[0] - top[0] - 8
        if draw.textlength(label, font=small) > width:
            while label and draw.textlength(label + "…", font=small) > width:
                label = label[:-1]
            label = label.rstrip() + "…"
        draw.text((top[0] + 4, top[1] + 3), label, fill=(240, 240, 245), font=small)
    return img


def _clear(folder: Path, patterns) -> None:
    for pattern in patterns:
        for path in folder.glob(pattern):
            path.unlink()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="a running ComfyUI with this pack, e.g. http://127.0.0.1:8188")
    parser.add_argument("--out", default=str(REPO / "example_workflows"), help="UI cards with pictures")
    parser.add_argument("--api-out", default=str(REPO / API_DIR), help="API-format graphs")
    args = parser.parse_args(argv)
    with urllib.request.urlopen(args.server.rstrip("/") + "/object_info", timeout=60) as r:
        info = json.load(r)
    out, api_out = Path(args.out), Path(args.api_out)
    out.mkdir(parents=True, exist_ok=True)
    api_out.mkdir(parents=True, exist_ok=True)
    _clear(out, ("*.json", "*.jpg"))
    _clear(api_out, ("*.json",))
    for slug, (build, note) in WORKFLOWS.items():
        graph = build()
        missing = sorted({s["class_type"] for s in graph.values()} - set(info))
        if missing:
            raise SystemExit(f"{slug}: the server lacks nodes {missing}")
        title = title_of(slug)
        (api_out / f"{slug}.json").write_text(json.dumps(graph, indent=2) + "\n")
        ui = to_ui(graph, info, note, api_path=f"{API_DIR}/{slug}.json")
        if overlaps(ui):
            raise SystemExit(f"{slug}: nodes cover each other once run: {overlaps(ui)}")
        (out / f"{title}.json").write_text(json.dumps(ui, indent=2) + "\n")
        thumbnail(ui, title).save(out / f"{title}.jpg", quality=88, optimize=True)
        print(f"wrote {out / title}.json, .jpg and {api_out / slug}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
