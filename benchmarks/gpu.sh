#!/usr/bin/env bash
# Run the benchmarks on one CUDA GPU in one go; JSON, log and plot land in $OUT (default ./bench_out, git-ignored).
#
# Sized for one H200 (bf16, SDXL UNet at 512 and 1024, every reward step at 256..1024 px): about
# 2-3 minutes of work, hard-stopped at 7.5 minutes so the machine's 8-minute slot always returns
# the log. The device machine has torch but neither open_clip nor ComfyUI, so first, on a machine
# with the package registries (once), bring both along in the ignored folder .gpu/:
#     bash tests/gpu/prepare.sh               # ComfyUI snapshot + wheels (see tests/gpu/run.sh)
# then run this script there with .gpu carried, e.g. run(command="bash benchmarks/gpu.sh",
# carry=[".gpu"]). Anything else is passed on: bash benchmarks/gpu.sh --repeats 20
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
for f in "$OUT"/benchmarks_cuda.{json,log,png}; do   # before tee empties an earlier run's log
    [ ! -e "$f" ] || { echo "gpu.sh: $f exists; refusing to overwrite it (set OUT to another folder)"; exit 1; }
done

trap 'rm -rf "${GPU_STAGE:-}"' EXIT   # set first: env.sh makes GPU_STAGE before it can fail
source tests/gpu/env.sh || exit 1
python3 -c "import open_clip, torch; assert torch.cuda.is_available(), 'no CUDA device'" || {
    echo "gpu.sh: needs torch with CUDA and open_clip (run tests/gpu/prepare.sh and carry .gpu)"; exit 1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
export PYTHONUNBUFFERED=1
timeout 450 python3 -m benchmarks.run --device cuda --json "$OUT/benchmarks_cuda.json" \
    --plot "$OUT/benchmarks_cuda.png" "$@" 2>&1 | tee "$OUT/benchmarks_cuda.log"
exit "${PIPESTATUS[0]}"
