#!/bin/bash
# The GPU benchmarks of docs/BENCHMARKS.md ("On one GPU: the 1B-shaped workload") in one device
# call, most important first, inside a time budget:
#
#   OUT=$OUT bash tools/gpu_benches.sh            # the device call: timeout_s 600, no carry
#
# 1. sample_32        bench sample, 32 inputs x K = 8, with transformers, a decode profile
# 2. train            bench train, the llama-1b preset, with torch, a step profile
# 3. sample_32_pallas bench sample, 32 inputs, ours only, the attention as the Pallas kernel
#                     (cloud_jax/model/gpu_kernels.py), a decode profile
# 4. sample_8         bench sample, 8 inputs x K = 8, with transformers
# 5. sample_32_graphs bench sample, 32 inputs, ours only, XLA's command buffers (CUDA graphs)
#                     taking the decode's while loops too (GRAPH_FLAGS), so the
#                     host need not read the loop's condition before each step
# 6. sample_32_check8 bench sample, 32 inputs, ours only, the end checked every 8 steps
# 7. sample_8_pallas  bench sample, 8 inputs, ours only, the Pallas kernel (each input's keys
#                     split over 2 programs: cloud_jax.model.gpu_kernels.splits)
#
# Each bench writes its record ($OUT/gpu_<name>.json, for docs/measurements/) when it finishes,
# so a call cut short keeps what ran; a bench that would start with under 30 s of the budget
# left is skipped and named. The named benches' records from an earlier call into the same $OUT
# are removed first, so the table below holds this call's numbers only. All output also goes to $OUT/gpu_benches.log. The profiles' traces
# stay out of $OUT (PROFILE_DIR): what a call brings back is a few files, and each record holds
# its profile's summary. The last lines printed are a table of the main numbers, then the
# kernel's, the graphs' and the every-8-steps check's decode steps against sample_32's (and
# sample_8's), and whether the graphs and the check wrote the same critiques.
#
# Environment: OUT (default runs/gpu_benches), PYTHON (python3), BUDGET_S (seconds for all,
# default 560), BENCHES (which to run, in order; default all seven), BACKEND (gpu),
# PROFILE_DIR (/tmp/cloud_jax_profiles), GRAPH_FLAGS (XLA_FLAGS added for sample_32_graphs),
# AUTOTUNE_DIR (/tmp/cloud_jax_autotune: XLA's per-fusion autotuning results, shared by the
# benches, so that the same fusion gets the same kernel in every bench, which the critiques'
# comparison needs, and later benches skip tuning what an earlier one tuned), EXTRA_SAMPLE /
# EXTRA_TRAIN (flags added after every sample / train bench's own: tools/device_rehearsal.sh
# runs this at tiny sizes on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-runs/gpu_benches}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-560}
BENCHES=${BENCHES:-sample_32 train sample_32_pallas sample_8 sample_32_graphs sample_32_check8
sample_8_pallas}
GRAPH_FLAGS=${GRAPH_FLAGS:---xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL}
BACKEND=${BACKEND:-gpu}
PROFILE_DIR=${PROFILE_DIR:-/tmp/cloud_jax_profiles}
AUTOTUNE_DIR=${AUTOTUNE_DIR:-/tmp/cloud_jax_autotune}
# Words split on spaces and newlines (read -d '' reads to the end and then returns 1).
read -r -d '' -a extra_sample <<< "${EXTRA_SAMPLE:-}" || true
read -r -d '' -a extra_train <<< "${EXTRA_TRAIN:-}" || true
read -r -d '' -a benches <<< "$BENCHES" || true
for name in "${benches[@]}"; do
    case $name in
        sample_32 | train | sample_32_pallas | sample_8 | sample_32_graphs | sample_32_check8 \
            | sample_8_pallas) ;;
        *) echo "error: no bench named $name (sample_32, train, sample_32_pallas, sample_8," \
                "sample_32_graphs, sample_32_check8, sample_8_pallas)" >&2
           exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1
mkdir -p "$AUTOTUNE_DIR"
# A record left in $OUT by an earlier call is not this call's: one of a bench that is skipped or
# stops before writing its own would be read into the table below as if it had run.
for name in "${benches[@]}"; do
    rm -f "$OUT/gpu_$name.json"
done
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_per_fusion_autotune_cache_dir=$AUTOTUNE_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
log="$OUT/gpu_benches.log"
: > "$log"
start=$(date +%s)
status=0
sample=(bench sample --backend "$BACKEND" --preset llama-1b --threads 8 --repeats 2
        --bandwidth-bytes 4294967296)
train=(bench train --backend "$BACKEND" --preset llama-1b)

# run NAME CAP_S ARGS...: one bench under `timeout`, at most CAP_S and what the budget has left.
run() {
    local name=$1 cap=$2 left t0 rc
    shift 2
    left=$((BUDGET_S - ($(date +%s) - start)))
    if ((left < 30)); then
        echo "== $name: skipped, $left s of the $BUDGET_S s budget left" | tee -a "$log"
        status=1
        return
    fi
    if ((cap > left)); then cap=$left; fi
    echo "== $name: at most $cap s: ${XLA_FLAGS:+XLA_FLAGS=\"$XLA_FLAGS\" }python -m cloud_jax $*" \
        | tee -a "$log"
    t0=$(date +%s)
    rc=0
    # A bench that fails or runs out of time is reported; the next one still runs. SIGTERM is
    # taken when the bench is next in Python (a compiled call runs to its end first): killed
    # 10 s later if it has not ended by then.
    if ((cap > 10)); then cap=$((cap - 10)); fi
    timeout -k 10 "$cap" "$PYTHON" -m cloud_jax "$@" 2>&1 | tee -a "$log" || rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$log"
    ((rc == 0)) || status=1
}

for name in "${benches[@]}"; do
    case $name in
        sample_32) run "$name" 300 "${sample[@]}" --profile "$PROFILE_DIR/sample_32" \
            --record "$OUT/gpu_$name.json" "${extra_sample[@]}" ;;
        train) run "$name" 300 "${train[@]}" --profile "$PROFILE_DIR/train" \
            --record "$OUT/gpu_$name.json" "${extra_train[@]}" ;;
        sample_8) run "$name" 200 "${sample[@]}" --inputs 8 --record "$OUT/gpu_$name.json" \
            "${extra_sample[@]}" ;;
        sample_32_graphs) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$GRAPH_FLAGS" run "$name" 150 \
            "${sample[@]}" --skip-hf --record "$OUT/gpu_$name.json" "${extra_sample[@]}" ;;
        sample_32_check8) run "$name" 150 "${sample[@]}" --skip-hf --steps-per-check 8 \
            --record "$OUT/gpu_$name.json" "${extra_sample[@]}" ;;
        sample_32_pallas) run "$name" 150 "${sample[@]}" --skip-hf --decode-attention-impl pallas \
            --profile "$PROFILE_DIR/$name" --record "$OUT/gpu_$name.json" "${extra_sample[@]}" ;;
        sample_8_pallas) run "$name" 120 "${sample[@]}" --inputs 8 --skip-hf \
            --decode-attention-impl pallas --record "$OUT/gpu_$name.json" "${extra_sample[@]}" ;;
    esac
done

echo "== all in $(($(date +%s) - start)) s; the main numbers:" | tee -a "$log"
"$PYTHON" - "$OUT" "${benches[@]}" <<'PY' | tee -a "$log"
import json, os, sys

out, names = sys.argv[1], sys.argv[2:]
keys = ("decode_step_over_hbm_floor", "decode_step_ms", "decode_us_per_op",
        "ours_critiques_per_s", "hf_critiques_per_s", "ratio", "k8_over_k1", "steps_per_check",
        "decode_attention", "pallas_max_abs_diff", "pallas_parts", "critiques_sha256",
        "mfu", "ours_tokens_per_s", "torch_tokens_per_s", "attention", "hf_error", "torch_error",
        "attention_error")
def load(name):
    """(the record's result or None, why there is none)."""
    path = os.path.join(out, f"gpu_{name}.json")
    if not os.path.exists(path):
        return None, "no record"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["result"], ""
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"unreadable record ({type(err).__name__}: {err})"


for name in names:
    result, why = load(name)
    if result is None:
        print(f"{name}: {why}")
        continue
    fields = [f"{k}={result[k]:.3g}" if isinstance(result[k], float) else f"{k}={result[k]}"
              for k in keys if result.get(k) is not None]
    print(f"{name}: " + ", ".join(fields))

# What the next change to the defaults hangs on (docs/BENCHMARKS.md, "On one GPU"): the kernel's,
# the graphs' and the check's decode steps against XLA's every-step ones at the same inputs,
# where both ran. The graphs and the check change how the decode runs, not what it computes: their
# critiques must be sample_32's token for token.
def step(name):
    return load(name)[0] if name in names else None

for name, base_name, what, default in (
        ("sample_32_pallas", "sample_32", "the Pallas decode attention",
         "model.decode_attention_impl=auto"),
        ("sample_32_graphs", "sample_32", "the decode loop in command buffers",
         "those XLA flags on GPUs"),
        ("sample_32_check8", "sample_32", "checking the end every 8 steps",
         "steps_per_check 8 on GPUs"),
        ("sample_8_pallas", "sample_8", "the Pallas decode attention at 8 inputs",
         "model.decode_attention_impl=auto")):
    base, other = step(base_name), step(name)
    if not (base and other and base.get("decode_step_ms") and other.get("decode_step_ms")):
        continue
    ratio = other["decode_step_ms"] / base["decode_step_ms"]
    diff = other.get("pallas_max_abs_diff")
    same = "pallas" in name or other.get("critiques_sha256") == base.get("critiques_sha256")
    agrees = (diff is None or diff < 0.05) and same
    verdict = ("DIFFERENT critiques from the same workload and kernels: keep the default"
               if not same
               else "DISAGREES with XLA's attention: keep the default" if not agrees else
               f"faster by {1 - ratio:.0%}: a case for {default} as the default"
               if ratio < 0.95 else
               f"slower by {ratio - 1:.0%}: keep the default" if ratio > 1.05 else
               "within 5%: keep the default")
    print(f"{what}: decode step {other['decode_step_ms']:.3g} ms against {base_name}'s "
          f"{base['decode_step_ms']:.3g} ms ({ratio:.2f}x); {verdict}")
PY
exit $status
