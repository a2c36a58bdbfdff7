#!/usr/bin/env bash
# Gather what benchmarks/gpu.sh needs on a device machine that has torch but nothing else:
# ComfyUI's model code (the real VAE/UNet classes) and the open_clip wheels, into ./.bench/
# (git-ignored through .git/info/exclude). Run from anywhere on a machine with PyPI access.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI tree}"
grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo '/.bench/' >> .git/info/exclude
rm -rf .bench && mkdir -p .bench/ComfyUI .bench/whl
cp -r "$COMFYUI_PATH/comfy" .bench/ComfyUI/
find .bench/ComfyUI -name __pycache__ -prune -exec rm -rf {} +
# open_clip and the two pure-python needs the device image lacks (it has torch, timm, regex,
# huggingface_hub, safetensors, tqdm, einops, psutil, pillow); python 3.12 there.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .bench/whl \
    open_clip_torch==3.3.0 ftfy wcwidth
du -sh .bench
