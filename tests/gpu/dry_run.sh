#!/usr/bin/env bash
# Dry run of the GPU check on a machine without a GPU: proves tests/gpu/run.sh goes through its whole
# set-up, starts a real ComfyUI server and runs its graphs where the GPU machine's conditions hold:
#  - a fresh venv of Python 3.12 with torch 2.11 + torchvision 0.26 (PyPI's build, run on the CPU) and only
#    the packages the GPU machine has (numpy, safetensors, pillow, aiohttp, pytest, pyyaml, requests,
#    transformers, einops, psutil, scipy, tqdm, ...): no open_clip, ftfy, torchsde, av, front end, ...;
#  - a clean clone of this repo's HEAD, prepared by tests/gpu/prepare.sh (the only source of packages);
#  - the network closed: run.sh runs in a new network namespace with only loopback (unshare -n), and
#    pip is told --no-index.
#     bash tests/gpu/dry_run.sh [--quick]     (--quick: set-up + two server graphs, for CI)
# Needs: python3.12 (pyenv here), root for unshare, the package registries for the venv and the wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
QUICK=0; [ "${1:-}" = "--quick" ] && QUICK=1
PY312=
for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "pass" 2>/dev/null; then PY312=$candidate; break; fi
done
[ -n "$PY312" ] || { echo "dry_run.sh: needs python3.12" >&2; exit 1; }
VENV="${GPU_DRY_RUN_VENV:-/tmp/latentclip_gpu_venv}"
snapshot="${COMFYUI_SNAPSHOT:-$repo/../shared/comfyui/ComfyUI-v0.3.64.tar.gz}"

if [ ! -x "$VENV/bin/python3" ] || ! "$VENV/bin/python3" -c "import torch; assert torch.__version__.startswith('2.11')" 2>/dev/null; then
    rm -rf "$VENV"
    "$PY312" -m venv "$VENV"
    # what the GPU machine has (KINDS.md of the device tool), not what ComfyUI or the pack need
    PIP_CONSTRAINT= "$VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 numpy safetensors pillow aiohttp yarl \
        pytest pyyaml requests transformers tokenizers sentencepiece einops psutil scipy tqdm regex huggingface_hub timm
fi
clone=$(mktemp -d /tmp/latentclip_gpu_clone.XXXXXX)
trap 'rm -rf "$clone"' EXIT
git clone -q "$repo" "$clone/repo"
(cd "$clone/repo" && COMFYUI_SNAPSHOT="$snapshot" bash tests/gpu/prepare.sh)
cd "$clone/repo"
for missing in open_clip ftfy torchsde av comfyui_frontend_package sqlalchemy alembic spandrel kornia; do
    if "$VENV/bin/python3" -c "import $missing" 2>/dev/null; then echo "dry_run.sh: the venv has $missing" >&2; exit 1; fi
done
export PATH="$VENV/bin:$PATH" PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null HF_HUB_OFFLINE=1 GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=$QUICK
unset COMFYUI_PATH http_proxy https_proxy HTTP_PROXY HTTPS_PROXY
unshare -n sh -c 'ip link set lo up && bash tests/gpu/run.sh'
