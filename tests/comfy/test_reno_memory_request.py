"""ReNO's working-memory request covers the weight copies a run keeps for backward, with gradient
checkpointing on and off (issue 20, defect 4), measured on the tiny SDXL.

``grad_through_comfy_ops`` makes comfy.ops copy every UNet weight in grad mode at each forward; autograd
keeps the copies until backward unless the layer is checkpointed. Measured: the tensors saved for backward
during one ReNO forward (``saved_tensors_hooks``; a checkpointed layer's saves go to its own hooks and are
dropped), split into weight copies (what comfy.ops' weight functions return) and the rest.
"""
import sys

import pytest
import torch

from latentclip.memory_probe import peak_bytes

from conftest import tiny_conditioning, tiny_sdxl
from test_gpu_inputs import reno_reward  # noqa: F401  (fixture)

BATCH = 2


def saved_for_backward(comfy, fn) -> tuple[int, int]:
    """(weight-copy bytes, other bytes) of the distinct storages saved for backward while ``fn`` runs.
    A weight copy is what comfy.ops' weight/bias functions hand back (recorded through the identity
    ``grad_through_comfy_ops`` appends)."""
    bridge = sys.modules[sys.modules[comfy.node("LatentCLIPReNO").__module__].__name__.rsplit(".", 1)[0] + ".comfy_bridge"]
    copies, seen = {}, {}     # copies are held until the end, so no other tensor reuses their addresses
    real = bridge._identity

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    bridge._identity = lambda t: copies.setdefault(t.untyped_storage().data_ptr(), t)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        bridge._identity = real
    return (sum(n for p, n in seen.items() if p in copies), sum(n for p, n in seen.items() if p not in copies))


def run(comfy, reward, model, checkpointing, iterations):
    comfy.run_node("LatentCLIPReNO", model=model, positive=tiny_conditioning(1, BATCH), negative=tiny_conditioning(2, BATCH),
                   latent_image={"samples": torch.zeros(BATCH, 4, 32, 32)}, reward=reward, seed=5, iterations=iterations,
                   learning_rate=5.0, optimizer="sgd", grad_clip=0.1, regularization=0.01,
                   gradient_checkpointing=checkpointing, steps=1, cfg=1.0)


def test_the_request_covers_the_weight_copies_kept_for_backward(comfy, reno_reward):  # noqa: F811
    reno = sys.modules[comfy.node("LatentCLIPReNO").__module__]
    model = tiny_sdxl()
    unet = model.model.diffusion_model
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    kept, asked = {}, {}
    for checkpointing in (True, False):
        run(comfy, reno_reward[1], model, checkpointing, 1)            # warm-up: text features, first loads
        kept[checkpointing] = saved_for_backward(comfy, lambda: run(comfy, reno_reward[1], model, checkpointing, 1))
        asked[checkpointing] = reno.reno_working_memory(model.model, (BATCH, 4, 32, 32), 1, checkpointing, 0)
        estimate = reno.weight_copy_bytes(unet, 1, checkpointing) * 4  # float32
        copies, other = kept[checkpointing]
        print(f"\ncheckpointing={checkpointing}: weight copies kept {copies / 2**20:.2f} MiB (estimate {estimate / 2**20:.2f}, "
              f"UNet weights {weights / 2**20:.2f}), other tensors kept {other / 2**20:.2f} MiB; request {asked[checkpointing] / 2**20:.2f} MiB")
        # the estimate also counts the copies a recompute remakes (one layer) and those of the embedding MLPs,
        # which no gradient reaches (kept only on the noise's path): a margin of at most 0.3x the weights
        assert copies <= estimate <= copies + 0.3 * weights
    assert kept[False][0] > 0.5 * weights          # without checkpointing most weights are copied and kept
    # what turning checkpointing off adds in weight copies, the request adds too (it did not: issue 20)
    assert asked[False] - asked[True] >= kept[False][0] - kept[True][0]


@pytest.mark.parametrize("size", [32, 64])
def test_the_measured_request_covers_the_peak_of_the_run(comfy, reno_reward, monkeypatch, size):  # noqa: F811
    """On a GPU ReNO measures its generator's backward at two reduced sizes and asks for the
    extrapolation; here the same measurement runs on the CPU (profiler memory events) and is held
    against the peak of the whole ReNO run at the real size, with checkpointing on and off. Attention
    is PyTorch's, as ComfyUI picks it on CUDA (on the CPU it picks its sub-quadratic kernel, whose
    memory jumps at chunk thresholds that reduced sizes cannot show; docs/gpu.md)."""
    import comfy.ldm.modules.attention as attention
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
    reno = sys.modules[comfy.node("LatentCLIPReNO").__module__]
    monkeypatch.setattr(reno, "measure_working_memory", lambda device: True)
    samplers = []
    real = reno.ReNOSampler.measure_memory

    def recording(self, *a, **kw):
        samplers.append(self)
        return real(self, *a, **kw)
    monkeypatch.setattr(reno.ReNOSampler, "measure_memory", recording)
    model = tiny_sdxl()
    for checkpointing in (True, False):
        def go():
            comfy.run_node("LatentCLIPReNO", model=model, positive=tiny_conditioning(1, BATCH),
                           negative=tiny_conditioning(2, BATCH), latent_image={"samples": torch.zeros(BATCH, 4, size, size)},
                           reward=reno_reward[1], seed=5, iterations=2, learning_rate=5.0, optimizer="sgd",
                           grad_clip=0.1, regularization=0.01, gradient_checkpointing=checkpointing, steps=1, cfg=1.0)
        go()                                                        # warm-up: text features, first loads
        monkeypatch.setattr(reno, "measure_working_memory", lambda device: False)
        peak = peak_bytes(go, "cpu")                                # the run itself, no probe inside
        monkeypatch.setattr(reno, "measure_working_memory", lambda device: True)
        measured = samplers[-1].measured
        print(f"\n{size}x{size} checkpointing={checkpointing}: run peak {peak / 2**20:.2f} MiB, measured request "
              f"{measured['request_bytes'] / 2**20:.2f} MiB (points {measured['points']}), "
              f"estimate from parameters {measured['estimate_bytes'] / 2**20:.2f} MiB")
        assert measured["request_bytes"] >= peak
        assert measured["request_bytes"] <= 2.5 * peak             # a request, not a refusal to run
        assert len(measured["points"]) == (2 if size == 32 else 3) and all(b > 0 for _, b in measured["points"])
