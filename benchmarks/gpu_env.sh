# Sourced by benchmarks/gpu.sh and tests/gpu/run.sh (from the repository root): makes the wheels and
# the ComfyUI tree that benchmarks/prepare_gpu.sh put in .bench/ importable on a machine without
# internet. Returns 1 when the wheels do not install.
if compgen -G ".bench/whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bench_site .bench/whl/*.whl || return 1
    export PYTHONPATH="/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${COMFYUI_PATH:-}" ] && [ -d .bench/ComfyUI/comfy ]; then
    export COMFYUI_PATH="$PWD/.bench/ComfyUI"
fi
