#!/usr/bin/env bash
# GPU check: the gradient features on a real GPU, as they are on users' machines. At most 8 minutes
# on one CUDA GPU; writes $OUT/summary.txt (default ./gpu_out, git-ignored) and one log per part.
#
#  1. a real ComfyUI server on CUDA (no --cpu; real moves, no emulation), normal VRAM: the ReNO
#     (Latent-CLIP and pixel-CLIP rewards), SamplerCustom ReNO, safety guidance (fp32 and bf16),
#     scoring and zero-shot graphs twice with POST /free between (tests/comfy/test_gpu_emulation.py),
#     then every bad-input case and the remaining workflow node paths (tests/comfy/test_reliability.py);
#  2. the same graphs with --lowvram (partial loads: the UNet cast by comfy.ops, the CLIPs whole);
#  3. the ReNO memory benchmark with and without gradient checkpointing on CUDA
#     (max_memory_allocated; bf16 SD2.1 and SDXL UNets at 512 and 1024 px).
#
# Needs a machine where ComfyUI itself runs (its requirements.txt installed, torch with CUDA),
# open_clip and pytest, and COMFYUI_PATH pointing at the tree (or .bench/ from
# benchmarks/prepare_gpu.sh, which holds open_clip's wheels and ComfyUI's model code only: enough for
# part 3, not for a server). Not run yet: no GPU was lent to the work that wrote it.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"

source benchmarks/gpu_env.sh || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LATENTCLIP_TEST_GPU=1
python3 -c "import open_clip, pytest, torch; assert torch.cuda.is_available(), 'no CUDA device'" || {
    echo "run.sh: needs torch with CUDA, open_clip and pytest (see benchmarks/prepare_gpu.sh)" | tee -a "$summary"; exit 1; }
[ -d "${COMFYUI_PATH:-/nonexistent}/comfy" ] || { echo "run.sh: set COMFYUI_PATH to a ComfyUI tree" | tee -a "$summary"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$summary" 2>&1 || true

status=0
part() {   # part NAME SECONDS COMMAND...: run, log, one summary line
    local name=$1 seconds=$2; shift 2
    local t0=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || status=1
    echo "$name: exit $rc in $((SECONDS - t0)) s; $(grep -E '[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -1)" >> "$summary"
}

SERVER_TESTS=(tests/comfy/test_gpu_emulation.py tests/comfy/test_reliability.py -k "not soak")
LATENTCLIP_TEST_COMFY_ARGS="" part server_normal_vram 170 python3 -m pytest -q -rs -s "${SERVER_TESTS[@]}"
LATENTCLIP_TEST_COMFY_ARGS="--lowvram" part server_lowvram 170 python3 -m pytest -q -rs -s "${SERVER_TESTS[@]}"
part reno_memory 120 python3 -m benchmarks.reno_memory --device cuda --cases sd21:512,sdxl:512,sdxl:1024 \
    --repeats 3 --json "$OUT/reno_memory_cuda.json"
sed -n '/^| UNet/,$p' "$OUT/reno_memory.log" >> "$summary"
cat "$summary"
exit $status
