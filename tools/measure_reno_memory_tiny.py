"""ReNO's memory request next to what a run holds, with gradient checkpointing on and off, on tiny models.

    COMFYUI_PATH=/path/to/ComfyUI python tools/measure_reno_memory_tiny.py [--batch 2] [--size 32]

In-process ComfyUI, the tiny SDXL-architecture UNet (inference-tensor weights, as a loader makes them),
PyTorch attention (what ComfyUI picks on CUDA) and a tiny Latent-CLIP reward. Per setting: the peak of
all CPU allocations during a 2-iteration ReNO run (``latentclip.memory_probe.peak_bytes``), the UNet
weight copies and other tensors kept for backward by one forward (tests/comfy/test_reno_memory_request.py),
the first request (``reno_working_memory``, from parameters) and the measured one that ReNO makes on a
GPU (``ReNOSampler.measure_memory``, run here on the CPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent side")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import conftest as harness
    import latentclip
    from test_reno_memory_request import saved_for_backward
    from latentclip.memory_probe import peak_bytes

    if harness.COMFYUI is None:
        raise SystemExit(harness.SKIP_REASON)
    comfy = harness.Comfy(harness.COMFYUI, Path(tempfile.mkdtemp(prefix="lc-measure-")))
    latentclip.save(harness.tiny_reward_latent_clip(seed=3), comfy.models / "latent_clip" / "tiny.safetensors")
    handle = comfy.run_node("LatentCLIPLoader", ckpt_name="tiny.safetensors", device="default", dtype="fp32").result[0]
    reward = comfy.run_node("LatentCLIPReward", latent_clip=handle, text="a red fox", mode="match", weight=0.01).result[0]
    reno = sys.modules[comfy.node("LatentCLIPReNO").__module__]
    import comfy.ldm.modules.attention as attention
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    samplers, measuring = [], [False]
    real = reno.ReNOSampler.measure_memory

    def recording(self, *a, **kw):
        samplers.append(self)
        return real(self, *a, **kw)
    reno.ReNOSampler.measure_memory = recording
    reno.measure_working_memory = lambda device: measuring[0]
    unet = harness.tiny_sdxl()
    shape = (args.batch, 4, args.size, args.size)
    weights = sum(p.numel() * p.element_size() for p in unet.model.diffusion_model.parameters())

    def run(checkpointing, iterations):
        comfy.run_node("LatentCLIPReNO", model=unet, positive=harness.tiny_conditioning(1, args.batch),
                       negative=harness.tiny_conditioning(2, args.batch), latent_image={"samples": torch.zeros(shape)},
                       reward=reward, seed=5, iterations=iterations, learning_rate=5.0, optimizer="sgd", grad_clip=0.1,
                       regularization=0.01, gradient_checkpointing=checkpointing, steps=1, cfg=1.0)

    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    print(f"tiny SDXL UNet ({mib(weights)} MiB of fp32 weights), latents {list(shape)}, one step")
    print("| checkpointing | run peak (MiB) | weight copies kept (MiB) | other tensors kept (MiB) | "
          "first request (MiB) | measured request (MiB) |")
    print("|---|---|---|---|---|---|")
    for checkpointing in (True, False):
        run(checkpointing, 1)   # warm-up
        peak = peak_bytes(lambda: run(checkpointing, 2), "cpu")
        copies, other = saved_for_backward(comfy, lambda: run(checkpointing, 1))
        asked = reno.reno_working_memory(unet.model, shape, 1, checkpointing, 0)
        measuring[0] = True
        run(checkpointing, 1)
        measuring[0] = False
        measured = samplers[-1].measured["request_bytes"]
        print(f"| {'on' if checkpointing else 'off'} | {mib(peak)} | {mib(copies)} | {mib(other)} | {mib(asked)} | {mib(measured)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
