"""Pixel CLIPs for the baseline reward: open_clip weight files read safely, model name inferred.

open_clip publishes ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors`` state dicts
without their architecture name; the name is found by matching tensor shapes against open_clip's
own model configs (``quickgelu`` variants share shapes: pass ``model_name`` to pick one).
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from .checkpoints import non_finite_key, read_safetensors_header, read_state_dict
from .errors import CheckpointError

#: The format tag of the mini-world's pixel CLIP files (``latentclip.miniworld.clips.save_clip``).
MINI_PIXEL_FORMAT = "latentclip-mini-pixel-clip"


def tokenizer_of(model):
    """open_clip's BPE tokenizer at ``model``'s text context length."""
    return open_clip.SimpleTokenizer(context_length=model.context_length)


def _signature_from_state_dict(sd: dict) -> dict | None:
    conv = sd.get("visual.conv1.weight")
    if conv is None or "visual.positional_embedding" not in sd or "token_embedding.weight" not in sd:
        return None
    ranks = {"visual.conv1.weight": 4, "visual.positional_embedding": 2, "visual.proj": 2,
             "token_embedding.weight": 2, "positional_embedding": 2}
    for key, rank in ranks.items():  # a file with tensors of the wrong rank is not an open_clip ViT
        if key not in sd or sd[key].dim() != rank:
            return None
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    return {"channels": conv.shape[1], "width": conv.shape[0], "patch": conv.shape[2], "image": grid * conv.shape[2],
            "layers": layers, "embed": sd["visual.proj"].shape[1], "text_width": sd["token_embedding.weight"].shape[1],
            "text_layers": text_layers, "context": sd["positional_embedding"].shape[0]}


def _signature_from_config(cfg: dict) -> dict | None:
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "timm_model_name" in v or "hf_model_name" in t or not isinstance(v.get("layers"), int):
        return None
    patch = v.get("patch_size", 16)
    return {"channels": 3, "width": v.get("width", 768), "patch": patch, "image": v.get("image_size", 224),
            "layers": v["layers"], "embed": cfg["embed_dim"], "text_width": t.get("width", 512),
            "text_layers": t.get("layers", 12), "context": t.get("context_length", 77)}


def _hugging_face_part(cfg: dict) -> str | None:
    """What open_clip would fetch from Hugging Face to build config ``cfg`` or its tokenizer, or None.

    ``create_model`` downloads a ``hf_model_name`` text tower (weights by default, its config always) and
    ``get_tokenizer`` a ``hf_tokenizer_name`` tokenizer, whatever the weights file holds."""
    text = cfg.get("text_cfg") or {}
    if "hf_model_name" in text:
        return f"its text tower is the Hugging Face model {text['hf_model_name']!r}"
    if "hf_tokenizer_name" in text:
        return f"its tokenizer is the Hugging Face tokenizer {text['hf_tokenizer_name']!r}"
    return None


def check_finite_weights(sd: dict, path: Path) -> None:
    """Refuse a file with NaN or infinite weights, as the Latent-CLIP reader does (``checkpoints.non_finite_key``):
    it would load, and ReNO would return the unoptimised image with a NaN loss."""
    bad = non_finite_key(sd)
    if bad is not None:
        raise CheckpointError(f"'{path.name}' stores NaN or infinite values in {bad!r}; expected finite weights "
                              "(a damaged download or a half-precision export that overflowed)")


def infer_model_name(sd: dict) -> str:
    """The open_clip architecture whose shapes match ``sd`` (plain names preferred over -quickgelu)."""
    want = _signature_from_state_dict(sd)
    if want is None:
        raise CheckpointError("the file is not an open_clip ViT CLIP (no visual.conv1 / token_embedding weights)")
    if want["channels"] != 3:
        raise CheckpointError(f"the file's image tower reads {want['channels']} channels: it is a Latent-CLIP, not a pixel CLIP")
    names = sorted(open_clip.list_models(), key=lambda n: ("quickgelu" in n, len(n), n))
    refused = None
    for name in names:
        cfg = open_clip.get_model_config(name) or {}
        if _signature_from_config(cfg) == want:
            why = _hugging_face_part(cfg)
            if why is None:
                return name
            refused = refused or (name, why)
    if refused:
        raise CheckpointError(f"the file's shapes match open_clip's {refused[0]}, but {refused[1]}, which would be "
                              "downloaded (nothing is downloaded); expected a CLIP with open_clip's own tokenizer")
    raise CheckpointError(f"no open_clip architecture matches the file's shapes {want}; pass the model name")


def check_model_name(model_name: str) -> str:
    """``model_name`` if it is one of open_clip's built-in architectures.

    A name is data from a workflow: ``hf-hub:org/repo`` or a local config path would make open_clip
    download or read files, so only the names open_clip ships configs for are accepted, and of those
    only the ones built without Hugging Face (SigLIP, CLIPA, MetaCLIP-worldwide and the multilingual
    text towers fetch their tokenizer or text model from the Hub).
    """
    if model_name not in open_clip.list_models():
        raise CheckpointError(f"model_name {model_name!r} is not an open_clip architecture; expected a built-in name "
                              "such as ViT-H-14 or ViT-B-32 (hf-hub: names are refused: nothing is downloaded), "
                              "or empty to infer it from the file")
    why = _hugging_face_part(open_clip.get_model_config(model_name) or {})
    if why:
        raise CheckpointError(f"model_name {model_name!r} is refused: {why}, which open_clip would download (nothing "
                              "is downloaded); expected an architecture with open_clip's own tokenizer such as "
                              "ViT-H-14 or ViT-B-32")
    return model_name


def load_pixel_clip(path, model_name: str | None = None, device="cpu", dtype=torch.float32):
    """(model, tokenizer, model_name) from an open_clip weight file, read without unpickling code.

    The mini-world's pixel CLIP (a file tagged with its own format, architecture in its metadata) is read
    by its own reader; ``model_name`` does not apply to it."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file() and \
            read_safetensors_header(path).get("__metadata__", {}).get("format") == MINI_PIXEL_FORMAT:
        from .miniworld.clips import load_pixel_clip as load_mini
        with torch.inference_mode(False):
            mini = load_mini(path).clip
            check_finite_weights(mini.state_dict(), path)
            mini = mini.to(device=device, dtype=dtype)
        return mini, tokenizer_of(mini), "mini-world pixel CLIP"
    if model_name:
        check_model_name(model_name)
    raw, _ = read_state_dict(path)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
    check_finite_weights(sd, path)
    name = model_name or infer_model_name(sd)
    with torch.inference_mode(False):  # rewards backpropagate through it
        model = open_clip.create_model(name, pretrained=None)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:   # torch's first line is only "Error(s) in loading state_dict for CLIP:"
            why = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:160]
            raise CheckpointError(f"'{path.name}' does not fit open_clip model {name} ({why}); give the model_name of "
                                  "the file's architecture, or leave it empty to infer it") from None
        # moved here too: a move under the executor's inference mode would make inference tensors
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(name), name
