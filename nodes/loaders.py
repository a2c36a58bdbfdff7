"""Loader node: a Latent-CLIP file from models/latent_clip onto a LATENT_CLIP socket."""
import folder_paths
from comfy_api.latest import io

from .comfy_bridge import LATENT_CLIP_FOLDER, load_latent_clip

LatentCLIPType = io.Custom("LATENT_CLIP")


class LatentCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentCLIPLoader",
            display_name="Load Latent-CLIP",
            category="latent_clip",
            description="Loads a Latent-CLIP (the authors' epoch_*.pt, a converted .safetensors, or a state dict) "
                        "from models/latent_clip. Config and VAE family are read from the file.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list(LATENT_CLIP_FOLDER),
                               tooltip="File in models/latent_clip"),
                io.Combo.Input("device", options=["default", "cpu"], default="default"),
                io.Combo.Input("dtype", options=["auto", "fp32", "fp16", "bf16"], default="auto"),
            ],
            outputs=[LatentCLIPType.Output(display_name="latent_clip")],
        )

    @classmethod
    def execute(cls, ckpt_name, device="default", dtype="auto") -> io.NodeOutput:
        return io.NodeOutput(load_latent_clip(ckpt_name, device, dtype))


NODES = [LatentCLIPLoader]
