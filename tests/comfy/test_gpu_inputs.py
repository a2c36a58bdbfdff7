"""ReNO and the grad models with what a GPU and users' graphs bring (in-process ComfyUI).

Placement: ComfyUI's ModelPatcher loads onto ``torch.device("meta")`` standing in for a GPU, fully
and partially (lowvram); a forward pass on meta inputs fails as soon as it reads a tensor left on the
CPU. ReNO inputs: an inpainting noise_mask, SamplerCustom's add_noise off, Adam's own default
learning rate, a LoRA-patched MODEL and a ControlNet in the conditioning, under emulated GPU moves
(gpu_emulation.py). And ``grad_through_comfy_ops`` restoring everything when a clone fails.
"""
import json
import math
import sys

import open_clip
import pytest
import torch

import latentclip
from conftest import tiny_conditioning, tiny_latent_clip, tiny_reward_handle, tiny_sdxl
from gpu_emulation import emulated_moves

META, CPU = torch.device("meta"), torch.device("cpu")


def tiny_pixel_clip(seed=1):
    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval().requires_grad_(False)


def bridge(comfy):
    """The pack's nodes/comfy_bridge.py as ComfyUI's loader imported it."""
    reno = sys.modules[comfy.node("LatentCLIPReNO").__module__]
    return sys.modules[reno.__name__.rsplit(".", 1)[0] + ".comfy_bridge"]


def _forward_on_meta(model):
    """The forward passes the rewards and guidance run, on meta inputs (shape-only, device-checked)."""
    clip = model.clip if isinstance(model, latentclip.LatentCLIP) else model
    channels = clip.visual.conv1.in_channels
    side = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size
    image = clip.encode_image(torch.empty(2, channels, side, side, device=META))
    text = clip.encode_text(torch.zeros(3, 77, dtype=torch.long, device=META))
    return image.device, text.device, clip.logit_scale.exp().device


def _devices(model):
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


@pytest.mark.parametrize("make", [lambda: tiny_latent_clip(seed=1), tiny_pixel_clip], ids=["latent_clip", "pixel_clip"])
@pytest.mark.parametrize("lowvram_bytes", [0, 1, 20_000], ids=["full", "lowvram-1B", "lowvram-20kB"])
def test_whole_model_patcher_puts_every_tensor_the_forward_reads_on_the_load_device(comfy, make, lowvram_bytes):
    WholeModelPatcher = bridge(comfy).WholeModelPatcher
    model = make()
    patcher = WholeModelPatcher(model, load_device=META, offload_device=CPU)
    patcher.load(META, lowvram_model_memory=lowvram_bytes)
    assert _devices(model) == {META}
    assert _forward_on_meta(model) == (META, META, META)
    assert patcher.partially_unload(CPU, memory_to_free=10_000) == 0 and _devices(model) == {META}   # all or nothing


@pytest.mark.parametrize("make", [lambda: tiny_latent_clip(seed=1), tiny_pixel_clip], ids=["latent_clip", "pixel_clip"])
def test_a_plain_model_patcher_partial_load_leaves_weights_behind(comfy, make):
    """Why the handles force full loads: ComfyUI's partial load skips parameters of non-leaf modules."""
    import comfy.model_patcher
    model = make()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=META, offload_device=CPU)
    patcher.load(META, lowvram_model_memory=20_000)
    clip = model.clip if isinstance(model, latentclip.LatentCLIP) else model
    assert clip.logit_scale.device == CPU and clip.positional_embedding.device == CPU
    with pytest.raises((RuntimeError, NotImplementedError)):
        _forward_on_meta(model)


# -- ReNO inputs -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reno_reward(comfy):
    handle = tiny_reward_handle(comfy, "tiny-reno.safetensors")
    return handle, comfy.run_node("LatentCLIPReward", latent_clip=handle, text="a red fox", mode="match",
                                  weight=0.01).result[0]


def run_reno(comfy, model, reward, latent, positive=None, **kw):
    args = dict(model=model, positive=positive or tiny_conditioning(1, 1), negative=tiny_conditioning(2, 1),
                latent_image=latent, reward=reward, seed=5, iterations=3, learning_rate=5.0, optimizer="sgd",
                grad_clip=0.1, regularization=0.01, steps=1, cfg=1.0)
    args.update(kw)
    best, initial, history, _ = comfy.run_node("LatentCLIPReNO", **args).result
    return best, initial, json.loads(history)


def test_noise_mask_keeps_the_unmasked_region_as_in_the_input(comfy, reno_reward):
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 32, 32)
    mask[:, :, 16:] = 1.0   # only the right half may change
    with emulated_moves():
        best, initial, summary = run_reno(comfy, tiny_sdxl(), reno_reward[1], {"samples": x, "noise_mask": mask})
    assert torch.allclose(best["samples"][..., :16], x[..., :16], atol=1e-5)
    assert torch.allclose(initial["samples"][..., :16], x[..., :16], atol=1e-5)
    assert (best["samples"][..., 16:] - x[..., 16:]).abs().mean() > 0.1
    assert summary["best_loss"][0] < summary["initial_loss"][0]


def test_add_noise_off_is_a_clear_error(comfy, reno_reward):
    sampler = comfy.run_node("LatentCLIPReNOSampler", reward=reno_reward[1], seed=0, iterations=2, learning_rate=5.0,
                             optimizer="sgd", grad_clip=0.1, regularization=0.01).result[0]
    model = tiny_sdxl()
    sigmas = comfy.run_node("SDTurboScheduler", model=model, steps=1, denoise=1.0)[0]
    with pytest.raises(ValueError, match="noise is all zeros .*add_noise is off.*turn|needs add_noise on"):
        comfy.run_node("SamplerCustom", model=model, add_noise=False, noise_seed=0, cfg=1.0,
                       positive=tiny_conditioning(1, 1), negative=tiny_conditioning(2, 1), sampler=sampler,
                       sigmas=sigmas, latent_image={"samples": torch.zeros(1, 4, 32, 32)})


def test_adam_runs_with_its_own_default_learning_rate(comfy, reno_reward):
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    _, _, summary = run_reno(comfy, tiny_sdxl(), reno_reward[1], latent, optimizer="adam", learning_rate=0.0, iterations=4)
    norms = [n[0] for n in summary["history"]["noise_norm"]]
    # Adam moves each of the 4096 values by about lr = 0.01 per step: the norm changes by far less than SGD's 5.0
    assert 0 < abs(norms[1] - norms[0]) < 0.01 * math.sqrt(4096) * 1.5
    assert summary["best_loss"][0] < summary["initial_loss"][0]


def _diff_patches(model, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = model.model.diffusion_model.state_dict()
    keys = [k for k in sd if k.endswith(".weight") and sd[k].ndim >= 2][:12]
    return {f"diffusion_model.{k}": (torch.randn(sd[k].shape, generator=g) * scale / sd[k][0].numel() ** 0.5,) for k in keys}


def test_reno_through_a_lora_patched_model_after_moves(comfy, reno_reward):
    base = tiny_sdxl()
    lora = base.clone()
    assert lora.add_patches(_diff_patches(base), 1.0)
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    with emulated_moves():
        plain, _, _ = run_reno(comfy, base, reno_reward[1], latent)
        patched, _, summary = run_reno(comfy, lora, reno_reward[1], latent)
    assert summary["best_loss"][0] < summary["initial_loss"][0]
    assert not torch.allclose(plain["samples"], patched["samples"], atol=1e-3)


def tiny_controlnet():
    """A ControlNet for tiny_sdxl (same layout), random weights, loaded as ControlNetLoader would."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    with torch.inference_mode():
        net = comfy.cldm.cldm.ControlNet(
            image_size=32, in_channels=4, model_channels=32, hint_channels=3, num_res_blocks=[1, 1],
            channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_middle=1, context_dim=64,
            num_head_channels=16, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
            num_classes="sequential", adm_in_channels=32 + 6 * 256, dtype=torch.float32,
            operations=comfy.ops.disable_weight_init)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def test_reno_with_a_controlnet_in_the_conditioning_after_moves(comfy, reno_reward):
    control = tiny_controlnet()
    image = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(1))
    positive, negative = comfy.run_node("ControlNetApplyAdvanced", positive=tiny_conditioning(1, 1),
                                        negative=tiny_conditioning(2, 1), control_net=control, image=image,
                                        strength=1.0, start_percent=0.0, end_percent=1.0)
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    with emulated_moves():
        plain, _, _ = run_reno(comfy, tiny_sdxl(), reno_reward[1], latent)
        controlled, _, summary = run_reno(comfy, tiny_sdxl(), reno_reward[1], latent, positive=positive, negative=negative)
    assert summary["best_loss"][0] < summary["initial_loss"][0]
    assert not torch.allclose(plain["samples"], controlled["samples"], atol=1e-4)
    assert all(not hasattr(m, "forward") or "forward" not in m.__dict__ for m in control.control_model.modules())


def test_grad_through_comfy_ops_puts_everything_back_when_a_clone_fails(comfy, monkeypatch):
    grad_through_comfy_ops = bridge(comfy).grad_through_comfy_ops
    unet = tiny_sdxl().model.diffusion_model
    before = {id(m): (m.weight_function, m.bias_function) for m in unet.modules() if hasattr(m, "weight_function")}
    tensors = {n: t for n, t in list(unet.named_parameters()) + list(unet.named_buffers())}
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.inference_mode():
        plain._apply(lambda t: t.clone())
    plain_tensors = dict(plain.named_parameters())
    calls = {"n": 0}
    real_clone = torch.Tensor.clone

    def failing_clone(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_clone(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "clone", failing_clone)
    with pytest.raises(RuntimeError, match="simulated"):
        with grad_through_comfy_ops(unet, plain):
            pass
    monkeypatch.undo()
    after = {id(m): (m.weight_function, m.bias_function) for m in unet.modules() if hasattr(m, "weight_function")}
    assert all(after[k][0] is before[k][0] and after[k][1] is before[k][1] for k in before)
    assert all(t is tensors[n] for n, t in list(unet.named_parameters()) + list(unet.named_buffers()))
    assert all(t is plain_tensors[n] for n, t in plain.named_parameters())


def test_gradient_checkpointing_changes_memory_not_results(comfy, reno_reward):
    """Same loop with and without checkpointing (recomputed activations give the same gradients);
    the layers are patched only for the loop."""
    model = tiny_sdxl()
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    on, _, s_on = run_reno(comfy, model, reno_reward[1], latent, gradient_checkpointing=True)
    off, _, s_off = run_reno(comfy, model, reno_reward[1], latent, gradient_checkpointing=False)
    assert torch.allclose(on["samples"], off["samples"], atol=1e-4)
    assert s_on["best_loss"] == pytest.approx(s_off["best_loss"], abs=1e-5)
    assert not any("forward" in m.__dict__ for m in model.model.diffusion_model.modules())


def test_reno_asks_model_management_for_its_working_memory(comfy, reno_reward, monkeypatch):
    import comfy.model_management as mm
    reno = sys.modules[comfy.node("LatentCLIPReNO").__module__]
    calls = []
    real = mm.load_models_gpu

    def recording(models, memory_required=0, *args, **kwargs):
        calls.append((list(models), memory_required))
        return real(models, memory_required, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", recording)
    model = tiny_sdxl()
    run_reno(comfy, model, reno_reward[1], {"samples": torch.zeros(2, 4, 32, 32)}, iterations=2)
    expected = reno.reno_working_memory(model.model, (2, 4, 32, 32), 1, True, 0)
    asked = [(models, need) for models, need in calls if need == expected]
    assert expected > 0 and asked, [need for _, need in calls]
    assert any(m is reno_reward[0].patcher for m in asked[0][0]) and any(m.model is model.model for m in asked[0][0])
    assert reno.reno_working_memory(model.model, (2, 4, 32, 32), 1, False, 0) > expected   # checkpointing: less


def test_safety_guidance_loads_its_model_once_per_sampling_run(comfy, reno_reward, monkeypatch):
    handle = reno_reward[0]
    loads = []
    real = type(handle).load_for_grad_with
    monkeypatch.setattr(type(handle), "load_for_grad_with", lambda self, unet: loads.append(1) or real(self, unet))
    patched = comfy.run_node("LatentCLIPSafetyGuidance", model=tiny_sdxl(), latent_clip=handle, concepts="a dog",
                             anchors="", scale=0.1, start_percent=0.0, end_percent=1.0, threshold=0.0).result[0]
    with emulated_moves():
        for _ in range(2):
            comfy.run_node("KSampler", model=patched, seed=0, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple",
                           positive=tiny_conditioning(1, 1), negative=tiny_conditioning(2, 1),
                           latent_image={"samples": torch.zeros(1, 4, 32, 32)}, denoise=1.0)
    records = sys.modules[comfy.node("LatentCLIPGuidanceReport").__module__].records_of(patched)
    runs = list(records[0].runs)
    assert [r["in_window"] for r in runs] == [4, 4] and [r["loads"] for r in runs] == [1, 1] and len(loads) == 2
    assert records[0].model is None   # no reference kept between runs


def test_a_second_memory_request_that_reloads_every_model_leaves_reno_working(comfy, reno_reward, monkeypatch):
    """On a GPU the measured need can exceed the first estimate; ReNO then asks model management again, which
    may offload and reload the very models it runs (the UNet, the Latent-CLIP). Reloaded under the executor's
    inference mode, their weights come back as inference tensors, so the reward is prepared for grad again
    after that request and the grad set-up is entered only then."""
    import comfy.model_management as mm
    reno = sys.modules[comfy.node("LatentCLIPReNO").__module__]
    monkeypatch.setattr(reno, "measure_working_memory", lambda device: True)            # as on a GPU
    monkeypatch.setattr(reno, "request_bytes", lambda *a: 10 ** 15)                       # more than estimated
    real_load, evicted = mm.load_models_gpu, []

    def tight_card(models, memory_required=0, **kw):   # the card cannot hold it: everything is offloaded first
        if memory_required >= 10 ** 15:
            evicted.append([type(m.model).__name__ for m in mm.loaded_models()])
            mm.free_memory(memory_required, torch.device("cpu"))
        return real_load(models, memory_required=memory_required, **kw)
    monkeypatch.setattr(mm, "load_models_gpu", tight_card)
    with emulated_moves():
        _, _, summary = run_reno(comfy, tiny_sdxl(), reno_reward[1], {"samples": torch.zeros(1, 4, 32, 32)})
    assert evicted and "LatentCLIP" in evicted[0]
    assert summary["best_loss"][0] < summary["initial_loss"][0]


def test_a_head_reward_runs_after_moves_and_leaves_the_cached_head_alone(comfy, reno_reward):
    """The head is copied to the Latent-CLIP's device outside inference mode; the cached one stays as loaded."""
    from latentclip.heads import Head
    from test_head_nodes import head_file
    torch.manual_seed(7)
    name = head_file(comfy, "gpu-head.safetensors", lambda: Head(32, ["plain", "busy"], 8, "test attribute", "tiny"))
    chain = comfy.run_node("LatentCLIPHeadReward", latent_clip=reno_reward[0], head_name=name, label="busy",
                           mode="increase", weight=1.0).result[0]
    with emulated_moves():
        _, _, summary = run_reno(comfy, tiny_sdxl(), chain, {"samples": torch.zeros(1, 4, 32, 32)})
    assert all(math.isfinite(v) for v in summary["best_loss"])
    heads = sys.modules[comfy.node("LatentCLIPHeadReward").__module__]
    cached = heads.head_for(name)
    assert not any(p.is_inference() for p in cached.parameters())


def test_two_pixel_clip_rewards_read_each_file_once_per_run(comfy, monkeypatch):
    """The pack keeps one pixel CLIP cached: a run resolves each of its pixel terms once and holds them, instead
    of rebuilding them from disk in turn (which also left a term running a model no patcher counted)."""
    import comfy.sd as comfy_sd
    import comfy.taesd.taesd as taesd
    import shutil
    import latentclip.pixel_clip as pc
    from latentclip.configs import WEIGHTS_DIR
    for name in ("gpu-pixA.safetensors", "gpu-pixB.safetensors"):   # two files: two pixel CLIPs to the cache
        shutil.copy(WEIGHTS_DIR / "mini" / "mini-pixel-clip.safetensors", comfy.models / "open_clip" / name)
    g = torch.Generator().manual_seed(0)
    net = taesd.TAESD(latent_channels=4)
    vae = comfy_sd.VAE(sd={k: torch.randn(v.shape, generator=g) * 0.05 if v.ndim > 1 else torch.zeros_like(v)
                           for k, v in net.state_dict().items() if k.startswith(("taesd_decoder.", "taesd_encoder."))})
    reads, real = [], pc.load_pixel_clip

    def counting(path, *a, **kw):
        reads.append(str(path).rsplit("/", 1)[-1])
        return real(path, *a, **kw)
    monkeypatch.setattr(pc, "load_pixel_clip", counting)
    reward = None
    for name in ("gpu-pixA.safetensors", "gpu-pixB.safetensors"):
        reward = comfy.run_node("PixelCLIPReward", clip_name=name, model_name="", vae=vae, text="a fox", weight=0.01,
                                reward=reward).result[0]
    model = tiny_sdxl()
    for _ in range(2):
        reads.clear()
        with emulated_moves():
            run_reno(comfy, model, reward, {"samples": torch.zeros(1, 4, 8, 8)}, iterations=1)
        assert len(reads) == len(set(reads)), reads     # before: A, B, A, B on every run
