#!/bin/bash
# A rehearsal of the GPU device runs on this CPU host, in an environment built like the GPU
# image: its Python and JAX, and only the packages that image is known to hold. What the device
# run would lack or trip over shows up here, before any device time is spent:
#
#   bash tools/device_rehearsal.sh
#
# 1. makes a virtual environment ($VENV, default /tmp/cloud_jax_device_venv) with $PYTHON312
#    and the image's packages ($IMAGE_PACKAGES: jax 0.11.2, flax, optax, orbax-checkpoint,
#    transformers, Jinja2; no torch, so the torch halves of the benches are skipped; the image
#    was seen with transformers 5.17, whose GGUF integration imports torch, which the image has
#    and this environment not, so the default takes this project's transformers pin),
# 2. runs tools/gpu_benches.sh (the device's bench call) there, its benches at tiny sizes with
#    --backend cpu (that call carries no packages, so nothing else may be needed),
# 3. packs the offline bundle (tools/offline_bundle.py) and runs tools/gpu_smollm2.sh from it
#    at a few steps, as the device would, writing to $OUT (default /tmp/cloud_jax_rehearsal),
# 4. in a second environment ($AOT_VENV: the image's JAX with JAX's CUDA plugin of the same
#    release, and this project's other requirements), runs tests/test_gpu_kernels.py: the
#    Pallas decode attention as that JAX's Triton compiles it for an H100, and its interpreter.
#
# Needs a Python 3.12 (the image's; JAX 0.11 needs >= 3.12), PyPI, this checkout's .venv (for
# `pack`) and the SmolLM2 GGUF (make smollm2). Not part of the test suite: it installs packages.
set -euo pipefail
cd "$(dirname "$0")/.."
# The first Python 3.12 that runs (a pyenv shim on PATH may name one it will not run).
if [ -z "${PYTHON312:-}" ]; then
    for candidate in python3.12 /root/.pyenv/versions/3.12.*/bin/python; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            PYTHON312=$candidate
            break
        fi
    done
fi
if [ -z "${PYTHON312:-}" ]; then
    echo "error: no Python 3.12 found: set PYTHON312=/path/to/python3.12" >&2
    exit 1
fi
VENV=${VENV:-/tmp/cloud_jax_device_venv}
AOT_VENV=${AOT_VENV:-/tmp/cloud_jax_device_aot_venv}
OUT=${OUT:-/tmp/cloud_jax_rehearsal}
IMAGE_PACKAGES=${IMAGE_PACKAGES:-"jax==0.11.2 jaxlib==0.11.2 flax==0.12.10 optax==0.2.8
    orbax-checkpoint==0.12.8 transformers==5.24.0 Jinja2==3.1.6"}
export PYTHONUNBUFFERED=1

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON312" -m venv "$VENV"
    # shellcheck disable=SC2086  # the package list is split on purpose
    "$VENV/bin/python" -m pip install -q $IMAGE_PACKAGES
fi
"$VENV/bin/python" -c 'import sys, jax, flax, transformers
print("rehearsal environment: python", sys.version.split()[0], "jax", jax.__version__,
      "flax", flax.__version__, "transformers", transformers.__version__)'
rm -rf "$OUT"
mkdir -p "$OUT/work"

echo "== tools/gpu_benches.sh (torch-free halves), tiny, --backend cpu"
benches_out="$OUT/benches"
BACKEND=cpu PYTHON="$VENV/bin/python" PROFILE_DIR="$benches_out/profiles" OUT="$benches_out" \
    EXTRA_SAMPLE="--inputs 2 --samples 8 --prompt-len 16 --new-tokens 16 --repeats 1
                  --hidden-size 64 --num-layers 1 --num-heads 4 --num-kv-heads 2
                  --intermediate-size 64 --vocab-size 64 --bandwidth-bytes 1048576 --skip-hf" \
    EXTRA_TRAIN="--pairs 1 --seq 16 --hidden 32 --layers 1 --heads 2 --kv-heads 1 --mlp 64
                 --vocab 64 --repeats 1 --steps 1 --matmul-n 128 --skip-torch" \
    bash tools/gpu_benches.sh | tail -6

echo "== the SmolLM2 pipeline from the offline bundle, a few steps"
.venv/bin/python tools/offline_bundle.py pack --out "$OUT/bundle"
REHEARSAL=$OUT
BUNDLE="$REHEARSAL/bundle" OUT="$REHEARSAL/smollm2" PYTHON="$VENV/bin/python" \
    RUN_DIR="$REHEARSAL/run" WORK="$REHEARSAL/work" bash tools/gpu_smollm2.sh benchmark.num_train=8 benchmark.num_eval=4 \
    data.batch_pairs=2 stages.critique_sft.total_steps=2 stages.cloud.total_steps=1 \
    self_critique.max_critique_tokens=4 self_critique.batch_size=16 \
    evaluation.max_critique_tokens=4 evaluation.batch_size=8
echo "== the Pallas decode attention under the image's JAX, compiled for an H100"
if [ ! -x "$AOT_VENV/bin/python" ]; then
    "$PYTHON312" -m venv "$AOT_VENV"
    jax_version=$("$VENV/bin/python" -c 'import jax; print(jax.__version__)' 2>/dev/null)
    # This project's requirements but JAX and its libraries, which stay the image's, and the
    # CUDA libraries the GPU compiler loads (requirements-gpu-aot.txt's).
    { grep -v -i -E '^(jax|jaxlib|flax|optax|orbax-checkpoint)==' requirements.txt
      grep -i '^nvidia-' requirements-gpu-aot.txt; } > "$OUT/requirements-no-jax.txt"
    # shellcheck disable=SC2086  # the package list is split on purpose
    "$AOT_VENV/bin/python" -m pip install -q $IMAGE_PACKAGES \
        "jax-cuda12-plugin==$jax_version" "jax-cuda12-pjrt==$jax_version" \
        -r "$OUT/requirements-no-jax.txt"
fi
JAX_PLATFORMS=cpu "$AOT_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py
echo "rehearsal passed: $OUT"
