"""Review 1206f (head nodes, latentclip.heads), through ComfyUI's own loader and executor:

* F1: a head file replaced on disk under the same name was never read again: the Head Score / Head Reward
  nodes had no ``fingerprint_inputs``, so ComfyUI's executor served the old scores for an unchanged graph;
  and the head cache was keyed on (path, mtime) only, so a copy that keeps the time (``cp -p``, an unpacked
  archive, rsync -a) kept the old head even when the node ran;
* F2: a latent whose Latent-CLIP features are not finite (its magnitude overflows the model's arithmetic)
  scored NaN, named the head's first label as its most likely one and wrote ``NaN`` into the probabilities
  JSON (not JSON); compared with a safety threshold, NaN is never above it;
* F3: a NaN weight (an API prompt can carry one; ComfyUI's FLOAT check lets it through) was accepted by
  Head Reward and refused only inside ReNO, after every model had loaded, as "head1 weight ...";
* F4: a head file whose metadata claims a large width (embed_dim / hidden up to 65536) made the loader
  allocate that head (16 GiB for 65536 x 65536) before noticing the file's tensors do not fit it.
"""
import json
import os
import uuid

import pytest
import torch

from latentclip.heads import Head, save_head
from test_reno_nodes import reno_handle  # noqa: F401  (fixture)
from conftest import RecordingServer


def _heads_folder(comfy):
    folder = comfy.models / "latent_clip_heads"
    folder.mkdir(parents=True, exist_ok=True)
    comfy.folder_paths.add_model_folder_path("latent_clip_heads", str(folder))
    return folder


def _head(seed: int, flip: bool = False) -> Head:
    """A linear head; ``flip``: its logits negated (the two labels' probabilities swap)."""
    torch.manual_seed(seed)
    head = Head(32, ["plain", "busy"], 0, "test attribute", "tiny")
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(-20.0 if flip else 20.0)   # far-apart heads: their probabilities differ clearly
    return head


def _replace(path, head: Head, keep_time: bool = False) -> None:
    """``head`` written over ``path`` (as a new file moved into place); ``keep_time``: with the old mtime."""
    old = os.stat(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.safetensors")
    save_head(head, tmp)
    if keep_time:
        os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(tmp, path)


# -- F1 -------------------------------------------------------------------------------------------
def _score_graph(ckpt: str, head_name: str) -> dict:
    return {
        "1": {"class_type": "LatentCLIPLoader", "inputs": {"ckpt_name": ckpt, "device": "cpu", "dtype": "fp32"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "3": {"class_type": "LatentCLIPHeadScore", "inputs": {"latent_clip": ["1", 0], "samples": ["2", 0],
                                                              "head_name": head_name, "label": "busy"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }


def _run(comfy, executor, graph: dict) -> str:
    import asyncio
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(comfy.execution.validate_prompt(prompt_id, graph, None))
    assert valid[0], valid
    executor.execute(graph, prompt_id, {"client_id": "test"}, valid[2])
    assert executor.success, executor.status_messages
    return json.dumps(executor.history_result["outputs"]["4"], sort_keys=True)


def test_a_head_replaced_on_disk_is_scored_again_by_the_same_executor(comfy, tiny_ckpt):
    """The same graph queued twice with one executor (as the server keeps it): the second run must read the
    new file. Before: the node's output came from ComfyUI's cache, the old head's numbers."""
    folder = _heads_folder(comfy)
    path = folder / "f1-replaced.safetensors"
    if path.exists():
        path.unlink()
    save_head(_head(1), path)
    executor = comfy.execution.PromptExecutor(RecordingServer())
    graph = _score_graph(tiny_ckpt, path.name)
    first = _run(comfy, executor, graph)
    _replace(path, _head(1, flip=True))
    second = _run(comfy, executor, _score_graph(tiny_ckpt, path.name))
    assert second != first


@pytest.mark.parametrize("node", ["LatentCLIPHeadScore", "LatentCLIPHeadReward"])
def test_both_head_nodes_fingerprint_the_head_file(comfy, node):
    folder = _heads_folder(comfy)
    path = folder / f"f1-fingerprint-{node}.safetensors"
    if path.exists():
        path.unlink()
    save_head(_head(1), path)
    cls = comfy.node(node)
    before = cls.fingerprint_inputs(head_name=path.name, label="busy")
    assert before == cls.fingerprint_inputs(head_name=path.name, label="busy")   # stable while the file is
    _replace(path, _head(2), keep_time=True)
    assert cls.fingerprint_inputs(head_name=path.name, label="busy") != before
    assert cls.fingerprint_inputs(head_name="missing.safetensors") is None       # the node's own error says so


def test_a_copy_that_keeps_the_time_and_size_is_read_again(comfy, reno_handle):
    """``cp -p`` of a retrained head of the same shape: same mtime, same size. Before: the old head stayed."""
    folder = _heads_folder(comfy)
    path = folder / "f1-same-time.safetensors"
    if path.exists():
        path.unlink()
    save_head(_head(1), path)
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    run = lambda: comfy.run_node("LatentCLIPHeadScore", latent_clip=reno_handle, samples={"samples": x},  # noqa: E731
                                 head_name=path.name, label="busy").result[0]
    first = run()
    size = path.stat().st_size
    _replace(path, _head(2), keep_time=True)
    assert path.stat().st_size == size
    assert run() != pytest.approx(first, abs=1e-4)


# -- F2 -------------------------------------------------------------------------------------------
def test_a_latent_with_non_finite_features_is_one_sentence_naming_the_item(comfy, reno_handle):
    folder = _heads_folder(comfy)
    name = "f2-head.safetensors"
    if not (folder / name).exists():
        save_head(_head(1), folder / name)
    x = torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    x[1] *= 1e37   # finite (check_latents lets it through), but the features overflow
    with pytest.raises(ValueError, match=r"^samples #1 gave Latent-CLIP features that are not finite"):
        comfy.run_node("LatentCLIPHeadScore", latent_clip=reno_handle, samples={"samples": x}, head_name=name,
                       label="busy")
    # ordinary latents still score
    scores, labels, table = comfy.run_node("LatentCLIPHeadScore", latent_clip=reno_handle,
                                           samples={"samples": x[[0, 2]]}, head_name=name, label="").result
    assert len(scores) == 2 and len(json.loads(table)) == 2


# -- F3 -------------------------------------------------------------------------------------------
def test_a_nan_weight_is_refused_by_head_reward_naming_weight(comfy, reno_handle):
    folder = _heads_folder(comfy)
    name = "f2-head.safetensors"
    if not (folder / name).exists():
        save_head(_head(1), folder / name)
    with pytest.raises(ValueError, match=r"^weight nan is not a finite number; expected a number from 0 to 100$"):
        comfy.run_node("LatentCLIPHeadReward", latent_clip=reno_handle, head_name=name, label="busy",
                       mode="increase", weight=float("nan"))
    chain = comfy.run_node("LatentCLIPHeadReward", latent_clip=reno_handle, head_name=name, label="busy",
                           mode="increase", weight=0.5).result[0]
    assert len(chain) == 1 and chain[0].weight == 0.5


# -- F4 -------------------------------------------------------------------------------------------
def test_metadata_claiming_a_huge_head_is_refused_before_allocating_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    from latentclip import CheckpointError
    from latentclip.checkpoints import read_safetensors_header
    from latentclip.heads import load_head
    good = save_head(Head(32, ["a", "b"], 0), tmp_path / "good.safetensors")
    meta = dict(read_safetensors_header(good)["__metadata__"])
    meta["hidden"] = "65536"   # 32 x 65536 + 65536 x 2 floats would be built before the tensors are compared
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata=meta)
    built = []
    real_init = torch.nn.Linear.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.weight.device.type != "meta":
            built.append(self.weight.numel())
    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    with pytest.raises(CheckpointError, match=r"^'bad.safetensors' does not fit its metadata"):
        load_head(bad)
    assert max(built, default=0) <= 32 * 2, built
    built.clear()
    head = load_head(good)   # a head that fits still loads, with its weights
    assert torch.equal(head.net[0].weight, load_file(str(good))["net.0.weight"])
    assert not any(p.is_meta for p in head.parameters())
