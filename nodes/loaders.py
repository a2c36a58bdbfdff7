"""Loader node: a Latent-CLIP file from models/latent_clip (or an authors' release, fetched once) onto a
LATENT_CLIP socket.

A release is offered by its Hugging Face repo id before and after its download, so a workflow naming the repo id
runs unchanged on every machine; its converted file is used once present and is not listed a second time (a
graph naming that file still runs)."""
import os

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from latentclip import hub
from latentclip.checkpoints import read_safetensors_header

from .comfy_bridge import (DEVICE_CHOICES, DTYPE_CHOICES, LATENT_CLIP_FOLDER, load_latent_clip, model_file_fingerprint,
                           model_file_problem)
from .miniworld import WEIGHTS_DIR as SHIPPED_WEIGHTS

LatentCLIPType = io.Custom("LATENT_CLIP")


def listed_model_files(kind: str, shipped_format_ok) -> list:
    """Files in a model folder (``kind``) that are regular files (or links to one): no FIFO, socket, dangling link
    or other entry the loader would then refuse (ComfyUI's listing keeps every name os.walk yields). Every user file
    is listed; of the pack's own weights/ folder (registered for several kinds) only the files whose format tag
    (None when absent) ``shipped_format_ok`` accepts. A graph naming another file still validates; its loader then
    says what the file is."""
    folders = folder_paths.get_folder_paths(kind)
    return [name for name in folder_paths.get_filename_list(kind)
            if any(os.path.isfile(os.path.join(folder, name)) and _user_or_accepted(folder, name, shipped_format_ok)
                   for folder in folders)]


def _user_or_accepted(folder: str, name: str, shipped_format_ok) -> bool:
    if os.path.realpath(folder) != os.path.realpath(SHIPPED_WEIGHTS):
        return True
    try:
        meta = read_safetensors_header(os.path.join(folder, name)).get("__metadata__") or {}
    except Exception:  # unreadable: the loader's own error explains it when picked
        return True
    return shipped_format_ok(meta.get("format"))


def loadable_files() -> list:
    """Loadable files in models/latent_clip; of the pack's weights/ (the mini-worlds) only the Latent-CLIPs, not
    their generators, VAEs and pixel CLIPs."""
    return listed_model_files(LATENT_CLIP_FOLDER, lambda fmt: (fmt or "latentclip") == "latentclip")


def ckpt_options() -> list:
    """Loadable files in models/latent_clip except the releases' converted files, then every released repo id."""
    converted = {hub.local_name(r) for r in hub.RELEASED}
    return [f for f in loadable_files() if f not in converted] + list(hub.RELEASED)


def fetch_release(repo_id: str) -> str:
    """The file name of ``repo_id``'s converted weights, downloading and converting them on first use with
    ComfyUI's progress bar (interruptible)."""
    name = hub.local_name(repo_id)
    if name in folder_paths.get_filename_list(LATENT_CLIP_FOLDER) and folder_paths.get_full_path(LATENT_CLIP_FOLDER, name):
        return name   # a file (the listing also holds broken links, which hub.fetch explains)
    bar = []

    def progress(done, total):
        mm.throw_exception_if_processing_interrupted()
        if not bar:
            bar.append(comfy.utils.ProgressBar(max(total, 1)))
        bar[0].update_absolute(done, max(total, 1))

    hub.fetch(repo_id, download_folder(), progress=progress)
    return name


def download_folder() -> str:
    """Where a release is written: the first registered models/latent_clip folder (a user's configured folder comes
    first) that can be written, skipping one that cannot (a read-only shared disk, a link to an unmounted one): the
    node has no folder input, so an error asking for a writable folder would leave the user nothing to change.
    Never the pack's own weights/. With no writable folder, the first one, whose error hub.fetch then gives."""
    shipped = os.path.realpath(SHIPPED_WEIGHTS)
    folders = [f for f in folder_paths.get_folder_paths(LATENT_CLIP_FOLDER) if os.path.realpath(f) != shipped]
    if not folders:
        folders = [os.path.join(folder_paths.models_dir, LATENT_CLIP_FOLDER)]
    return next((f for f in folders if hub.folder_problem(f) is None), folders[0])


class LatentCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPLoader",
            display_name="Load Latent-CLIP",
            category="latent_clip",
            description="Loads a Latent-CLIP (the authors' epoch_*.pt, a converted .safetensors, or a state dict) "
                        "from models/latent_clip. Config and VAE family are read from the file. A Hugging Face "
                        "repo id (owner/name) is one of the authors' releases: downloaded once, converted to fp16 "
                        ".safetensors in models/latent_clip and used from then on.",
            inputs=[
                io.Combo.Input("ckpt_name", options=ckpt_options(),
                               tooltip="File in models/latent_clip, or an authors' release by repo id (downloaded "
                                       "and converted on first use)"),
                io.Combo.Input("device", options=DEVICE_CHOICES, default="default"),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto"),
            ],
            outputs=[LatentCLIPType.Output(display_name="latent_clip")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name):
        """Refuse a name that is neither a listed file nor a released repo id at /prompt (a V3 Combo does not
        check its options). A linked input arrives as None here and is checked when the node runs."""
        if ckpt_name is None or hub.release_for(ckpt_name):
            return True
        return model_file_problem(LATENT_CLIP_FOLDER, "ckpt_name", ckpt_name, ckpt_options()) or True

    @classmethod
    def fingerprint_inputs(cls, ckpt_name=None, device="default", dtype="auto"):
        """The file's path, time and size: a file overwritten between prompts (a new distillation or conversion
        under the same name) loads again instead of ComfyUI reusing the old model."""
        release = hub.release_for(ckpt_name)
        return model_file_fingerprint(LATENT_CLIP_FOLDER, hub.local_name(release) if release else ckpt_name)

    @classmethod
    def execute(cls, ckpt_name, device="default", dtype="auto") -> io.NodeOutput:
        if hub.release_for(ckpt_name):   # the repo id, or its converted file's name (downloaded if absent)
            ckpt_name = fetch_release(hub.release_for(ckpt_name))
        return io.NodeOutput(load_latent_clip(ckpt_name, device, dtype))


NODES = [LatentCLIPLoader]
