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
import latentclip.pixel_clip
from latentclip.errors import CheckpointError, InputError
from latentclip.families import family_of_latent_format

LATENT_CLIP_FOLDER = "latent_clip"
OPEN_CLIP_FOLDER = "open_clip"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE_CHOICES, DTYPE_CHOICES = ["default", "cpu"], ["auto", *DTYPES]   # the loader's device and dtype lists
_CACHE_SIZE = 2  # loaded Latent-CLIP files kept; older ones are dropped and freed by ComfyUI


def register_model_folders() -> None:
    """Register ``models/latent_clip`` and ``models/open_clip`` with ComfyUI's folder paths, after any folder a
    user configured for them in extra_model_paths.yaml (read before custom nodes load): Hub downloads go to
    the first of them that can be written (``loaders.download_folder``), the user's when it can."""
    for name in (LATENT_CLIP_FOLDER, OPEN_CLIP_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=False)
        folder_paths.folder_names_and_paths[name][1].update(folder_paths.supported_pt_extensions)


class WholeModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher that loads and offloads its model whole, never part of it.

    ComfyUI's partial (lowvram) load moves a model module by module and casts weights on the fly only
    for ``comfy.ops`` layers. The Latent-CLIP and open_clip's pixel CLIP are plain torch modules: a
    partial load would leave some of their layers on the offload device, and ``_load_list`` skips every
    module that holds a parameter directly while having children (``logit_scale``, both
    ``positional_embedding``s, ``text_projection``, ``class_embedding``, ``visual.proj``, every
    ``nn.MultiheadAttention.in_proj_weight``), so the forward pass would mix devices. Both models are
    small next to a UNet and are needed whole for every reward or guidance call, so they are loaded
    whole or not at all: model management offloads other models to make room, or this one entirely.
    """

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        return super().load(device_to, 0, force_patch_weights=force_patch_weights, full_load=True)

    def partially_unload(self, device_to, memory_to_free=0):
        return 0   # nothing freed in part: ComfyUI's model_unload then offloads the whole model


def ready_for_grad(model: torch.nn.Module) -> torch.nn.Module:
    """Replace inference-tensor parameters and buffers of ``model`` by normal clones, in place.

    ComfyUI's executor runs under ``torch.inference_mode()``; on a GPU, ``ModelPatcher.load`` moves the
    model with ``Module.to`` there, which re-creates every moved parameter and buffer (``attn_mask``
    included) as an inference tensor that autograd refuses to save. Cloning outside inference mode
    gives tensors a backward pass can use; it costs nothing when nothing was moved (CPU).
    """
    with torch.inference_mode(False):
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, t in list(store.items()):
                    if t is not None and t.is_inference():
                        clone = t.clone()
                        store[key] = torch.nn.Parameter(clone, requires_grad=False) if store is module._parameters else clone
    return model


class GradModelHandle:
    """A plain torch model (Latent-CLIP, pixel CLIP) in a ``WholeModelPatcher``: counted, offloadable."""

    def __init__(self, model: torch.nn.Module, load_device, offload_device, name: str):
        self.patcher = WholeModelPatcher(model, load_device=load_device, offload_device=offload_device)
        self.name = name

    def load(self) -> torch.nn.Module:
        """The model on its load device, loaded through ComfyUI's model management."""
        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.patcher.model

    def load_for_grad(self) -> torch.nn.Module:
        """Like ``load`` but with weights and buffers autograd may save (see ``ready_for_grad``)."""
        return ready_for_grad(self.load())

    def loaded_for_grad(self) -> torch.nn.Module:
        """``load_for_grad`` without a load: the caller loaded the model already, in one list with the UNet
        (a load of its own would let model management free memory from that UNet)."""
        return ready_for_grad(self.patcher.model)

    def load_for_grad_with(self, unet_patcher) -> torch.nn.Module:
        """``load_for_grad`` for a sampling run, before its first model call: the model as sampling loaded
        it with the UNet (an additional model of the MODEL), else loaded now in one list with the UNet.
        A load of its own later, mid-sampling, would let model management offload the UNet to make room."""
        if all(p.model is not self.patcher.model for p in mm.loaded_models()):   # sampling loads a clone
            mm.load_models_gpu([unet_patcher, self.patcher])   # WholeModelPatcher loads itself whole
        return ready_for_grad(self.patcher.model)


class LatentCLIPHandle(GradModelHandle):
    """What flows on a LATENT_CLIP socket: a Latent-CLIP inside a ComfyUI ModelPatcher."""

    @property
    def vae_family(self) -> str:
        return self.patcher.model.vae_family

    def __repr__(self):
        return f"LatentCLIP({self.name}, vae={self.vae_family})"


class PixelCLIPHandle(GradModelHandle):
    """An open_clip pixel CLIP (ReNO's baseline reward) and its tokenizer, under model management."""

    def __init__(self, model, tokenizer, model_name: str, load_device, offload_device, name: str):
        super().__init__(model, load_device, offload_device, name)
        self.tokenizer, self.model_name = tokenizer, model_name

    def __repr__(self):
        return f"PixelCLIP({self.name}, {self.model_name})"


_cache: "collections.OrderedDict[tuple, GradModelHandle]" = collections.OrderedDict()
_cache_lock = threading.Lock()


def _cached(key: tuple, build, size: int = _CACHE_SIZE):
    """The cached handle for ``key``, else ``build()`` stored; at most ``size`` handles of its kind kept
    (dropped ones are freed by ComfyUI once nothing refers to their patcher)."""
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    handle = build()
    with _cache_lock:
        _cache[key] = handle
        same = [k for k, h in _cache.items() if isinstance(h, type(handle))]
        for k in same[:max(0, len(same) - size)]:
            del _cache[k]
    return handle


def _resolve_dtype(dtype: str, device) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if mm.should_use_fp16(device):  # fp16 first: embeddings within 0.2% of fp32 (bf16: ~1%)
        return torch.float16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


def check_finite_sigmas(sigmas: torch.Tensor, expected: str, cause: str = "") -> None:
    """A schedule with NaN or inf (an EDM schedule fed turbo timesteps, a broken custom one) is one sentence
    naming ``sigmas``, not NaN latents reported later at a reward."""
    if not torch.isfinite(sigmas).all():
        raise InputError(f"sigmas contains NaN or infinite values{cause}; expected {expected}")


def model_file_problem(folder: str, input_name: str, name, offered: list | None = None) -> str | None:
    """Why ``name`` is not a file listed in the registered ``models/<folder>``, or None.

    Only names from ComfyUI's own listing are accepted, so a workflow can never make the pack open a
    path of its choosing (``../../etc/passwd``, an absolute path, a link that is not listed). The refusal
    suggests ``offered`` (the node's list) when given: ComfyUI's listing also holds the pack's other weights.
    """
    listed = folder_paths.get_filename_list(folder)
    if isinstance(name, str) and name in listed and folder_paths.get_full_path(folder, name) is not None:
        return None
    shown = listed if offered is None else offered
    return f"{input_name} {name!r} is not a file in models/{folder}; expected one of {shown[:8]}"


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


def _devices(device: str = "default"):
    """(load device, offload device). The offload device is the CPU in every VRAM mode: the pack keeps
    these models in a module-level cache between prompts, so with ComfyUI's UNet offload device
    (the GPU under --highvram / --gpu-only) they would stay on the card after ComfyUI unloads them and
    after POST /free."""
    if device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    return mm.get_torch_device(), torch.device("cpu")


def _file_key(path: str) -> tuple:
    stat = os.stat(path)
    return path, stat.st_mtime_ns, stat.st_size


def model_file_fingerprint(folder: str, name) -> tuple | None:
    """(path, time, size) of model file ``name``, None without one: a loader's ``fingerprint_inputs``. ComfyUI
    reuses a node's output while its inputs stay the same, so a file replaced on disk would never load again."""
    path = folder_paths.get_full_path(folder, name) if isinstance(name, str) else None
    try:
        return _file_key(path) if path else None
    except OSError:   # gone since it was listed: the loader's own error says so
        return None


def load_latent_clip(ckpt_name: str, device: str = "default", dtype: str = "auto") -> LatentCLIPHandle:
    """Load (or reuse) a Latent-CLIP from the registered folder; weights built outside inference mode."""
    path = model_file_path(LATENT_CLIP_FOLDER, "ckpt_name", ckpt_name)
    for input_name, value, choices in (("device", device, DEVICE_CHOICES), ("dtype", dtype, DTYPE_CHOICES)):
        if value not in choices:   # ComfyUI checks no V3 Combo against its list: an API graph's typo lands here
            raise InputError(f"{input_name} {value!r} is not one of {choices}")
    load_device, offload_device = _devices(device)
    torch_dtype = _resolve_dtype(dtype, load_device)

    def build():
        try:
            with torch.inference_mode(False):  # inference tensors could never take part in backward later
                model = latentclip.load(path, device=offload_device, dtype=torch_dtype)
        except CheckpointError as e:
            raise naming_the_input(e, "ckpt_name", ckpt_name) from None
        return LatentCLIPHandle(model, load_device, offload_device, ckpt_name)

    return _cached(("latent",) + _file_key(path) + (str(load_device), str(torch_dtype)), build)


def load_pixel_clip(clip_name: str, model_name: str = "") -> PixelCLIPHandle:
    """Load (or reuse) an open_clip pixel CLIP from models/open_clip, in float32 (one kept: they are large)."""
    path = model_file_path(OPEN_CLIP_FOLDER, "clip_name", clip_name)
    load_device, offload_device = _devices()

    def build():
        try:
            model, tokenizer, name = latentclip.pixel_clip.load_pixel_clip(path, model_name or None, device=offload_device)
        except CheckpointError as e:
            raise naming_the_input(e, "clip_name", clip_name) from None
        return PixelCLIPHandle(model, tokenizer, name, load_device, offload_device, clip_name)

    return _cached(("pixel",) + _file_key(path) + (model_name, str(load_device)), build, size=1)


def cached_models() -> int:
    """How many Latent-CLIPs the pack holds."""
    return sum(isinstance(h, LatentCLIPHandle) for h in _cache.values())


def cached_pixel_clips() -> int:
    return sum(isinstance(h, PixelCLIPHandle) for h in _cache.values())


# -- LATENT ------------------------------------------------------------------------------------
def latent_samples(latent, model: latentclip.LatentCLIP, name: str = "samples") -> torch.Tensor:
    """The validated ``samples`` of a LATENT as image latents [B, C, H, W] (never modified; callers must
    not write to it). A 3-D family's single frame [B, C, 1, H, W] comes as a view without the frame axis."""
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
        out["noise_mask"] = mask if mask.ndim < 3 or mask.shape[0] == 1 else mask_items(mask, idx)
    return out


def mask_items(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The masks of items ``idx``: ComfyUI's samplers tile a batch of n masks over the latents (item i
    uses mask[i % n], ``comfy.utils.repeat_to_batch_size``), so a kept item keeps the mask it had."""
    return mask.index_select(0, idx.to(mask.device) % mask.shape[0])


def text_lines(text: str, name: str) -> list[str]:
    return latentclip.scoring.split_lines(text, name)


# -- MODEL -------------------------------------------------------------------------------------
def model_latent_format(model) -> str:
    """The class name of a ComfyUI MODEL's latent format (a ModelPatcher or its BaseModel)."""
    return type(getattr(model, "model", model).latent_format).__name__


def model_vae_family(model) -> str | None:
    """The VAE family of a ComfyUI MODEL, from its latent format (weights/families); None if none maps it."""
    return family_of_latent_format(model_latent_format(model))


def check_vae_family(handle: LatentCLIPHandle, model) -> None:
    """Refuse a Latent-CLIP trained on another VAE than the MODEL's, in one sentence naming both."""
    family = model_vae_family(model)
    if family != handle.vae_family:
        makes = (f"{family.upper()} latents" if family else
                 f"{model_latent_format(model)} latents, which no VAE family in weights/families covers")
        raise InputError(f"latent_clip reads {handle.vae_family.upper()}-VAE latents but the model makes {makes}; "
                         "use a Latent-CLIP trained on the model's VAE")


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
        try:
            self._patch()
        except BaseException:
            self.__exit__(None, None, None)   # a clone failed halfway (out of memory): put everything back
            raise
        return self

    def _patch(self):
        # each module once: one reached from two roots (two pixel rewards on one VAE) was patched twice, and the
        # exit then put back its second saved list, which already held an identity
        patched = set()
        for root in self.modules:
            for m in root.modules():
                if id(m) in patched:
                    continue
                patched.add(id(m))
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
