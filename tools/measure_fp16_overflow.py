"""Where a half-precision Latent-CLIP tower first turns non-finite, per latent magnitude.

    python tools/measure_fp16_overflow.py [--config Latent-ViT-B-8-512] [--dtype fp16]

Random weights (seed 0), a batch of 2 latents ``randn * magnitude``; forward hooks on the patch
embedding, ln_pre, every residual block and ln_post report the first stage with a NaN/inf
(docs/reliability.md, section 9).
"""
import argparse

import torch

from latentclip.model import LatentCLIP

MAGNITUDES = (1, 30, 100, 1e3, 1e4, 3e4, 1e5, 1e8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="Latent-ViT-B-8-512")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LatentCLIP(args.config).eval().to({"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype])
    visual, seen = model.clip.visual, {}
    stages = [("conv1", visual.conv1), ("ln_pre", visual.ln_pre),
              *[(f"block{i}", b) for i, b in enumerate(visual.transformer.resblocks)], ("ln_post", visual.ln_post)]
    for name, module in stages:
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(
            name, (float((o[0] if isinstance(o, tuple) else o).float().abs().max()),
                   bool(torch.isfinite(o[0] if isinstance(o, tuple) else o).all()))))
    print(f"| magnitude | features | first non-finite stage | max abs of conv1 output |  ({args.config}, {args.dtype})")
    print("|---|---|---|---|")
    for magnitude in MAGNITUDES:
        seen.clear()
        with torch.no_grad():
            feats = model.encode_latents(torch.randn(2, 4, 64, 64) * magnitude)
        bad = next((name for name, _ in stages if not seen[name][1]), "none")
        print(f"| {magnitude:g} | {'finite' if torch.isfinite(feats).all() else 'NaN/inf'} | {bad} | {seen['conv1'][0]:.6g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
