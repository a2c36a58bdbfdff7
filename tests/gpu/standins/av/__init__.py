"""Stand-in for PyAV, used ONLY by the GPU check (tests/gpu/run.sh) on a machine without PyAV.

ComfyUI's comfy_api imports PyAV at start-up for its video types; the real wheel (34 MB) does not
fit the GPU machine's 64 MiB transfer limit, and the check runs no video node. Every name resolves
to a placeholder class, so imports and annotations work; using one raises.
"""


def _placeholder(name):
    def _refuse(*args, **kwargs):
        raise RuntimeError(f"av.{name}: PyAV is not installed (GPU-check stand-in)")
    if name.endswith("Error"):   # used in except clauses
        return type(name, (Exception,), {})
    return type(name, (), {"__init__": _refuse, "open": staticmethod(_refuse)})


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    value = _placeholder(name)
    globals()[name] = value
    return value


def open(*args, **kwargs):  # noqa: A001  (PyAV's own name)
    raise RuntimeError("av.open: PyAV is not installed (GPU-check stand-in)")
