"""Gradient checkpointing with block-keyed patches (issue 20, defect 2).

ComfyUI's UNet sets ``transformer_options["block"]`` before each block and its transformers set
``"block_index"``; attn1/attn2 replace patches keyed to a block (IPAdapter, attention couple, regional
prompting) look these up. A recompute in backward must see the values of its own forward, or the
patch runs in the forward but not in the recompute and the noise gradient is wrong.
"""
import json

import pytest
import torch

from conftest import tiny_conditioning, tiny_sdxl
from test_gpu_inputs import reno_reward  # noqa: F401  (fixture)


def patched_sdxl(calls):
    import comfy.ldm.modules.attention as attention
    model = tiny_sdxl()

    def attn2_replace(q, k, v, extra_options):      # keyed to the only transformer of ("input", 3)
        calls.append(torch.is_grad_enabled())
        return attention.optimized_attention(q, k * 3.0, v, extra_options["n_heads"]) * 10.0

    model.set_model_attn2_replace(attn2_replace, "input", 3)
    return model


def reno(comfy, reward, checkpointing, calls):
    best, _, history, _ = comfy.run_node(
        "LatentCLIPReNO", model=patched_sdxl(calls), positive=tiny_conditioning(1, 1), negative=tiny_conditioning(2, 1),
        latent_image={"samples": torch.zeros(1, 4, 32, 32)}, reward=reward, seed=5, iterations=2, learning_rate=5.0,
        optimizer="sgd", grad_clip=0.0, regularization=0.0, gradient_checkpointing=checkpointing, steps=1, cfg=1.0).result
    return best["samples"], json.loads(history)["history"]


def test_block_keyed_patch_gives_the_same_gradient_with_and_without_checkpointing(comfy, reno_reward):  # noqa: F811
    calls_on, calls_off = [], []
    on, h_on = reno(comfy, reno_reward[1], True, calls_on)
    off, h_off = reno(comfy, reno_reward[1], False, calls_off)
    assert h_on["grad_norm"][0][0] == pytest.approx(h_off["grad_norm"][0][0], rel=1e-4)
    assert len(calls_off) == 2                        # one forward per iteration
    assert len(calls_on) == 3                         # ... and the recompute of the first iteration's backward
    assert torch.allclose(on, off, atol=1e-4)
