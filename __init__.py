"""ComfyUI entry point of the Latent-CLIP node pack.

ComfyUI imports this file as a package under a mangled name. The core (``latentclip``) lives next to
it; when the pack is cloned into ``custom_nodes/`` without ``pip install -e .``, its folder is appended
(not prepended) to ``sys.path`` so that ComfyUI's own modules always win. Without ComfyUI this file
imports cleanly and exports nothing but ``comfy_entrypoint`` (which then returns None).
"""
import importlib.util
import logging
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
# Served at /extensions/<pack folder>/: the front end's node help pages (docs/<NodeId>.md) and the icon.
WEB_DIRECTORY = "./web"
if importlib.util.find_spec("latentclip") is None:
    sys.path.append(_PACK_DIR)

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # plain Python: the core is usable, the nodes are not
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import NODE_LIST, register_model_folders

    register_model_folders()

    class LatentCLIPExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODE_LIST)

    async def comfy_entrypoint():
        logging.info("Latent-CLIP: %d nodes loaded (models/latent_clip, models/open_clip)", len(NODE_LIST))
        return LatentCLIPExtension()
else:
    def comfy_entrypoint():
        return None
