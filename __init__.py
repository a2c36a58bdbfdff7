"""ComfyUI entry point of the Latent-CLIP node pack.

ComfyUI imports this file as a package under a mangled name. The core (``latentclip``) lives next to
it, and the nodes must run that copy: another ``latentclip`` on the path (an editable install of another
clone, an older checkout, a copy installed without ``weights/``) would pair these nodes with other code.
When no ``latentclip`` is importable, the pack's folder is appended (not prepended) to ``sys.path`` so
that ComfyUI's own modules always win; when another copy is, the pack's own is loaded by file location
in its place. Without ComfyUI this file imports cleanly and exports nothing but ``comfy_entrypoint``
(which then returns None).
"""
import importlib.util
import logging
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
# Served at /extensions/<pack folder>/: the front end's node help pages (docs/<NodeId>.md) and the icon.
WEB_DIRECTORY = "./web"


def _use_own_core():
    """Make ``import latentclip`` give the copy beside this file (see the module docstring)."""
    own = os.path.join(_PACK_DIR, "latentclip")
    loaded = sys.modules.get("latentclip")
    found = loaded.__spec__ if loaded is not None else importlib.util.find_spec("latentclip")
    if found is None:
        sys.path.append(_PACK_DIR)
        return
    where = os.path.dirname(found.origin or "")
    if where and os.path.exists(where) and os.path.samefile(where, own):
        return
    if loaded is not None:  # imported before this pack (by another pack or a script): cannot be swapped
        logging.warning("Latent-CLIP: the core 'latentclip' was already imported from %s, not from this pack "
                        "(%s); the nodes run that copy", where, own)
        return
    spec = importlib.util.spec_from_file_location("latentclip", os.path.join(own, "__init__.py"),
                                                  submodule_search_locations=[own])
    module = importlib.util.module_from_spec(spec)
    sys.modules["latentclip"] = module
    spec.loader.exec_module(module)
    logging.info("Latent-CLIP: using the core beside the nodes (%s), not the 'latentclip' installed at %s", own, where)


_use_own_core()

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
