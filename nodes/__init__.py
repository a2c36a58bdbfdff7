"""Thin ComfyUI adapters over the ``latentclip`` core, one module per node family.

Only this package (and tests/comfy) imports ComfyUI. Each module exports ``NODES``.
"""
import importlib

from .comfy_bridge import register_model_folders

_FAMILIES = ("loaders", "scoring", "reno", "safety", "search", "miniworld", "heads")

NODE_LIST = []
for _name in _FAMILIES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as e:  # a family not built yet is skipped; a missing dependency is not
        if e.name != f"{__name__}.{_name}":
            raise
        continue
    NODE_LIST.extend(_module.NODES)

__all__ = ["NODE_LIST", "register_model_folders"]
