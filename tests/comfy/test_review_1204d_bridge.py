"""Review 1204d of nodes/comfy_bridge.py and nodes/loaders.py: weight functions put back when a module is
reached twice, a loader's file replaced on disk loads again, bad device/dtype values and misspelt names refused
in one sentence that suggests only what the loader offers."""
import asyncio
import copy
import uuid

import pytest
import torch

import latentclip
from conftest import RecordingServer, tiny_latent_clip, tiny_sdxl
from test_gpu_inputs import bridge
from test_reno_nodes import run_reno, tiny_taesd_vae


def _functions(module):
    return {id(m): (m.weight_function, m.bias_function) for m in module.modules() if hasattr(m, "weight_function")}


def test_grad_through_comfy_ops_puts_back_a_module_given_twice(comfy):
    """Two Pixel-CLIP Rewards on one VAE hand its decoder in twice: each comfy.ops layer was patched twice
    and restored in the wrong order, keeping an identity weight function (a weight copy on every later decode,
    one more per run)."""
    grad_through_comfy_ops = bridge(comfy).grad_through_comfy_ops
    decoder = tiny_taesd_vae().first_stage_model
    before = _functions(decoder)
    with grad_through_comfy_ops(decoder, decoder):
        assert all(len(wf) == len(before[k][0]) + 1 for k, (wf, _) in _functions(decoder).items())
    after = _functions(decoder)
    assert all(after[k][0] is before[k][0] and after[k][1] is before[k][1] for k in before)


def test_reno_with_two_pixel_rewards_on_one_vae_leaves_the_vae_as_it_was(comfy):
    import shutil
    from latentclip.configs import WEIGHTS_DIR
    name = "review-1204d-pix.safetensors"
    shutil.copy(WEIGHTS_DIR / "mini" / "mini-pixel-clip.safetensors", comfy.models / "open_clip" / name)
    vae = tiny_taesd_vae()
    before = _functions(vae.first_stage_model)
    reward = None
    for text in ("a fox", "a red fox"):
        reward = comfy.run_node("PixelCLIPReward", clip_name=name, model_name="", vae=vae, text=text, weight=0.01,
                                reward=reward).result[0]
    run_reno(comfy, tiny_sdxl(), reward, {"samples": torch.zeros(1, 4, 8, 8)}, iterations=1)
    after = _functions(vae.first_stage_model)
    assert all(len(after[k][0]) == len(before[k][0]) and len(after[k][1]) == len(before[k][1]) for k in before)


def test_a_latent_clip_file_replaced_on_disk_is_loaded_again(comfy):
    """ComfyUI keeps a node's output while its inputs stay the same; the loader's fingerprint is the file's
    size and time, so a file overwritten between two prompts (a new distillation, a re-conversion) is used."""
    name = "review-1204d-replaced.safetensors"
    path = comfy.models / "latent_clip" / name
    latentclip.save(tiny_latent_clip(seed=21), path, force=True)
    prompt = {
        "1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": name, "device": "cpu", "dtype": "fp32"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a cat"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    executor = comfy.execution.PromptExecutor(RecordingServer())

    def report():   # as POST /prompt does: a fresh graph each time, one executor (and its output cache) for all
        prompt_id, graph = str(uuid.uuid4()), copy.deepcopy(prompt)
        valid = asyncio.run(comfy.execution.validate_prompt(prompt_id, graph, None))
        assert valid[0], valid
        executor.execute(graph, prompt_id, {"client_id": "test"}, valid[2])
        assert executor.success
        return executor.history_result["outputs"]["3"]["text"][0]

    first = report()
    latentclip.save(tiny_latent_clip(seed=22), path, force=True)
    second = report()
    assert second != first
    assert report() == second   # unchanged file: the same model again


@pytest.mark.parametrize("inputs, words", [
    ({"dtype": "float16"}, r"^dtype 'float16' is not one of \['auto', 'fp32', 'fp16', 'bf16'\]"),
    ({"device": "cuda:1"}, r"^device 'cuda:1' is not one of \['default', 'cpu'\]"),
])
def test_a_device_or_dtype_outside_the_list_is_one_sentence_naming_it(comfy, tiny_ckpt, inputs, words):
    """A V3 Combo is not checked against its options at /prompt: a typed API graph reached the loader with
    dtype 'float16' (KeyError: 'float16') or device 'cuda:1' (silently the default device)."""
    args = {"ckpt_name": tiny_ckpt, "device": "cpu", "dtype": "fp32", **inputs}
    with pytest.raises(ValueError, match=words):
        comfy.run_node("LatentCLIPLoader", **args)


def _only_shipped_weights_in(comfy, monkeypatch, folder: str) -> None:
    """A fresh install: ``models/<folder>`` holds only the pack's own weights/ (its whole folder is registered)."""
    import sys
    fp = comfy.folder_paths
    loaders = sys.modules[comfy.node("LatentCLIPLoader").__module__]
    monkeypatch.setitem(fp.folder_names_and_paths, folder, ([loaders.SHIPPED_WEIGHTS], fp.folder_names_and_paths[folder][1]))
    monkeypatch.setattr(fp, "filename_list_cache", {})


def test_a_misspelt_ckpt_name_suggests_only_what_the_loader_offers(comfy, monkeypatch):
    """The refusal listed models/latent_clip as ComfyUI sees it: on a fresh install, the pack's mini generators,
    VAEs, pixel CLIP and head (which the loader refuses), and none of the releases the list offers."""
    _only_shipped_weights_in(comfy, monkeypatch, "latent_clip")
    problem = comfy.node("LatentCLIPLoader").validate_inputs(ckpt_name="typo.safetensors")
    assert problem.startswith("ckpt_name 'typo.safetensors' is not a file in models/latent_clip; expected one of ")
    named = problem.split("expected one of", 1)[1]
    assert "mini/generator.safetensors" not in named and "mini/mini-vae.safetensors" not in named
    assert "mini/mini-latent-clip.safetensors" in named and "wendlerc/latent-clip-b-8-512-34b-80k" in named


def test_a_misspelt_clip_name_suggests_only_pixel_clips(comfy, monkeypatch):
    """The Pixel-CLIP Reward's refusal listed models/open_clip as ComfyUI sees it, where the pack registers its
    whole weights/ folder: Latent-CLIPs, generators and VAEs that the reward refuses."""
    _only_shipped_weights_in(comfy, monkeypatch, "open_clip")
    problem = comfy.node("LatentCLIPPixelReward").validate_inputs(clip_name="typo.safetensors")
    assert problem.startswith("clip_name 'typo.safetensors' is not a file in models/open_clip; expected one of ")
    named = problem.split("expected one of", 1)[1]
    assert "mini/mini-pixel-clip.safetensors" in named
    assert "mini/generator.safetensors" not in named and "mini/mini-latent-clip.safetensors" not in named
