"""Real-ComfyUI harness: finds a ComfyUI tree, starts it in-process with --cpu, loads this pack
through ComfyUI's own custom-node loader, and runs nodes/graphs the way the executor does.

The tree is found through COMFYUI_PATH, or because this repo sits in ComfyUI/custom_nodes/.
Without one every test here is skipped with a one-line reason.
"""
import asyncio
import contextlib
import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-Latent-CLIP"


def find_comfyui():
    env = os.environ.get("COMFYUI_PATH")
    if env and (Path(env) / "comfy").is_dir():
        return Path(env).resolve()
    if REPO.parent.name == "custom_nodes" and (REPO.parent.parent / "comfy").is_dir():
        return REPO.parent.parent
    return None


COMFYUI = find_comfyui()
SKIP_REASON = "no ComfyUI tree: set COMFYUI_PATH or clone this pack into ComfyUI/custom_nodes/"


def pytest_collection_modifyitems(config, items):
    if COMFYUI is None:
        skip = pytest.mark.skip(reason=SKIP_REASON)
        for item in items:
            if "tests/comfy" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(skip)


class RecordingServer:
    """The few PromptServer members the executor uses, recording every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, *args, **kwargs):
        pass


class Comfy:
    """An in-process ComfyUI with this pack loaded by ComfyUI's loader."""

    def __init__(self, root: Path, workdir: Path):
        sys.path.insert(0, str(root))
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        args.disable_auto_launch = True
        import folder_paths
        for sub in ("output", "input", "temp"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(workdir / "output"))
        folder_paths.set_input_directory(str(workdir / "input"))
        folder_paths.set_temp_directory(str(workdir / "temp"))
        import comfy.model_management  # noqa: F401  (device set-up reads args.cpu)
        import nodes
        import execution
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        custom = workdir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        link = custom / PACK_NAME
        link.symlink_to(REPO, target_is_directory=True)
        assert asyncio.run(nodes.load_custom_node(str(link))), "ComfyUI's loader failed to load the pack"
        self.models = workdir / "models"
        for sub in ("latent_clip", "open_clip"):
            (self.models / sub).mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(sub, str(self.models / sub))
        self.workdir = workdir

    def node(self, node_id):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def run_node(self, node_id, **inputs):
        """Run one node as the executor does, under inference mode: V3 through a class clone and
        EXECUTE_NORMALIZED (returns a NodeOutput); V1 core nodes through FUNCTION (returns a tuple)."""
        node = self.node(node_id)
        with torch.inference_mode():
            if hasattr(node, "PREPARE_CLASS_CLONE"):
                return node.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**inputs)
            return getattr(node(), node.FUNCTION)(**inputs)

    def run_prompt(self, prompt: dict):
        """Validate and execute an API-format graph with ComfyUI's executor."""
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            return {"valid": False, "error": valid[1], "node_errors": valid[3]}
        server = RecordingServer()
        executor = self.execution.PromptExecutor(server)
        executor.execute(prompt, prompt_id, {"client_id": "test"}, valid[2])
        return {"valid": True, "success": executor.success, "messages": server.messages + executor.status_messages,
                "outputs": executor.history_result["outputs"]}


_COMFY = None


@pytest.fixture(scope="session")
def comfy():
    global _COMFY
    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    if _COMFY is None:
        _COMFY = Comfy(COMFYUI, Path(tempfile.mkdtemp(prefix="lc-comfy-")))
    return _COMFY


def tiny_latent_clip(seed=0, cfg="Latent-ViT-Tiny-test"):
    """A small random Latent-CLIP (SDXL family) with non-trivial weights."""
    from latentclip import LatentCLIP
    torch.manual_seed(seed)
    model = LatentCLIP(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_reward_latent_clip(seed=3):
    """A tiny random Latent-CLIP with a trained CLIP's logit scale (100), so rewards have real gradients."""
    import math
    model = tiny_latent_clip(seed=seed)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100.0))
    return model


def tiny_reward_handle(comfy, name, device="default"):
    """The LATENT_CLIP handle of ``tiny_reward_latent_clip(seed=3)``, saved as ``name`` in the registered
    models/latent_clip folder if missing and loaded by LatentCLIPLoader (fp32) on ``device``."""
    import latentclip
    path = comfy.models / "latent_clip" / name
    if not path.exists():
        latentclip.save(tiny_reward_latent_clip(seed=3), path)
    return comfy.run_node("LatentCLIPLoader", ckpt_name=path.name, device=device, dtype="fp32").result[0]


@pytest.fixture(scope="session")
def tiny_ckpt(comfy):
    """Name of a tiny Latent-CLIP in the registered models/latent_clip folder."""
    import latentclip
    path = comfy.models / "latent_clip" / "tiny-latent-clip.safetensors"
    if not path.exists():
        latentclip.save(tiny_latent_clip(), path)
    return path.name


def tiny_sdxl(seed=0):
    """A ModelPatcher around a tiny SDXL-architecture UNet with initialised weights (comfy.ops skips init).

    Real checkpoints need exact configs to be detected, so the model is built directly
    (see ../shared/notes/comfyui-facts.md, 'Tiny diffusion models for tests').
    """
    import comfy.model_management as mm
    import comfy.supported_models
    dtype, manual_cast = torch.float32, None
    if os.environ.get("LATENTCLIP_TEST_GPU") == "1":   # tests/gpu/run.sh: the dtype ComfyUI picks there (fp16)
        supported = comfy.supported_models.SDXL.supported_inference_dtypes
        dtype = mm.unet_dtype(supported_dtypes=supported)
        manual_cast = mm.unet_manual_cast(dtype, mm.get_torch_device(), supported)
    cfg = comfy.supported_models.SDXL({
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
        "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 64,
        "num_classes": "sequential", "adm_in_channels": 32 + 6 * 256, "use_temporal_attention": False,
        "use_temporal_resblock": False, "dtype": dtype})
    cfg.unet_config["num_head_channels"] = 16
    cfg.set_inference_dtype(dtype, manual_cast)
    return tiny_model_patcher(cfg, seed)


def tiny_model_patcher(cfg, seed=0):
    """A ModelPatcher around ``cfg.get_model({})`` (a comfy.supported_models config) with random weights,
    built as CheckpointLoaderSimple does (inference tensors); comfy.ops skips init, so every weight is set."""
    import comfy.model_management as mm
    import comfy.model_patcher
    with torch.inference_mode():  # as CheckpointLoaderSimple runs: the weights are inference tensors
        model = cfg.get_model({})
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                elif ("norm" in name and name.endswith("weight")) or name.endswith(".scale"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_conditioning(seed=0, batch=1):
    """CONDITIONING for tiny_sdxl, built by hand: [[cross-attn context, {"pooled_output": ...}]]."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, 64, generator=g), {"pooled_output": torch.randn(batch, 32, generator=g)}]]


@pytest.fixture
def sdxl(comfy):
    return tiny_sdxl()


@contextlib.contextmanager
def interrupt_at_progress(value: int = 2):
    """Interrupt the queue (as POST /interrupt does) when a ComfyUI ProgressBar reaches ``value``.

    Yields the progress values seen; the hook and the interrupt flag are reset afterwards.
    """
    import comfy.utils as comfy_utils
    import nodes
    seen = []

    def hook(current, total, preview, node_id=None):
        seen.append(current)
        if current == value:
            nodes.interrupt_processing(True)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        yield seen
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        nodes.interrupt_processing(False)
