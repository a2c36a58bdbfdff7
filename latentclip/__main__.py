"""One command line for the pack: ``python -m latentclip <verb> ...`` (``python -m latentclip`` lists the verbs).

Each verb is one entry in ``VERBS``: its name, a one-line help and its entry, a function (or ``"module:function"``,
imported only when the verb runs) that takes the verb's own arguments as a list of strings and returns the exit
status. So a verb can live next to the code it drives. Adding one: write ``def main(argv) -> int`` (argparse inside)
in its module and add ``"name": ("one-line help", "package.module:main"),`` to ``VERBS``.
Older spellings keep working: ``python -m latentclip.api run`` and ``python -m latentclip.miniworld train|eval|search``.
"""
from __future__ import annotations

import argparse
import importlib
import sys


def convert_main(argv) -> int:
    from .checkpoints import convert
    p = argparse.ArgumentParser(prog="python -m latentclip convert",
                                description="Convert a Latent-CLIP checkpoint to a compact, pickle-free .safetensors.")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    p.add_argument("--config", default=None, help="config name or .json (default: inferred from the weights)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = p.parse_args(argv)
    out = convert(args.src, args.out, dtype=args.dtype, force=args.force, config=args.config)
    print(f"wrote {out}")
    return 0


def download_main(argv) -> int:
    from .hub import fetch
    p = argparse.ArgumentParser(prog="python -m latentclip download",
                                description="Fetch an authors' release from the Hugging Face Hub (HF_ENDPOINT, HF_HOME, "
                                            "HF_HUB_OFFLINE) and keep it as a compact fp16 .safetensors.")
    p.add_argument("repo_id", help="e.g. wendlerc/latent-clip-b-8-512-34b-80k")
    p.add_argument("--out", default=".", help="folder for REPO_NAME.safetensors (e.g. models/latent_clip)")
    args = p.parse_args(argv)
    shown = [-1]

    def progress(done, total):
        pct = int(100 * done / total) if total else 0
        if pct != shown[0]:
            shown[0] = pct
            print(f"\r{args.repo_id}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB", end="", file=sys.stderr, flush=True)

    out = fetch(args.repo_id, args.out, progress=progress)
    if shown[0] >= 0:
        print(file=sys.stderr)
    print(f"ready: {out}")
    return 0


def demo_main(argv) -> int:
    from .miniworld.demo import main as run_demo
    p = argparse.ArgumentParser(prog="python -m latentclip demo",
                                description="The mini-world demo on the embedded weights (about a minute on 2 CPU cores).")
    p.add_argument("--out", default="demo_out", help="a new or empty folder for the pictures and summary.md")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds files (the demo's "
                   "own files in it are replaced)")
    args = p.parse_args(argv)
    return run_demo(out=args.out, force=args.force)


def _miniworld(verb: str):
    """A verb of ``python -m latentclip.miniworld`` (train, eval, search), reachable from here too."""
    def main(argv) -> int:
        from .miniworld.__main__ import main as miniworld_main
        return miniworld_main([verb, *argv])
    return main


def encode_main(argv) -> int:
    from .encode import add_arguments, main as encode
    p = argparse.ArgumentParser(prog="python -m latentclip encode",
                                description="Images -> WebDataset shards of VAE latents and teacher embeddings, to "
                                            "distil a Latent-CLIP for any VAE (docs/distill.md).")
    add_arguments(p)
    return encode(p.parse_args(argv))


def run_main(argv) -> int:
    from .api import main as api_main
    return api_main(["run", *argv])


VERBS = {   # name: (help, "module:function" or a function)
    "demo": ("the mini-world demo: baseline vs ReNO with Latent-CLIP and pixel-CLIP rewards, safety; pictures + "
             "summary", demo_main),
    "download": ("fetch an authors' release by repo id and convert it to fp16 .safetensors", download_main),
    "convert": ("convert a Latent-CLIP checkpoint (.pt, .safetensors) to a compact .safetensors", convert_main),
    "run": ("run an API-format workflow on a ComfyUI server, save its outputs", run_main),
    "eval": ("mini-world: zero-shot, retrieval, GenEval-mini and safety-mini of the shipped weights",
             _miniworld("eval")),
    "search": ("mini-world: inference-time search (best-of-N, prune, FK steering) on GenEval-mini", _miniworld("search")),
    "encode": ("images -> shards of VAE latents and teacher embeddings, to distil a Latent-CLIP (docs/distill.md)",
               encode_main),
    "train-miniworld": ("mini-world: retrain the VAE, pixel CLIP, Latent-CLIP and generator (18 min on 2 idle "
                        "cores)", _miniworld("train")),
}


def _resolve(target):
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {name:<{width}}  {text}" for name, (text, _) in VERBS.items()]
    return ("usage: python -m latentclip <verb> [arguments]   (python -m latentclip <verb> --help for one verb)\n\n"
            "verbs:\n" + "\n".join(lines))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}; expected one of {', '.join(VERBS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    from .errors import CheckpointError, InputError
    try:
        return _resolve(VERBS[verb][1])(rest)
    except (CheckpointError, InputError, OSError) as e:   # OSError: FileExistsError, an unwritable folder, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # the user stopped it (a minute-long demo, a download): no traceback, as in run
        print("stopped (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
