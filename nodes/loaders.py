"""Loader node: a Latent-CLIP file from models/latent_clip (or an authors' release, fetched once) onto a
LATENT_CLIP socket."""
import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from latentclip import hub

from .comfy_bridge import LATENT_CLIP_FOLDER, load_latent_clip, model_file_problem

LatentCLIPType = io.Custom("LATENT_CLIP")


def ckpt_options() -> list:
    """Files in models/latent_clip, then each released repo id whose converted file is not there yet."""
    files = folder_paths.get_filename_list(LATENT_CLIP_FOLDER)
    return files + [r for r in hub.RELEASED if hub.local_name(r) not in files]


def fetch_release(repo_id: str) -> str:
    """The file name of ``repo_id``'s converted weights, downloading and converting them on first use with
    ComfyUI's progress bar (interruptible)."""
    name = hub.local_name(repo_id)
    if name in folder_paths.get_filename_list(LATENT_CLIP_FOLDER):
        return name
    bar = []

    def progress(done, total):
        mm.throw_exception_if_processing_interrupted()
        if not bar:
            bar.append(comfy.utils.ProgressBar(max(total, 1)))
        bar[0].update_absolute(done, max(total, 1))

    hub.fetch(repo_id, folder_paths.get_folder_paths(LATENT_CLIP_FOLDER)[0], progress=progress)
    return name


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
                io.Combo.Input("device", options=["default", "cpu"], default="default"),
                io.Combo.Input("dtype", options=["auto", "fp32", "fp16", "bf16"], default="auto"),
            ],
            outputs=[LatentCLIPType.Output(display_name="latent_clip")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name):
        """Refuse a name that is neither a listed file nor a released repo id at /prompt (a V3 Combo does not
        check its options). A linked input arrives as None here and is checked when the node runs."""
        if ckpt_name is None or ckpt_name in hub.RELEASED:
            return True
        return model_file_problem(LATENT_CLIP_FOLDER, "ckpt_name", ckpt_name) or True

    @classmethod
    def execute(cls, ckpt_name, device="default", dtype="auto") -> io.NodeOutput:
        if ckpt_name in hub.RELEASED:
            ckpt_name = fetch_release(ckpt_name)
        return io.NodeOutput(load_latent_clip(ckpt_name, device, dtype))


NODES = [LatentCLIPLoader]
