"""The boundary between ComfyUI objects and the ``latentclip`` core.

Converts once at the edge: LATENT dicts to validated raw-latent tensors and back, model files to
cached Latent-CLIPs managed by ComfyUI's model management, MODEL latent formats to VAE families.
"""
from __future__ import annotations

import collections
import os
import threading

import torch

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

import latentclip
from latentclip.errors import CheckpointError, InputError

LATENT_CLIP_FOLDER = "latent_clip"
OPEN_CLIP_FOLDER = "open_clip"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CACHE_SIZE = 2  # loaded Latent-CLIP files kept; older ones are dropped and freed by ComfyUI


def register_model_folders() -> None:
    """Register ``models/latent_clip`` and ``models/open_clip`` with ComfyUI's folder paths."""
    for name in (LATENT_CLIP_FOLDER, OPEN_CLIP_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        folder_paths.folder_names_and_paths[name][1].update(folder_paths.supported_pt_extensions)


class LatentCLIPHandle:
    """What flows on a LATENT_CLIP socket: a Latent-CLIP inside a ComfyUI ModelPatcher."""

    def __init__(self, model: latentclip.LatentCLIP, load_device, offload_device, name: str):
        self.patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
        self.name = name

    @property
    def vae_family(self) -> str:
        return self.patcher.model.vae_family

    def load(self) -> latentclip.LatentCLIP:
        """The model on its load device, loaded through ComfyUI's model management."""
        mm.load_models_gpu([self.patcher])
        return self.patcher.model

    def load_for_grad(self) -> latentclip.LatentCLIP:
        """Like ``load`` but with weights autograd may save (moves made under inference mode are not)."""
        model = self.load()
        with torch.inference_mode(False):
            for module in model.modules():
                for key, p in list(module._parameters.items()):
                    if p is not None and p.is_inference():
                        module._parameters[key] = torch.nn.Parameter(p.clone(), requires_grad=False)
        return model

    def __repr__(self):
        return f"LatentCLIP({self.name}, vae={self.vae_family})"


_cache: "collections.OrderedDict[tuple, LatentCLIPHandle]" = collections.OrderedDict()
_cache_lock = threading.Lock()


def _resolve_dtype(dtype: str, device) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if mm.should_use_fp16(device):  # fp16 first: embeddings within 0.2% of fp32 (bf16: ~1%)
        return torch.float16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


def model_file_problem(folder: str, input_name: str, name) -> str | None:
    """Why ``name`` is not a file listed in the registered ``models/<folder>``, or None.

    Only names from ComfyUI's own listing are accepted, so a workflow can never make the pack open a
    path of its choosing (``../../etc/passwd``, an absolute path, a link that is not listed).
    """
    listed = folder_paths.get_filename_list(folder)
    if isinstance(name, str) and name in listed and folder_paths.get_full_path(folder, name) is not None:
        return None
    return f"{input_name} {name!r} is not a file in models/{folder}; expected one of {listed[:8]}"


def model_file_path(folder: str, input_name: str, name) -> str:
    """The full path of a listed model file; InputError (naming the input) otherwise."""
    problem = model_file_problem(folder, input_name, name)
    if problem:
        raise InputError(problem)
    return folder_paths.get_full_path(folder, name)


def naming_the_input(error: CheckpointError, input_name: str, value: str) -> CheckpointError:
    """The same error with the input it came from in front ("ckpt_name 'x.pt' was refused: ...")."""
    text = str(error)
    return CheckpointError(f"{input_name} {text}" if text.startswith(f"{os.path.basename(value)!r}")
                           else f"{input_name} {value!r}: {text}")


def load_latent_clip(ckpt_name: str, device: str = "default", dtype: str = "auto") -> LatentCLIPHandle:
    """Load (or reuse) a Latent-CLIP from the registered folder; weights built outside inference mode."""
    path = model_file_path(LATENT_CLIP_FOLDER, "ckpt_name", ckpt_name)
    if device == "cpu":
        load_device = offload_device = torch.device("cpu")
    else:
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    torch_dtype = _resolve_dtype(dtype, load_device)
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size, str(load_device), str(torch_dtype))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        with torch.inference_mode(False):  # inference tensors could never take part in backward later
            model = latentclip.load(path, device=offload_device, dtype=torch_dtype)
    except CheckpointError as e:
        raise naming_the_input(e, "ckpt_name", ckpt_name) from None
    handle = LatentCLIPHandle(model, load_device, offload_device, ckpt_name)
    with _cache_lock:
        _cache[key] = handle
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return handle


def cached_models() -> int:
    return len(_cache)


# -- LATENT ------------------------------------------------------------------------------------
def latent_samples(latent, model: latentclip.LatentCLIP, name: str = "samples") -> torch.Tensor:
    """The validated ``samples`` tensor of a LATENT (never modified; callers must not write to it)."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise InputError(f"{name} must be a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    return model.check_latents(latent["samples"], name=name)


def select_items(latent: dict, indices: list[int]) -> dict:
    """A new LATENT holding items ``indices`` (in that order), with batch_index and noise_mask kept consistent."""
    samples = latent["samples"]
    idx = torch.as_tensor(indices, dtype=torch.long, device=samples.device)
    out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
    out["samples"] = samples.index_select(0, idx).clone()
    batch_index = latent.get("batch_index", list(range(samples.shape[0])))
    out["batch_index"] = [batch_index[i] for i in indices]
    mask = latent.get("noise_mask")
    if mask is not None:
        out["noise_mask"] = mask.index_select(0, idx.to(mask.device)).clone() if mask.shape[0] == samples.shape[0] else mask
    return out


def text_lines(text: str, name: str) -> list[str]:
    return latentclip.scoring.split_lines(text, name)


# -- MODEL -------------------------------------------------------------------------------------
_LATENT_FORMAT_FAMILY = {"SDXL": "sdxl", "SDXL_Playground_2_5": "sdxl", "SD15": "sd1", "SD3": "sd3",
                         "Flux": "flux", "SC_Prior": "cascade", "SD_X4": "sd_x4", "Wan21": "wan"}


def model_vae_family(model) -> str:
    """The VAE family of a ComfyUI MODEL (a ModelPatcher or its BaseModel), from its latent format."""
    base = getattr(model, "model", model)
    fmt = type(base.latent_format).__name__
    return _LATENT_FORMAT_FAMILY.get(fmt, fmt.lower())


def check_vae_family(handle: LatentCLIPHandle, model) -> None:
    """Refuse a Latent-CLIP trained on another VAE than the MODEL's, in one sentence."""
    family = model_vae_family(model)
    compatible = {"sdxl": {"sdxl"}, "sd1": {"sd1"}}.get(handle.vae_family, {handle.vae_family})
    if family not in compatible:
        raise InputError(f"latent_clip reads {handle.vae_family.upper()}-VAE latents but the model makes "
                         f"{family.upper()} latents; use a Latent-CLIP trained on the model's VAE")


# -- gradients through ComfyUI models ------------------------------------------------------------
def _identity(t):
    return t


class grad_through_comfy_ops:
    """Let autograd flow through a ComfyUI-loaded module whose weights are inference tensors.

    For the duration, every comfy.ops module gets new ``weight_function``/``bias_function`` lists with
    an identity appended, so comfy.ops copies each weight (in grad mode) on every forward instead of
    using the inference tensor itself. Any other inference parameter or buffer (a plain torch module,
    a bare nn.Parameter such as TAESD's scale) is swapped for a normal clone. On exit the original
    list objects and tensors are put back, so nothing about the model, or the patchers sharing it,
    changes.
    """

    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]
        self.saved_functions, self.saved_tensors = [], []

    def __enter__(self):
        for root in self.modules:
            for m in root.modules():
                comfy_op = hasattr(m, "weight_function") and hasattr(m, "bias_function")
                if comfy_op:
                    self.saved_functions.append((m, m.weight_function, m.bias_function))
                    m.weight_function = list(m.weight_function) + [_identity]
                    m.bias_function = list(m.bias_function) + [_identity]
                for store in (m._parameters, m._buffers):
                    for key, t in list(store.items()):
                        if t is None or not t.is_inference() or (comfy_op and key in ("weight", "bias")):
                            continue
                        self.saved_tensors.append((store, key, t))
                        with torch.inference_mode(False):
                            clone = t.clone()
                        store[key] = torch.nn.Parameter(clone, requires_grad=False) if store is m._parameters else clone
        return self

    def __exit__(self, *exc):
        for m, wf, bf in self.saved_functions:
            m.weight_function, m.bias_function = wf, bf
        for store, key, t in reversed(self.saved_tensors):
            store[key] = t
        self.saved_functions.clear()
        self.saved_tensors.clear()
        return False


def interrupt_check() -> None:
    mm.throw_exception_if_processing_interrupted()
