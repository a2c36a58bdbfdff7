"""Scoring nodes loaded by ComfyUI's loader and run as its executor runs them."""
import json

import pytest
import torch

import latentclip

NODE_IDS = ["LatentCLIPLoader", "LatentCLIPScore", "LatentCLIPZeroShot", "LatentCLIPSelectBest", "LatentCLIPSafetyFilter"]


def test_pack_registers_nodes_and_folder(comfy, tiny_ckpt):
    for node_id in NODE_IDS:
        assert node_id in comfy.nodes.NODE_CLASS_MAPPINGS
    assert tiny_ckpt in comfy.folder_paths.get_filename_list("latent_clip")
    module = comfy.node("LatentCLIPScore").RELATIVE_PYTHON_MODULE
    assert module.startswith("custom_nodes.")


@pytest.fixture(scope="module")
def handle(comfy, tiny_ckpt):
    return comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp32").result[0]


def test_loader_caches_and_builds_grad_capable_weights(comfy, tiny_ckpt, handle):
    again = comfy.run_node("LatentCLIPLoader", ckpt_name=tiny_ckpt, device="cpu", dtype="fp32").result[0]
    assert again is handle
    model = handle.load()
    assert not any(p.is_inference() for p in model.parameters())
    with pytest.raises(ValueError, match="not a file in models/latent_clip"):
        comfy.run_node("LatentCLIPLoader", ckpt_name="missing.safetensors", device="cpu", dtype="fp32")


def test_score_matches_core_and_leaves_input_alone(comfy, handle):
    x = torch.randn(3, 4, 64, 64)
    latent = {"samples": x}
    before = x.clone()
    out = comfy.run_node("LatentCLIPScore", latent_clip=handle, samples=latent, text="a cat")
    scores, report = out.result
    assert torch.equal(x, before) and set(latent) == {"samples"}
    want = latentclip.clip_score(handle.load(), before, "a cat")
    assert scores == pytest.approx(want.tolist(), abs=1e-3)
    assert report.count("\n") == 2 and out.ui.as_dict()["text"][0] == report
    per_item = comfy.run_node("LatentCLIPScore", latent_clip=handle, samples=latent, text="a\nb\nc").result[0]
    assert len(per_item) == 3


def test_zero_shot_and_select_best(comfy, handle):
    x = torch.randn(4, 4, 64, 64)
    labels, probs = comfy.run_node("LatentCLIPZeroShot", latent_clip=handle, samples={"samples": x},
                                   labels="cat\ndog\ncar", template="a photo of {}").result
    table = json.loads(probs)
    assert len(table) == 4 and all(abs(sum(r.values()) - 1) < 1e-3 for r in table)
    assert labels.splitlines() == [max(r, key=r.get) for r in table]
    mask = torch.rand(4, 1, 64, 64)
    latent = {"samples": x, "batch_index": [10, 11, 12, 13], "noise_mask": mask}
    best, scores = comfy.run_node("LatentCLIPSelectBest", latent_clip=handle, samples=latent, text="a cat", k=2).result
    ranked = latentclip.rank(handle.load(), x, "a cat", k=2)[0].tolist()
    assert best["batch_index"] == [10 + i for i in ranked]
    assert torch.equal(best["samples"], x[ranked]) and torch.equal(best["noise_mask"], mask[ranked])
    assert scores[0] >= scores[1]
    with pytest.raises(ValueError, match="k is 5 but the batch has 4"):
        comfy.run_node("LatentCLIPSelectBest", latent_clip=handle, samples=latent, text="a cat", k=5)


def test_safety_filter_flags_and_never_changes_input(comfy, handle):
    x = torch.randn(3, 4, 64, 64)
    before = x.clone()
    latent = {"samples": x}
    out, flags, probs, report = comfy.run_node("LatentCLIPSafetyFilter", latent_clip=handle, samples=latent,
                                               concepts="cat", threshold=0.0, action="replace with zeros").result
    assert json.loads(flags) == [True, True, True]
    assert torch.count_nonzero(out["samples"]) == 0 and torch.equal(x, before)
    out, flags, _, _ = comfy.run_node("LatentCLIPSafetyFilter", latent_clip=handle, samples=latent,
                                      concepts="cat", threshold=1.0, action="replace with zeros").result
    assert json.loads(flags) == [False] * 3 and torch.equal(out["samples"], before)


@pytest.mark.parametrize("samples, text, words", [
    (torch.randn(1, 16, 64, 64), "a cat", "16 channels"),
    (torch.randn(1, 4, 64, 64), "  \n ", "text is empty"),
    (torch.full((1, 4, 64, 64), float("nan")), "a cat", "NaN"),
    (torch.randn(2, 4, 64, 64), "a\nb\nc", "3 lines but the batch has 2"),
])
def test_bad_input_errors_name_the_input(comfy, handle, samples, text, words):
    before = samples.clone()
    with pytest.raises(ValueError, match=words):
        comfy.run_node("LatentCLIPScore", latent_clip=handle, samples={"samples": samples}, text=text)
    assert torch.equal(samples, before) or torch.isnan(before).all()


def test_graph_through_the_executor(comfy, tiny_ckpt, tmp_path):
    """LoadLatent -> LatentCLIPScore through validate_prompt + PromptExecutor, as the server runs it."""
    import safetensors.torch
    x = torch.randn(2, 4, 64, 64)
    name = "lc_test.latent"
    safetensors.torch.save_file({"latent_tensor": x, "latent_format_version_0": torch.tensor([])},
                                str(comfy.workdir / "input" / name))
    prompt = {
        "1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": tiny_ckpt, "device": "cpu", "dtype": "fp32"}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": name}},
        "3": {"class_type": "LatentCLIPScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0], "text": "a cat"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    res = comfy.run_prompt(prompt)
    assert res["valid"] and res["success"], res
    assert "#0:" in res["outputs"]["3"]["text"][0]
    prompt["3"]["inputs"]["text"] = " "
    res = comfy.run_prompt(prompt)
    errors = [d for e, d in res["messages"] if e == "execution_error"]
    assert not res["success"] and errors and "text is empty" in errors[0]["exception_message"]
