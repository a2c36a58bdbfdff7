# Sourced (from the repository root) by tests/gpu/run.sh and benchmarks/gpu.sh on a bare GPU machine:
# installs the wheels that tests/gpu/prepare.sh put in .gpu/whl into a temporary site folder, extracts
# the ComfyUI snapshot beside it and puts both, and PyAV's stand-in, on the paths. Sets GPU_STAGE
# (the temporary folder; the caller removes it). Returns 1 with a one-line reason when .gpu/ is unusable.
GPU_STAGE=$(mktemp -d /tmp/latentclip_gpu_check.XXXXXX)
if ! compgen -G ".gpu/whl/*.whl" > /dev/null || ! compgen -G ".gpu/ComfyUI-*.tar.gz" > /dev/null; then
    echo "no usable .gpu/: run 'bash tests/gpu/prepare.sh' where the package registries are, and carry .gpu"
    return 1
fi
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$GPU_STAGE/site" \
        .gpu/whl/*.whl > "$GPU_STAGE/pip.log" 2>&1; then
    echo "installing .gpu/whl failed: $(tail -3 "$GPU_STAGE/pip.log")"
    return 1
fi
mkdir -p "$GPU_STAGE/ComfyUI" "$GPU_STAGE/frontend"
tar -xzf .gpu/ComfyUI-*.tar.gz -C "$GPU_STAGE/ComfyUI" --strip-components=1
echo '<!doctype html><title>no front end in the GPU check</title>' > "$GPU_STAGE/frontend/index.html"
export COMFYUI_PATH="$GPU_STAGE/ComfyUI"
export PYTHONPATH="$GPU_STAGE/site:$PWD/tests/gpu/standins:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
