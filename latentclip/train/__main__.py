"""``[torchrun --nproc-per-node N] python -m latentclip.train distill --data SHARDS --teacher FILE --out FILE``."""
from __future__ import annotations

import argparse
import sys

from ..errors import CheckpointError, InputError
from .distill import Settings, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentclip.train", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("distill", help="distil a Latent-CLIP for a VAE family from a pixel CLIP teacher")
    d.add_argument("--data", required=True, help="folder of shards from python -m latentclip encode")
    d.add_argument("--teacher", required=True, help="the teacher's open_clip weights file (the one that made the shards)")
    d.add_argument("--teacher-model", default=None, help="its open_clip architecture (default: inferred from the file)")
    d.add_argument("--out", required=True, help="the Latent-CLIP file to write (e.g. ComfyUI/models/latent_clip/flux-b8.safetensors)")
    d.add_argument("--work", required=True, help="folder for the resume checkpoint and log.jsonl (not models/latent_clip)")
    defaults = Settings("", "", "", "")
    for name, kind, help_text in (
            ("config", str, "Latent-CLIP config for the image tower (name in weights/configs or .json)"),
            ("batch", int, "samples per process and step"), ("steps", int, "optimizer steps in all"),
            ("lr", float, "peak learning rate"), ("warmup", int, "linear warm-up steps"),
            ("weight_decay", float, "AdamW weight decay (not on norms, biases, embeddings)"),
            ("grad_clip", float, "gradient-norm clip (0: off)"),
            ("contrastive_weight", float, "weight of the caption-contrastive term (0: cosine regression only)"),
            ("init_vision", str, "'teacher': start from the teacher's image-tower tensors whose shapes match; 'random'"),
            ("seed", int, "data order and initialisation"), ("save_every", int, "steps between resume checkpoints"),
            ("log_every", int, "steps between log lines"),
            ("stop_after", int, "end this process after so many steps (time-limited jobs); rerun to resume"),
            ("device", str, "default: this rank's GPU (LOCAL_RANK), else the CPU")):
        d.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name), help=help_text)
    d.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=defaults.precision,
                   help="auto (default): bf16 autocast on a GPU with native bf16 (Ampere+), else fp16 autocast with "
                        "dynamic loss scaling (V100, T4, GTX/RTX 20xx); fp32 on the CPU")
    d.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    d.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    settings = Settings(**{k: v for k, v in vars(args).items() if k != "cmd"})
    if settings.init_vision not in ("teacher", "random"):
        parser.error(f"--init-vision {settings.init_vision!r}: expected teacher or random")
    try:
        run(settings)
    except (InputError, CheckpointError, FileExistsError) as e:   # e.g. --out appeared while training
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
