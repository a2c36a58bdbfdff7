"""Command line: ``python -m latentclip convert IN OUT.safetensors``, ``download REPO_ID``, ``demo`` and ``encode`` (distillation data)."""
from __future__ import annotations

import argparse
import sys


def _convert(args) -> int:
    from .checkpoints import convert
    out = convert(args.src, args.out, dtype=args.dtype, force=args.force, config=args.config)
    print(f"wrote {out}")
    return 0


def _download(args) -> int:
    from .hub import fetch

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


def _demo(args) -> int:
    try:
        from .miniworld.demo import main as demo_main
    except ImportError:
        print("The mini-world demo is not built yet (it arrives with the mini-world issues). "
              "Meanwhile: python -m latentclip convert IN OUT.safetensors converts a checkpoint.")
        return 0
    return demo_main(out=args.out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentclip", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a Latent-CLIP checkpoint to a compact .safetensors")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    c.add_argument("--config", default=None, help="config name or .json (default: inferred from the weights)")
    c.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    c.set_defaults(func=_convert)
    w = sub.add_parser("download", help="fetch an authors' release from the Hugging Face Hub (HF_ENDPOINT, HF_HOME) "
                       "and keep it as a compact fp16 .safetensors")
    w.add_argument("repo_id", help="e.g. wendlerc/latent-clip-b-8-512-34b-80k")
    w.add_argument("--out", default=".", help="folder for REPO_NAME.safetensors (e.g. ComfyUI/models/latent_clip)")
    w.set_defaults(func=_download)
    d = sub.add_parser("demo", help="run the mini-world demo on the embedded default weights")
    d.add_argument("--out", default="demo_out")
    d.set_defaults(func=_demo)
    from .encode import add_arguments as encode_arguments, main as encode_main
    e = sub.add_parser("encode", help="images -> shards of VAE latents and teacher embeddings, to distil a Latent-CLIP")
    encode_arguments(e)
    e.set_defaults(func=encode_main)
    args = parser.parse_args(argv)
    from .errors import CheckpointError, InputError
    try:
        return args.func(args)
    except (CheckpointError, InputError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
