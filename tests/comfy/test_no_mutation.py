"""No node changes its inputs: every tensor reachable from a node's inputs (LATENT samples, batch_index,
noise_mask, CONDITIONING, the MODEL's and the Latent-CLIP's weights, model options) is bit-identical
after the node ran, whether it succeeded or raised half-way (a bad setting found mid-run, an interrupt
during ReNO). Runs in-process through the harness, under inference mode as the executor does."""
import dataclasses

import pytest
import torch

import latentclip
from latentclip import configs
from conftest import interrupt_at_progress, tiny_conditioning, tiny_latent_clip, tiny_sdxl


def _walk(obj, path, out, seen):
    """(path, tensor) for every tensor reachable from ``obj`` (containers, modules, patchers, specs)."""
    if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, dict):
        out.append((path + ".keys", tuple(sorted(map(str, obj)))))
        for k, v in obj.items():
            _walk(v, f"{path}[{k!r}]", out, seen)
    elif isinstance(obj, (list, tuple)):
        out.append((path + ".len", len(obj)))
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen)
    elif isinstance(obj, torch.nn.Module):
        for name, t in list(obj.named_parameters()) + list(obj.named_buffers()):
            out.append((f"{path}.{name}", t))
        for name, m in obj.named_modules():   # comfy.ops weight/bias functions must be put back
            if hasattr(m, "weight_function"):
                out.append((f"{path}.{name}.functions", (len(m.weight_function), len(m.bias_function))))
    elif hasattr(obj, "patcher"):                                  # LatentCLIPHandle
        _walk(obj.patcher, path + ".patcher", out, seen)
    elif hasattr(obj, "model") and hasattr(obj, "model_options"):  # ModelPatcher
        _walk(obj.model, path + ".model", out, seen)
        _walk(obj.model_options, path + ".model_options", out, seen)
        out.append((path + ".patches", len(obj.patches)))
    elif dataclasses.is_dataclass(obj):                            # reward term specs
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), f"{path}.{f.name}", out, seen)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool and t.numel() else t.clone()


def snapshot(**inputs):
    items = []
    _walk(inputs, "inputs", items, set())
    return [(p, (t, t.dtype, tuple(t.shape), _bits(t).clone())) if isinstance(t, torch.Tensor) else (p, t)
            for p, t in items]


def assert_unchanged(before, **inputs):
    after = snapshot(**inputs)
    assert [p for p, _ in before] == [p for p, _ in after], "the inputs' structure changed"
    for (path, a), (_, b) in zip(before, after):
        if isinstance(a, tuple) and len(a) == 4 and isinstance(a[0], torch.Tensor):
            assert a[0] is b[0], f"{path} was replaced"
            assert a[1:3] == b[1:3] and torch.equal(a[3], b[3]), f"{path} changed"
        else:
            assert a == b, f"{path} changed: {a} -> {b}"


def run_checked(comfy, node_id, error=None, **inputs):
    """Run a node; its inputs must be bit-identical afterwards (also when it raises ``error``)."""
    before = snapshot(**inputs)
    if error is None:
        out = comfy.run_node(node_id, **inputs)
    else:
        with pytest.raises(error[0], match=error[1]):
            comfy.run_node(node_id, **inputs)
        out = None
    assert_unchanged(before, **inputs)
    return out


@pytest.fixture(scope="module")
def handle(comfy, tiny_ckpt):
    return comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp32").result[0]


def latent(b=3, size=64, mask=True):
    g = torch.Generator().manual_seed(b * 100 + size)
    out = {"samples": torch.randn(b, 4, size, size, generator=g), "batch_index": [5 + i for i in range(b)]}
    if mask:
        out["noise_mask"] = torch.rand(b, 1, size * 8, size * 8, generator=g)
    return out


def test_the_check_catches_an_in_place_change(handle):
    x = latent()
    before = snapshot(samples=x, latent_clip=handle)
    x["samples"][0, 0, 0, 0] += 1e-3
    with pytest.raises(AssertionError, match="samples"):
        assert_unchanged(before, samples=x, latent_clip=handle)
    x = latent()
    before = snapshot(samples=x)
    x["extra"] = 1
    with pytest.raises(AssertionError, match="keys changed"):
        assert_unchanged(before, samples=x)


def test_loader_leaves_the_file_alone(comfy, tiny_ckpt):
    path = comfy.models / "latent_clip" / tiny_ckpt
    data = path.read_bytes()
    comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp16")
    assert path.read_bytes() == data


@pytest.mark.parametrize("node_id, kwargs", [
    ("LatentCLIPScore", {"text": "a cat\na dog\na cow"}),
    ("LatentCLIPZeroShot", {"labels": "cat\ndog", "template": "a photo of {}"}),
    ("LatentCLIPSelectBest", {"text": "a cat", "k": 2}),
    ("LatentCLIPSafetyFilter", {"concepts": "blood\nnudity", "threshold": 0.0, "action": "replace with zeros"}),
    ("LatentCLIPSafetyFilter", {"concepts": "blood", "threshold": 0.5, "action": "flag only"}),
])
def test_scoring_nodes_leave_their_inputs_alone(comfy, handle, node_id, kwargs):
    x = latent()
    out = run_checked(comfy, node_id, latent_clip=handle, samples=x, **kwargs)
    if node_id in ("LatentCLIPSelectBest", "LatentCLIPSafetyFilter") and kwargs.get("action") != "flag only":
        new = out.result[0]
        assert new is not x and new["samples"].data_ptr() != x["samples"].data_ptr()


@pytest.mark.parametrize("node_id, kwargs, error", [
    ("LatentCLIPSelectBest", {"text": "a cat", "k": 4}, "k is 4 but the batch has 3"),     # after scoring
    ("LatentCLIPScore", {"text": "a\nb"}, "text has 2 lines"),
    ("LatentCLIPZeroShot", {"labels": "cat", "template": "no slot"}, "template"),
    ("LatentCLIPSafetyFilter", {"concepts": " ", "threshold": 0.5, "action": "replace with zeros"}, "concepts is empty"),
])
def test_scoring_nodes_leave_their_inputs_alone_when_they_fail(comfy, handle, node_id, kwargs, error):
    run_checked(comfy, node_id, error=(ValueError, error), latent_clip=handle, samples=latent(), **kwargs)


def test_bad_values_are_left_as_they_were(comfy, handle):
    x = latent(b=2)
    x["samples"][1, 2, 3, 4] = float("nan")
    run_checked(comfy, "LatentCLIPScore", error=(ValueError, "NaN"), latent_clip=handle, samples=x, text="a cat")
    assert torch.isnan(x["samples"][1, 2, 3, 4])


def reno_inputs(comfy, handle, batch=1, text="a red fox", **kw):
    reward = comfy.run_node("LatentCLIPReward", latent_clip=handle, text=text, mode="match", weight=0.01).result[0]
    args = dict(model=tiny_sdxl(), positive=tiny_conditioning(1, batch), negative=tiny_conditioning(2, batch),
                latent_image=latent(b=batch, size=32, mask=False), reward=reward, seed=3, iterations=2, learning_rate=5.0,
                optimizer="sgd", grad_clip=0.1, regularization=0.01, steps=1, cfg=1.0)
    args.update(kw)
    return args


def test_reward_nodes_leave_their_inputs_alone(comfy, handle):
    first = run_checked(comfy, "LatentCLIPReward", latent_clip=handle, text="a fox", mode="match", weight=0.01).result[0]
    run_checked(comfy, "LatentCLIPReward", latent_clip=handle, text="blood", mode="avoid", weight=0.05, reward=first)
    assert len(first) == 1


def test_reno_leaves_model_conditioning_latent_and_reward_alone(comfy, handle):
    out = run_checked(comfy, "LatentCLIPReNO", **reno_inputs(comfy, handle, batch=2, cfg=2.0))
    assert out.result[0]["samples"].shape == (2, 4, 32, 32)


def test_reno_leaves_its_inputs_alone_when_it_fails_half_way(comfy, handle):
    # the reward's line count is checked inside the sampler, after noise and conditioning were prepared
    run_checked(comfy, "LatentCLIPReNO", error=(ValueError, "reward text has 3 lines"),
                **reno_inputs(comfy, handle, batch=2, text="a\nb\nc"))


@pytest.mark.parametrize("kw, error", [({"iterations": 0}, "iterations must be an integer >= 1"),
                                       ({"learning_rate": -1.0}, "lr must be a finite number > 0")])
def test_reno_values_below_the_declared_minimum_are_refused_without_validation(comfy, handle, kw, error):
    """A direct call skips /prompt's range checks; the core still refuses, and touches nothing."""
    run_checked(comfy, "LatentCLIPReNO", error=(ValueError, error), **reno_inputs(comfy, handle, **kw))


def test_reno_leaves_its_inputs_alone_when_interrupted(comfy, handle):
    import comfy.model_management as mm
    with interrupt_at_progress(2):
        run_checked(comfy, "LatentCLIPReNO", error=(mm.InterruptProcessingException, None),
                    **reno_inputs(comfy, handle, iterations=20))


def test_reno_sampler_through_sampler_custom_leaves_its_inputs_alone(comfy, handle):
    args = reno_inputs(comfy, handle)
    sampler = run_checked(comfy, "LatentCLIPReNOSampler", reward=args["reward"], seed=0, iterations=2, learning_rate=5.0,
                          optimizer="sgd", grad_clip=0.1, regularization=0.01).result[0]
    sigmas = comfy.run_node("SDTurboScheduler", model=args["model"], steps=1, denoise=1.0)[0]
    run_checked(comfy, "SamplerCustom", model=args["model"], add_noise=True, noise_seed=1, cfg=1.0,
                positive=args["positive"], negative=args["negative"], sampler=sampler, sigmas=sigmas,
                latent_image=args["latent_image"])


def test_safety_guidance_patches_a_clone_and_sampling_leaves_inputs_alone(comfy, handle):
    model = tiny_sdxl()
    patched = run_checked(comfy, "LatentCLIPSafetyGuidance", model=model, latent_clip=handle, concepts="blood\nnudity",
                          anchors="a garden", scale=0.05, start_percent=0.0, end_percent=1.0, threshold=0.0).result[0]
    assert patched is not model and "sampler_post_cfg_function" not in model.model_options
    lat = latent(b=1, size=32, mask=False)
    out = run_checked(comfy, "KSampler", model=patched, seed=0, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
                      positive=tiny_conditioning(1), negative=tiny_conditioning(2), latent_image=lat, denoise=1.0)
    run_checked(comfy, "LatentCLIPGuidanceReport", model=patched, samples=out[0])
    run_checked(comfy, "LatentCLIPSafetyGuidance", error=(ValueError, "start_percent"), model=model, latent_clip=handle,
                concepts="blood", anchors="", scale=0.05, start_percent=0.9, end_percent=0.1, threshold=0.0)


def test_guidance_with_a_wrong_vae_family_leaves_inputs_alone(comfy):
    model = tiny_latent_clip(seed=4, cfg=configs.for_family("Latent-ViT-Tiny-test", "sd3"))
    path = comfy.models / "latent_clip" / "tiny-sd3-nomut.safetensors"
    if not path.exists():
        latentclip.save(model, path)
    sd3 = comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device="cpu", dtype="fp32").result[0]
    run_checked(comfy, "LatentCLIPSafetyGuidance", error=(ValueError, "reads SD3-VAE latents"), model=tiny_sdxl(),
                latent_clip=sd3, concepts="blood", anchors="", scale=0.05, start_percent=0.0, end_percent=1.0, threshold=0.0)
    run_checked(comfy, "LatentCLIPReNO", error=(ValueError, "reads SD3-VAE latents"), **reno_inputs(comfy, sd3))
