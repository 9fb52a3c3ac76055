#!/bin/bash
# SmolLM2-135M-Instruct through the CLoud pipeline on a machine with no network, from a bundle
# that tools/offline_bundle.py packed (docs/RESULTS.md, "On one GPU"):
#
#   bash tools/gpu_smollm2.sh [key=value ...]
#
# 1. joins the GGUF from the bundle's parts (checked against their sha256),
# 2. installs the bundle's wheels into a private folder (nothing else on the machine changes),
# 3. converts the GGUF (python -m cloud_jax convert-gguf),
# 4. runs configs/smollm2_135m_gpu_pipeline.yaml plus the key=value overrides given,
# 5. writes the measurement record and report.md to $OUT (default runs/gpu_smollm2_out), and
#    all it prints to $OUT/gpu_smollm2.log as it goes.
#
# The whole script keeps to BUDGET_S seconds (default 560, for a device call of timeout_s 600):
# the pipeline runs under `timeout` with what is left. A run that stops before its record is
# written (out of time, or failed) leaves $OUT/gpu_smollm2_partial.json: what RUN_DIR holds by
# then (each finished stage's summary, each finished evaluation's report, results.json if
# written), so the numbers measured so far come back with the call. The record, partial and
# report an earlier run left in $OUT are removed first.
#
# Environment: BUNDLE (default .device), OUT, PYTHON (default python3), CONFIG (default
# configs/smollm2_135m_gpu_pipeline.yaml), RUN_DIR (default runs/smollm2_135m_gpu_pipeline),
# BUDGET_S (default 560).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-.device}
OUT=${OUT:-runs/gpu_smollm2_out}
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/smollm2_135m_gpu_pipeline.yaml}
RUN_DIR=${RUN_DIR:-runs/smollm2_135m_gpu_pipeline}
WORK=${WORK:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-560}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# What an earlier run left in $OUT is not this run's: its record would stand in for this run's and
# keep the partial below from being written.
rm -f "$OUT/gpu_smollm2.json" "$OUT/gpu_smollm2_partial.json" "$OUT/gpu_smollm2_report.md"
# Everything printed also goes to $OUT, which comes back even when the call runs out of time.
exec > >(tee "$OUT/gpu_smollm2.log") 2>&1
start=$(date +%s)

# Whatever stops the run before its record is written: what RUN_DIR holds, in one file of $OUT.
partial() {
    local rc=$?
    if [ -f "$OUT/gpu_smollm2.json" ] || [ ! -d "$RUN_DIR" ]; then
        return
    fi
    "$PYTHON" - "$RUN_DIR" "$OUT/gpu_smollm2_partial.json" "$rc" "$(($(date +%s) - start))" \
        <<'PY' || true
import glob, json, os, sys

run_dir, path, rc, elapsed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


def load(name):
    try:
        with open(name, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


found = {"exit_status": rc, "elapsed_s": elapsed, "run_dir": run_dir,
         "results": load(os.path.join(run_dir, "results.json")),
         "stages": {os.path.basename(os.path.dirname(p)): load(p)
                    for p in sorted(glob.glob(os.path.join(run_dir, "*", "stage_summary.json")))},
         "evaluations": {os.path.basename(os.path.dirname(p)): load(p)
                         for p in sorted(glob.glob(os.path.join(run_dir, "eval", "*",
                                                                "report.json")))}}
with open(path, "w", encoding="utf-8") as f:
    json.dump(found, f, indent=1)
print(f"stopped (exit {rc}) after {elapsed} s before the record was written: "
      f"{len(found['stages'])} stage summaries and {len(found['evaluations'])} evaluation "
      f"reports in {path}")
PY
}
trap partial EXIT

"$PYTHON" tools/offline_bundle.py join --bundle "$BUNDLE" --out "$WORK/smollm2.gguf"
shopt -s nullglob
wheels=("$BUNDLE"/part*/wheels/*.whl)
if ((${#wheels[@]})); then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "${wheels[@]}"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed ${#wheels[@]} wheels into $WORK/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import jax, flax, optax, orbax.checkpoint as ocp, transformers, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "orbax", ocp.__version__, "transformers",
      transformers.__version__, "devices", jax.devices())'

"$PYTHON" -m cloud_jax convert-gguf --gguf "$WORK/smollm2.gguf" --out "$WORK/smollm2-135m-instruct"
left=$((BUDGET_S - ($(date +%s) - start)))
if ((left < 30)); then
    echo "error: $left s of the $BUDGET_S s budget left for the pipeline" >&2
    exit 1
fi
echo "pipeline: at most $left s (BUDGET_S $BUDGET_S)"
timeout -k 20 "$left" "$PYTHON" -m cloud_jax pipeline --config "$CONFIG" \
    --record "$OUT/gpu_smollm2.json" "init_from=$WORK/smollm2-135m-instruct" \
    "data.tokenizer=$WORK/smollm2-135m-instruct" "output_dir=$RUN_DIR" "$@"
cp "$RUN_DIR/report.md" "$OUT/gpu_smollm2_report.md"
echo "wall time $(($(date +%s) - start)) s (join, install, convert and pipeline)"
