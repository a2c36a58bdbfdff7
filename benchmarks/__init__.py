"""Speed and memory of a Latent-CLIP reward against ReNO's decode-then-CLIP pixel reward.

Not part of the unit tests or the node pack; run ``python -m benchmarks.run --help``.
"""
import os


def overwrite_refusal(path, overwrite):
    """The message refusing to replace ``path`` (named as given), or None when nothing is in the way:
    no path, no file there, or ``--overwrite``. Each script reports it its own way (SystemExit, parser.error)."""
    if path and os.path.exists(path) and not overwrite:
        return f"{path} exists; refusing to overwrite it (choose another path or pass --overwrite)"
    return None
