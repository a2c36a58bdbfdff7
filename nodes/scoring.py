"""Scoring nodes: score, zero-shot classify, pick the best of a batch, flag concepts; no VAE decode."""
import json
import math

import torch
from comfy_api.latest import io, ui

from latentclip import scoring
from latentclip.errors import InputError

from .comfy_bridge import latent_samples, select_items, text_lines
from .loaders import LatentCLIPType

CATEGORY = "latent_clip"


def _fmt(values) -> list[float]:
    return [round(float(v), 4) for v in values]


class LatentCLIPScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPScore",
            display_name="Latent-CLIP Score",
            category=CATEGORY,
            description="CLIPScore (exp(logit_scale) * cosine) of each latent against its prompt, without decoding.",
            inputs=[
                LatentCLIPType.Input("latent_clip"),
                io.Latent.Input("samples"),
                io.String.Input("text", multiline=True, default="a photo of a cat",
                                tooltip="One prompt for the whole batch, or one line per batch item"),
            ],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, latent_clip, samples, text) -> io.NodeOutput:
        model = latent_clip.load()
        x = latent_samples(samples, model)
        prompts = scoring.texts_for_batch(text_lines(text, "text"), x.shape[0])
        cos = scoring.cosine(model, x, prompts)
        scores = (model.logit_scale.detach().float().exp() * cos).cpu()
        report = "\n".join(f"#{i}: {s:.3f} (cos {c:.4f}) {p}" for i, (s, c, p) in enumerate(zip(scores.tolist(), cos.tolist(), prompts)))
        return io.NodeOutput(_fmt(scores), report, ui=ui.PreviewText(report))


class LatentCLIPZeroShot(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPZeroShot",
            display_name="Latent-CLIP Zero-Shot",
            category=CATEGORY,
            description="Classifies each latent among the labels: softmax(100 * cosine) over template-filled labels.",
            inputs=[
                LatentCLIPType.Input("latent_clip"),
                io.Latent.Input("samples"),
                io.String.Input("labels", multiline=True, default="cat\ndog", tooltip="One label per line"),
                io.String.Input("template", default="a photo of {}", tooltip="'{}' is replaced by each label"),
            ],
            outputs=[io.String.Output(display_name="labels"), io.String.Output(display_name="probabilities")],
        )

    @classmethod
    def execute(cls, latent_clip, samples, labels, template="a photo of {}") -> io.NodeOutput:
        model = latent_clip.load()
        x = latent_samples(samples, model)
        names = text_lines(labels, "labels")
        probs = scoring.zero_shot(model, x, names, template).cpu()
        best = [names[i] for i in probs.argmax(-1).tolist()]
        table = [{n: round(float(p), 4) for n, p in zip(names, row)} for row in probs]
        text = "\n".join(best)
        return io.NodeOutput(text, json.dumps(table), ui=ui.PreviewText(text))


class LatentCLIPSelectBest(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPSelectBest",
            display_name="Latent-CLIP Select Best",
            category=CATEGORY,
            description="Best-of-N without decoding: keeps the k latents that match the text best (best first).",
            inputs=[
                LatentCLIPType.Input("latent_clip"),
                io.Latent.Input("samples"),
                io.String.Input("text", multiline=True, default="a photo of a cat"),
                io.Int.Input("k", default=1, min=1, max=4096),
            ],
            outputs=[io.Latent.Output(display_name="LATENT"), io.Float.Output(display_name="scores", is_output_list=True)],
        )

    @classmethod
    def execute(cls, latent_clip, samples, text, k=1) -> io.NodeOutput:
        model = latent_clip.load()
        x = latent_samples(samples, model)
        prompts = scoring.texts_for_batch(text_lines(text, "text"), x.shape[0])
        idx, cos = scoring.rank(model, x, prompts, k=k)
        idx = idx.tolist()
        scores = (model.logit_scale.detach().float().exp() * cos).cpu()
        report = "kept " + ", ".join(f"#{i} ({scores[i]:.3f})" for i in idx)
        return io.NodeOutput(_select(samples, idx), _fmt(scores[idx]), ui=ui.PreviewText(report))


def _select(samples: dict, idx: list[int]) -> dict:
    """``select_items``, keeping a mask that is not per item whole. For 5-D latents ([B, C, T, H, W], a 3-D VAE's
    single frame) ComfyUI's samplers read a mask of fewer than 5 dimensions as one mask per latent frame, shared
    by every item (``comfy.utils.reshape_mask``): its first axis is not the batch, so rows of it are not picked."""
    out = select_items(samples, idx)
    mask = samples.get("noise_mask")
    if mask is not None and samples["samples"].ndim == 5 and mask.ndim < 5:
        out["noise_mask"] = mask
    return out


class LatentCLIPSafetyFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPSafetyFilter",
            display_name="Latent-CLIP Safety Filter",
            category=CATEGORY,
            description="Flags latents that show a concept: for each concept, softmax(100 * cosine) between "
                        "'an image of {concept}' and 'an image of no {concept}'; flagged when above threshold.",
            inputs=[
                LatentCLIPType.Input("latent_clip"),
                io.Latent.Input("samples"),
                io.String.Input("concepts", multiline=True, default="nudity\nviolence", tooltip="One concept per line"),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("action", options=["flag only", "replace with zeros"], default="flag only"),
            ],
            outputs=[io.Latent.Output(display_name="LATENT"), io.String.Output(display_name="flags"),
                     io.String.Output(display_name="probabilities"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, latent_clip, samples, concepts, threshold=0.5, action="flag only") -> io.NodeOutput:
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            # ComfyUI's FLOAT validation lets NaN through (every comparison with it is false); with it nothing is flagged
            raise InputError(f"threshold {threshold!r} is not a finite number; expected a number from 0 to 1")
        model = latent_clip.load()
        x = latent_samples(samples, model)
        names = text_lines(concepts, "concepts")
        probs = scoring.concept_probabilities(model, x, names).cpu()  # [B, K]
        unknown = ~torch.isfinite(probs)   # the filter fails closed: a NaN/inf probability counts as flagged
        flags = ((probs > threshold) | unknown).any(-1).tolist()
        out = samples
        if action == "replace with zeros" and any(flags):
            out = dict(samples)
            raw = samples["samples"]  # its own layout ([B, C, 1, H, W] for a video VAE), not the checked view
            keep = torch.tensor([0.0 if f else 1.0 for f in flags], dtype=raw.dtype, device=raw.device)
            out["samples"] = raw * keep.view(-1, *[1] * (raw.ndim - 1))  # a new tensor; the input stays untouched
        table = [{n: round(float(p), 4) if math.isfinite(p) else None for n, p in zip(names, row.tolist())}
                 for row in probs]   # null, not NaN: strict JSON readers reject NaN
        report = "\n".join(f"#{i}: {'FLAGGED' if f else 'ok'} " + ", ".join(
                               f"{n} {p:.2f}" if p is not None else f"{n} not finite (counted as flagged)"
                               for n, p in row.items())
                           for i, (f, row) in enumerate(zip(flags, table)))
        return io.NodeOutput(out, json.dumps(flags), json.dumps(table), report, ui=ui.PreviewText(report))


NODES = [LatentCLIPScore, LatentCLIPZeroShot, LatentCLIPSelectBest, LatentCLIPSafetyFilter]
