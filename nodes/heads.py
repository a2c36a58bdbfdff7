"""Head nodes: a classifier trained on a CLIP's image embeddings, applied to LATENTs through a Latent-CLIP.

A head file (``latentclip.heads``) lives in models/latent_clip_heads. ``LatentCLIPHeadScore`` reports
its probabilities for each latent without decoding; ``LatentCLIPHeadReward`` adds it to a reward
chain (ReNO, Search Sampler) to raise or lower one label's probability.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass

import torch
import folder_paths
from comfy_api.latest import io, ui

from latentclip.errors import CheckpointError, InputError
from latentclip.heads import check_compatible, load_head
from latentclip.rewards import LatentHead
from latentclip.scoring import check_finite_features

from .comfy_bridge import (check_vae_family, latent_samples, model_file_path, model_file_problem, naming_the_input,
                           ready_for_grad)
from .loaders import LatentCLIPType
from .reno import LatentRewardType

HEADS_FOLDER = "latent_clip_heads"
CATEGORY = "latent_clip"
_CACHE: dict = {}


def register_heads_folder() -> None:
    """``models/latent_clip_heads``: head files (.safetensors), after a folder the user configured for them."""
    folder_paths.add_model_folder_path(HEADS_FOLDER, os.path.join(folder_paths.models_dir, HEADS_FOLDER), is_default=False)
    folder_paths.folder_names_and_paths[HEADS_FOLDER][1].update({".safetensors"})


register_heads_folder()


def _file_version(path: str) -> tuple:
    """What changes when a file is written or replaced: also the size, the inode and the status-change time,
    which a copy that keeps the modification time (``cp -p``, rsync -a, an unpacked archive) cannot set."""
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns


def head_fingerprint(head_name) -> tuple | None:
    """The head file's version, None without one: the head nodes' ``fingerprint_inputs``. ComfyUI reuses a node's
    output while its inputs stay the same, so a head file replaced under the same name would never be read again."""
    path = folder_paths.get_full_path(HEADS_FOLDER, head_name) if isinstance(head_name, str) else None
    try:
        return _file_version(path) if path else None
    except OSError:   # gone since it was listed: the node's own error says so
        return None


def head_for(head_name: str):
    """The head in models/latent_clip_heads named ``head_name`` (read once per file version)."""
    path = model_file_path(HEADS_FOLDER, "head_name", head_name)
    key = _file_version(path)
    if key not in _CACHE:
        try:
            with torch.inference_mode(False):  # a reward backpropagates through the head
                head = load_head(path)
        except CheckpointError as e:
            raise naming_the_input(e, "head_name", head_name) from None
        _CACHE.clear()
        _CACHE[key] = head
    return _CACHE[key]


def checked_head(latent_clip, head_name: str):
    """The head named ``head_name``, refused at once, naming that input, if it reads another embedding width
    than ``latent_clip`` makes (a reward found it only after ReNO had loaded every model)."""
    head = head_for(head_name)
    try:
        check_compatible(head, latent_clip.patcher.model)
    except InputError as e:
        raise InputError(f"head_name {head_name!r}: {e}") from None
    return head


def _head_input():
    return io.Combo.Input("head_name", options=folder_paths.get_filename_list(HEADS_FOLDER),
                          tooltip="Head file in models/latent_clip_heads (trained on the Latent-CLIP's embedding space)")


def head_on(name: str, device):
    """A copy of the cached head on ``device``, with weights autograd may save. Moving the cached head itself
    would leave it on that device, and on a GPU the move under the executor's inference mode re-creates its
    weights as inference tensors, which a ReNO backward through it refuses."""
    with torch.inference_mode(False):
        return ready_for_grad(copy.deepcopy(head_for(name)).to(device))


@dataclass(frozen=True)
class HeadTermSpec:
    """A head reward term as chosen in the graph; built into a core ``LatentHead`` when sampling."""
    handle: object
    head_name: str
    label: str
    mode: str
    weight: float

    def build_term(self, base_model, index: int, loaded: bool = False):
        """The head's reward term; ``loaded``: the caller loaded the Latent-CLIP already (``build_reward``)."""
        if base_model is not None:
            check_vae_family(self.handle, base_model)
        model = self.handle.loaded_for_grad() if loaded else self.handle.load_for_grad()
        return LatentHead(model, head_on(self.head_name, model.device), self.label, self.mode, self.weight,
                          name=f"head{index}")


class LatentCLIPHeadScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPHeadScore",
            display_name="Latent-CLIP Head Score",
            category=CATEGORY,
            description="Applies a head (a small classifier on the CLIP image-embedding space) to each latent "
                        "through the Latent-CLIP, without decoding: the probability of a label per item.",
            inputs=[
                LatentCLIPType.Input("latent_clip"),
                io.Latent.Input("samples"),
                _head_input(),
                io.String.Input("label", default="", tooltip="Label whose probability is the score; empty: "
                                "each item's most likely label"),
            ],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True),
                     io.String.Output(display_name="labels"), io.String.Output(display_name="probabilities")],
        )

    @classmethod
    def validate_inputs(cls, head_name):
        return head_name is None or model_file_problem(HEADS_FOLDER, "head_name", head_name) or True

    @classmethod
    def fingerprint_inputs(cls, head_name=None, **kwargs):
        return head_fingerprint(head_name)

    @classmethod
    def execute(cls, latent_clip, samples, head_name, label="") -> io.NodeOutput:
        model = latent_clip.load()
        x = latent_samples(samples, model)
        head = checked_head(latent_clip, head_name)
        index = head.label_index(label.strip()) if label.strip() else None
        with torch.no_grad():
            # no NaN score: it is never above a safety threshold, and it named the head's first label as likeliest
            features = check_finite_features(model.encode_latents(x), "samples")
            probs = head_on(head_name, model.device).probabilities(features).cpu()
        best = probs.argmax(-1).tolist()
        chosen = best if index is None else [index] * len(best)
        scores = [round(float(probs[i, k]), 4) for i, k in enumerate(chosen)]
        names = [head.labels[k] for k in best]
        table = [{n: round(float(p), 4) for n, p in zip(head.labels, row)} for row in probs]
        report = "\n".join(f"#{i}: {n} ({p:.3f})" for i, (n, p) in enumerate(zip(names, probs.max(-1).values.tolist())))
        return io.NodeOutput(scores, "\n".join(names), json.dumps(table), ui=ui.PreviewText(report))


class LatentCLIPHeadReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPHeadReward",
            display_name="Latent-CLIP Head Reward",
            category="latent_clip/reno",
            description="A reward term from a head on the Latent-CLIP's embedding: raise (-log p) or lower "
                        "(-log(1 - p)) the probability of one label. Chains with the other reward terms.",
            inputs=[
                LatentCLIPType.Input("latent_clip"),
                _head_input(),
                io.String.Input("label", default="", tooltip="One of the head's labels"),
                io.Combo.Input("mode", options=list(LatentHead.MODES), default="increase"),
                io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.01),
                LatentRewardType.Input("reward", optional=True, tooltip="Chain: terms are added"),
            ],
            outputs=[LatentRewardType.Output(display_name="reward")],
        )

    @classmethod
    def validate_inputs(cls, head_name):
        return head_name is None or model_file_problem(HEADS_FOLDER, "head_name", head_name) or True

    @classmethod
    def fingerprint_inputs(cls, head_name=None, **kwargs):
        return head_fingerprint(head_name)

    @classmethod
    def execute(cls, latent_clip, head_name, label, mode="increase", weight=1.0, reward=None) -> io.NodeOutput:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            # ComfyUI's FLOAT validation lets NaN through (an API prompt can carry one); ReNO refused it only later
            raise InputError(f"weight {weight!r} is not a finite number; expected a number from 0 to 100")
        checked_head(latent_clip, head_name).label_index(label.strip())   # refused here, not mid-sampling
        spec = HeadTermSpec(latent_clip, head_name, label.strip(), mode, value)
        return io.NodeOutput(tuple(reward or ()) + (spec,))


NODES = [LatentCLIPHeadScore, LatentCLIPHeadReward]
