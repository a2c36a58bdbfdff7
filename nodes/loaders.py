"""Loader node: a Latent-CLIP file from models/latent_clip onto a LATENT_CLIP socket."""
import folder_paths
from comfy_api.latest import io

from .comfy_bridge import LATENT_CLIP_FOLDER, load_latent_clip, model_file_problem

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
    def validate_inputs(cls, ckpt_name):
        """Refuse a name that is not a listed file at /prompt (a V3 Combo does not check its options).
        A linked input arrives as None here and is checked when the node runs."""
        return ckpt_name is None or model_file_problem(LATENT_CLIP_FOLDER, "ckpt_name", ckpt_name) or True

    @classmethod
    def execute(cls, ckpt_name, device="default", dtype="auto") -> io.NodeOutput:
        return io.NodeOutput(load_latent_clip(ckpt_name, device, dtype))


NODES = [LatentCLIPLoader]
