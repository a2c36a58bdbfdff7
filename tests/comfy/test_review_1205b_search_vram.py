"""Review 1205b, the Search Sampler on a tight card: its reward models are loaded in ONE ``load_models_gpu`` list
with the UNet that sampling loaded, with a memory request for the search's working memory (docs/search.md,
"Memory"), as ReNO does.

Before, ``ParticleRun`` built its reward with ``build_reward``, which loaded the reward models alone (then each
Latent-CLIP and pixel CLIP again through ``load_for_grad``) after sampling had loaded the UNet. In ComfyUI a load of
other models frees memory for them (``free_memory`` may pick the UNet in use) and does not load the UNet back, so the
search then ran with (part of) the UNet offloaded: weights cast per layer from the CPU, or a crash.

(a) Every ``load_models_gpu`` call of a search run is recorded (Latent-CLIP, pixel-CLIP and head terms).
(b) A tight card is emulated: the UNet and the Latent-CLIP load onto a stand-in device, ``cpu:0`` (model
management treats it as a device of its own, so it frees memory there; tensors stay on the CPU, so everything still
runs), whose free memory is its capacity less the weights loaded there. The UNet's loaded bytes are recorded at
every model call.
"""
import sys

import pytest
import torch

from conftest import tiny_conditioning, tiny_reward_latent_clip, tiny_sdxl
from test_review_1204e_search_sampler import pixel_vae  # noqa: F401  (fixture: the tiny TAESD VAE)
from test_search_nodes import handle, reward_of, search_sampler  # noqa: F401  (module-scoped tiny Latent-CLIP)

STAND_IN = torch.device("cpu", 0)
BATCH = 2
PARTICLES = 3


def run(comfy, model, sampler, batch=BATCH, seed=9):
    sigmas = comfy.run_node("BasicScheduler", model=model, scheduler="karras", steps=4, denoise=1.0)[0]
    return comfy.run_node("SamplerCustom", model=model, add_noise=True, noise_seed=seed, cfg=1.5,
                          positive=tiny_conditioning(1, batch), negative=tiny_conditioning(2, batch), sampler=sampler,
                          sigmas=sigmas, latent_image={"samples": torch.zeros(batch, 4, 32, 32)})[0]["samples"]


def recording_loads(monkeypatch):
    import comfy.model_management as mm
    calls, real = [], mm.load_models_gpu

    def recording(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                  force_full_load=False):
        calls.append({"models": list(models), "memory_required": memory_required,
                      "minimum_memory_required": minimum_memory_required, "force_full_load": force_full_load})
        return real(models, memory_required, force_patch_weights, minimum_memory_required, force_full_load)
    monkeypatch.setattr(mm, "load_models_gpu", recording)
    return calls


def full_chain(comfy, handle, vae):  # noqa: F811
    """Latent-CLIP match + pixel CLIP (TAESD + ViT-S-32) + head: every kind of reward model."""
    from test_head_nodes import head_file
    from test_review_1204e_search_sampler import pixel_reward
    from latentclip.heads import Head
    torch.manual_seed(7)
    name = head_file(comfy, "tiny-1205b-head.safetensors", lambda: Head(32, ["plain", "busy"], 8, "test attribute", "tiny"))
    return comfy.run_node("LatentCLIPHeadReward", latent_clip=handle, head_name=name, label="busy", mode="increase",
                          weight=1.0, reward=pixel_reward(comfy, handle, vae)).result[0]


def test_every_reward_model_is_loaded_in_one_call_with_the_unet_and_a_memory_request(comfy, handle, pixel_vae,  # noqa: F811
                                                                                      monkeypatch):
    reno = sys.modules[comfy.node("LatentCLIPReward").__module__]
    search = sys.modules[comfy.node("LatentCLIPSearchSampler").__module__]
    particles = sys.modules[search.__name__.rsplit(".", 1)[0] + ".search_particles"]
    reward = full_chain(comfy, handle, pixel_vae)
    pixels = reno.pixel_handles(reward)
    rewards = reno.reward_patchers(reward, pixels)
    assert len(rewards) == 4          # Latent-CLIP, pixel CLIP, VAE, the head's Latent-CLIP (the same one)
    model = tiny_sdxl()
    calls = recording_loads(monkeypatch)
    run(comfy, model, search_sampler(comfy, reward, "euler_ancestral", particles=PARTICLES))
    with_rewards = [c for c in calls if any(m is r for m in c["models"] for r in rewards)]
    # before: [VAE, pixel CLIP, Latent-CLIP] alone (build_reward), then the Latent-CLIP and the pixel CLIP alone again
    assert len(with_rewards) == 1, [[type(m.model).__name__ for m in c["models"]] for c in with_rewards]
    call = with_rewards[0]
    assert all(any(m is r for m in call["models"]) for r in rewards)
    assert any(m.model is model.model for m in call["models"]), "the UNet is not in the reward models' load list"
    # the request: at least what sampling asked for the UNet (ComfyUI's estimate for the batch, with and
    # without its uncond rows), and at least the scoring of one slot (one decode of BATCH images)
    shape = [BATCH, 4, 32, 32]
    assert call["memory_required"] >= model.model.memory_required([2 * BATCH, *shape[1:]])
    assert call["minimum_memory_required"] >= model.model.memory_required(shape)
    assert call["minimum_memory_required"] >= BATCH * pixel_vae.memory_used_decode([1, *shape[1:]], pixel_vae.vae_dtype)
    assert call["memory_required"] >= call["minimum_memory_required"] > 0
    assert not call["force_full_load"]          # the UNet may stay partly loaded; the CLIPs load whole anyway
    assert call["minimum_memory_required"] >= particles.scoring_memory(reward, pixels, shape, PARTICLES)


def test_the_scoring_request_covers_what_scoring_all_particles_holds(comfy, handle):  # noqa: F811
    """A Latent-CLIP reward scores every particle in one forward: the request covers it (measured with torch's
    profiler on the CPU, the tiny Latent-CLIP at 32x32 latents), and stays a request, not a refusal to run."""
    from latentclip.memory_probe import peak_bytes
    search = sys.modules[comfy.node("LatentCLIPSearchSampler").__module__]
    particles = sys.modules[search.__name__.rsplit(".", 1)[0] + ".search_particles"]
    reno = sys.modules[comfy.node("LatentCLIPReward").__module__]
    reward = reward_of(comfy, handle)
    n = 16
    terms, _ = reno.build_reward(reward, tiny_sdxl().model, 1)
    score = particles.reward_scorer(terms, 1)
    x0 = torch.randn(n, 4, 32, 32)
    score(x0)                                                       # warm-up
    held = peak_bytes(lambda: score(x0), "cpu")
    asked = particles.scoring_memory(reward, {}, [1, 4, 32, 32], n)
    print(f"\nscoring {n} particles: {held / 2**20:.2f} MiB held, {asked / 2**20:.2f} MiB asked")
    assert held <= asked <= 4 * held


@pytest.fixture
def tight_card(comfy, monkeypatch):
    """A stand-in device (``cpu:0``) of ``card["capacity"]`` bytes: free memory is the capacity less the weights of
    ``card["models"]`` loaded there (their ``model_loaded_weight_memory``, ComfyUI's own count)."""
    import comfy.model_management as mm
    card = {"capacity": float("inf"), "models": []}
    real = mm.get_free_memory

    def free(dev=None, torch_free_too=False):
        if dev is None or torch.device(dev) != STAND_IN:
            return real(dev, torch_free_too)
        used = sum(getattr(m, "model_loaded_weight_memory", 0) for m in card["models"])
        f = card["capacity"] - used
        return (f, f) if torch_free_too else f
    monkeypatch.setattr(mm, "get_free_memory", free)
    yield card
    mm.free_memory(1e30, STAND_IN)     # nothing of this test stays in model management's list


def stand_in_models(comfy):
    """The tiny SDXL and a tiny reward Latent-CLIP, both loading onto the stand-in device."""
    import comfy.model_patcher as model_patcher
    bridge = sys.modules[sys.modules[comfy.node("LatentCLIPReward").__module__].__name__.rsplit(".", 1)[0] + ".comfy_bridge"]
    unet = model_patcher.ModelPatcher(tiny_sdxl().model, load_device=STAND_IN, offload_device=torch.device("cpu"))
    with torch.inference_mode(False):
        latent_clip = tiny_reward_latent_clip(seed=3)
    handle = bridge.LatentCLIPHandle(latent_clip, STAND_IN, torch.device("cpu"), "stand-in.safetensors")  # noqa: F811
    return unet, handle


def watched(unet, loaded):
    """A clone of ``unet`` that records, at every UNet call, the bytes of its weights loaded on the device."""
    clone = unet.clone()

    def record(apply_model, args):
        loaded.append((unet.model.model_loaded_weight_memory, bool(unet.model.model_lowvram)))
        return apply_model(args["input"], args["timestep"], **args["c"])
    clone.set_model_unet_function_wrapper(record)
    return clone


def test_a_tight_card_keeps_the_unet_loaded_while_the_search_samples(comfy, tight_card):
    """The card holds the UNet; the reward's Latent-CLIP fits beside it only if half of the UNet goes. Loaded alone
    (before), the reward models made model management offload the UNet (all of it, over the successive loads) for
    the whole search. Loaded in one list with it, the UNet stays: ComfyUI takes the models of the list it loads out
    of its list of loaded models before it frees memory, and loads all of them."""
    import comfy.model_management as mm
    unet, stand_in = stand_in_models(comfy)
    tight_card["models"] = [unet.model, stand_in.patcher.model]
    reward = reward_of(comfy, stand_in)
    tight = unet.model_size() / 2 + 1.1 * stand_in.patcher.model_size() + mm.minimum_inference_memory()

    def search(capacity, **kw):
        mm.free_memory(1e30, STAND_IN)        # a fresh start: nothing loaded on the card
        tight_card["capacity"], calls = capacity, []
        out = run(comfy, watched(unet, calls), search_sampler(comfy, reward, "euler_ancestral", **kw))
        return out, calls

    full = []
    expected = run(comfy, watched(unet, full), comfy.run_node("KSamplerSelect", sampler_name="euler_ancestral")[0])
    assert full and all(f == full[0] for f in full) and full[0][0] > 0 and not full[0][1]
    one, calls = search(tight, particles=1, strategy="best_of_n")
    assert calls and all(c == full[0] for c in calls), f"UNet (loaded bytes, lowvram) at its calls: {sorted(set(calls))}"
    assert torch.equal(one, expected)         # one particle is the plain sampler, loads change nothing computed
    ample, _ = search(float("inf"), particles=PARTICLES)
    again, calls = search(tight, particles=PARTICLES)
    assert calls and all(c == full[0] for c in calls), sorted(set(calls))
    assert torch.equal(again, ample)
