#!/usr/bin/env bash
# Usage: tpu_scripts/stop.sh [-r RUN_NAME] [-t SECONDS] [-h]
#
# Stops the run on every worker at once (--worker=all): SIGTERM to the trainer, so it can write a
# checkpoint and exit, then SIGKILL to the run's whole process group if it is still there after
# STOP_TIMEOUT seconds. Workers where the run is not running report so and are left alone.
#   -r RUN_NAME   the run to stop (default: each worker's latest run.sh)
#   -t SECONDS    grace period before SIGKILL (default: STOP_TIMEOUT=300)
set -euo pipefail
TPU_OPTIONS=r:t:h # getopts option string; env.sh answers -h/--help with it
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

RUN=""
while getopts "$TPU_OPTIONS" opt; do
  case $opt in
    r) RUN=$OPTARG ;;
    t) STOP_TIMEOUT=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# == 0)) || die "unexpected argument '$1' (see -h)"
[[ -z "$RUN" ]] || valid_run_name "$RUN" || die "-r $RUN: not a run name"
is_uint "$STOP_TIMEOUT" || die "-t $STOP_TIMEOUT: expected a whole number of seconds"
require_settings PROJECT ZONE TPU_NAME LOG_DIR

# The trainer is the child of the wrapper that run.sh started as process-group leader. Only it gets
# SIGTERM: its own helper processes (data loading) must stay up while it saves.
body=$(
  cat <<'EOF'
run=$RUN
if [ -z "$run" ] && [ -f "$LOG_DIR/current" ]; then run=$(cat "$LOG_DIR/current"); fi
base="$LOG_DIR/$run/worker-$WORKER"
if [ -z "$run" ] || [ ! -f "$base.pid" ]; then
  echo "worker $WORKER: no run ${run:+named $run }was started here; nothing to stop"
  exit 0
fi
group=$(cat "$base.pid")
if ! kill -0 -- "-$group" 2>/dev/null; then
  status=$(cat "$base.exit" 2>/dev/null || echo unknown)
  echo "worker $WORKER: run $run is not running (exit status $status)"
  exit 0
fi
echo "worker $WORKER: SIGTERM to run $run; SIGKILL in ${STOP_TIMEOUT}s if it is still running"
pkill -TERM -P "$group" || true
waited=0
while kill -0 -- "-$group" 2>/dev/null && [ "$waited" -lt "$STOP_TIMEOUT" ]; do
  sleep 1
  waited=$((waited + 1))
done
if kill -0 -- "-$group" 2>/dev/null; then
  kill -KILL -- "-$group" 2>/dev/null || true
  echo killed >"$base.exit"
  echo "worker $WORKER: run $run killed after ${STOP_TIMEOUT}s"
else
  status=$(cat "$base.exit" 2>/dev/null || echo unknown)
  echo "worker $WORKER: run $run stopped after ${waited}s (exit status $status)"
fi
EOF
)

log "stopping run ${RUN:-(latest)} on every worker of $TPU_NAME"
with_retries on_all_workers "$body" RUN LOG_DIR STOP_TIMEOUT
