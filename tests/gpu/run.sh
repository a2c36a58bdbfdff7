#!/usr/bin/env bash
# GPU check: the pack's features on a real GPU, as they run on users' machines, in one call on a bare
# GPU machine (torch 2.11, Python 3.12, no ComfyUI requirements, no network). At most 8 minutes; writes
# $OUT/summary.txt (default ./gpu_out, git-ignored) and at most 7 more files (one log per part + JSON).
#
# First, here: bash tests/gpu/prepare.sh   (fills the ignored .gpu/: ComfyUI snapshot + wheels)
# There:       bash tests/gpu/run.sh        (device tool: carry=[".gpu"])
# Dry run:     GPU_CHECK_DEVICE=cpu bash tests/gpu/run.sh   (same set-up, --cpu server, small sizes;
#              tests/gpu/dry_run.sh runs it in a fresh torch 2.11 venv with the network closed)
#
# Parts:
#  1. server_normal: a real ComfyUI server on CUDA (real moves, no emulation), an fp16 UNet, `auto`
#     Latent-CLIPs (fp16 on CUDA), a VAE in ComfyUI's dtype (bf16): ReNO with latent and pixel
#     rewards, SamplerCustom ReNO, safety guidance, scoring, zero-shot, the Search Sampler with
#     best_of_n, prune and fk_steering, each twice around POST /free (tests/comfy/test_gpu_emulation.py);
#  2. server_novram: the same with --novram (every UNet layer cast on use: real per-layer casting);
#  3. reno_memory: one ReNO iteration with and without gradient checkpointing, SD2.1 at 512 px and SDXL
#     at 1024 px (benchmarks/reno_memory.py, max_memory_allocated);
#  4. speed: s per ReNO iteration (Latent-CLIP vs decode + ViT-H-14, 512 px, SDXL arch, fp16), the
#     projected s per image for 50 iterations, zero / non-finite fp16 noise-gradient entries, and one FK
#     search of 8 particles x 20 steps at 1024 px with each reward (tests/gpu/speed.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
started=$SECONDS
say() { echo "$*" | tee -a "$summary"; }

# -- set-up: the prepared wheels, the ComfyUI tree, PyAV's stand-in (tests/gpu/env.sh) ------------------
trap 'rm -rf "${GPU_STAGE:-}"' EXIT   # set first: env.sh makes GPU_STAGE before a step of it can fail
source tests/gpu/env.sh > "$OUT/setup.txt" 2>&1 || { say "run.sh: $(cat "$OUT/setup.txt")"; exit 1; }
rm -f "$OUT/setup.txt"
COMFY_ARGS="--front-end-root $GPU_STAGE/frontend --disable-api-nodes"
if [ "$DEVICE" = cuda ]; then
    export LATENTCLIP_TEST_GPU=1
    python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" 2>>"$summary" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$summary" 2>&1 || true
else
    say "DRY RUN on the CPU: --cpu server with GPU-move emulation, small benchmark sizes, 4x the time limits"
    SLOWER=4
fi
python3 -c "import sys, torch, open_clip; print('python', sys.version.split()[0], '| torch', torch.__version__, '| open_clip', open_clip.__version__)" \
    >> "$summary" 2>&1 || { say "run.sh: torch/open_clip do not import"; exit 1; }
say "set-up: $((SECONDS - started)) s"

status=0
part() {   # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, one summary line
    local name=$1 seconds=$(( $2 * ${SLOWER:-1} )); shift 2
    local t0=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || status=1
    say "$name: exit $rc in $((SECONDS - t0)) s; $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/$name.log" | tail -1)"
}

SERVER_TESTS=(tests/comfy/test_gpu_emulation.py -p no:cacheprovider)
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then   # CI's dry run: the set-up, a server and two graphs
    LATENTCLIP_TEST_COMFY_ARGS="$COMFY_ARGS" part server_normal 300 python3 -m pytest -q -rs -s "${SERVER_TESTS[@]}" \
        -k "emulates or scoring or fk_steering_after_moves_and_reloads[fp32]"
    say "total: $((SECONDS - started)) s; $( [ $status -eq 0 ] && echo PASS || echo FAIL)"
    exit $status
fi
LATENTCLIP_TEST_COMFY_ARGS="$COMFY_ARGS" part server_normal 150 python3 -m pytest -q -rs -s "${SERVER_TESTS[@]}"
if [ "$DEVICE" = cuda ]; then
    LATENTCLIP_TEST_COMFY_ARGS="$COMFY_ARGS --novram" part server_novram 150 python3 -m pytest -q -rs -s "${SERVER_TESTS[@]}"
else
    say "server_novram: skipped (ComfyUI refuses --novram with --cpu)"
fi
if [ "$DEVICE" = cuda ]; then
    part reno_memory 100 python3 -m benchmarks.reno_memory --device cuda --dtype float16 \
        --cases sd21:512,sdxl:1024 --repeats 2 --json "$OUT/reno_memory.json"
    part speed 120 python3 tests/gpu/speed.py --device cuda --json "$OUT/speed.json"
else
    part reno_memory 120 python3 -m benchmarks.reno_memory --device cpu --cases sd21:256 --repeats 1 \
        --json "$OUT/reno_memory.json"
    part speed 300 python3 tests/gpu/speed.py --device cpu --small --json "$OUT/speed.json"
fi
sed -n '/^| UNet/,/^$/p' "$OUT/reno_memory.log" >> "$summary"
grep -E "^(ReNO|FK search|latent/pixel)" "$OUT/speed.log" >> "$summary"
say "total: $((SECONDS - started)) s; $( [ $status -eq 0 ] && echo PASS || echo FAIL)"
cat "$summary"
exit $status
