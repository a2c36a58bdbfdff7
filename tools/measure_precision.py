"""Embedding error of fp16/bf16 Latent-CLIPs against plain open_clip in fp32, on full-size shapes.

    python tools/measure_precision.py [--config Latent-ViT-B-8-512]

Builds a random open_clip CLIP with a 4-channel conv1 in the config's shapes, saves it in the
authors' checkpoint layout, loads it with ``latentclip.load`` (fp32, and converted to fp16/bf16)
and prints the relative error (||a - b|| / ||b||) of image and text embeddings.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import open_clip
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "core"))


def main(argv=None) -> int:
    from test_checkpoints import authors_checkpoint, reference_clip
    import latentclip
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="Latent-ViT-B-8-512")
    args = parser.parse_args(argv)
    cfg = latentclip.get_config(args.config)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    ref = reference_clip(v["image_size"] // 8, v["patch_size"], v["width"], v["layers"], cfg["embed_dim"],
                         t["width"], t["heads"], t["layers"])
    tmp = Path(tempfile.mkdtemp())
    torch.save(authors_checkpoint(ref), tmp / "epoch_34.pt")
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = ["a red car", "an astronaut riding a horse"]
    with torch.no_grad():
        want_img, want_txt = ref.encode_image(x), ref.encode_text(open_clip.tokenize(texts))
        print(f"{args.config}: relative error vs open_clip fp32")
        for name, dtype in (("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            path = tmp / "epoch_34.pt"
            if dtype is not None:
                path = latentclip.convert(tmp / "epoch_34.pt", tmp / f"{name}.safetensors", dtype=name)
            model = latentclip.load(path, dtype=dtype or torch.float32)
            img, txt = model.encode_latents(x).float(), model.encode_text(texts).float()
            print(f"  {name}: image {((img - want_img).norm() / want_img.norm()).item():.2e}  "
                  f"text {((txt - want_txt).norm() / want_txt.norm()).item():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
