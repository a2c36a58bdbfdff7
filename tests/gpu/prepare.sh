#!/usr/bin/env bash
# Prepare the GPU check for a bare GPU machine (torch 2.11, Python 3.12, no network, only the repo and
# up to 8 ignored folders travel, 64 MiB in all). Run here, on a machine with the package registries:
#     bash tests/gpu/prepare.sh
# It fills the ignored folder .gpu/ with exactly what tests/gpu/run.sh needs there and nothing else:
#   .gpu/ComfyUI-v0.3.64.tar.gz   the ComfyUI snapshot (from ../shared/comfyui, or $COMFYUI_SNAPSHOT)
#   .gpu/whl/*.whl               the packages that machine lacks, as Python 3.12 manylinux x86_64 wheels
# and prints the total that will travel (repo + .gpu). Left out on purpose, to stay under 64 MiB:
# comfyui-frontend-package (28.5 MB: the server runs with an empty --front-end-root), comfyui-embedded-docs
# (23.5 MB, optional in ComfyUI), av (34.2 MB: tests/gpu/standins/av satisfies comfy_api's imports; no
# video node runs), kornia (optional nodes only), comfyui-workflow-templates (84 MB; optional) and
# SQLAlchemy/alembic (ComfyUI's optional user database). Then, with the device tool:
#     run(command="bash tests/gpu/run.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY_VERSION="${GPU_PYTHON_VERSION:-3.12}"
snapshot="${COMFYUI_SNAPSHOT:-../shared/comfyui/ComfyUI-v0.3.64.tar.gz}"
[ -f "$snapshot" ] || { echo "prepare.sh: no ComfyUI snapshot at $snapshot (set COMFYUI_SNAPSHOT)" >&2; exit 1; }

# What the bare machine lacks, pinned to what CI tests with (ComfyUI v0.3.64's requirements and the pack's).
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 torchsde==0.2.6 trampoline==0.1.2
        pydantic==2.13.4 pydantic-core==2.46.4 pydantic-settings==2.14.1 annotated-types==0.7.0
        typing-inspection==0.4.2 python-dotenv==1.2.2 spandrel==0.4.2)

rm -rf .gpu && mkdir -p .gpu/whl
cp "$snapshot" .gpu/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .gpu/whl "${WHEELS[@]}"

repo_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{s+=$1} END {print s+0}')
gpu_bytes=$(du -sb .gpu | cut -f1)
total=$((repo_bytes + gpu_bytes))
printf 'prepare.sh: repo %.1f MiB + .gpu %.1f MiB = %.1f MiB to travel (limit 64 MiB)\n' \
    "$(echo "$repo_bytes/1048576" | bc -l)" "$(echo "$gpu_bytes/1048576" | bc -l)" "$(echo "$total/1048576" | bc -l)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "prepare.sh: over the 64 MiB limit" >&2; exit 1; }
