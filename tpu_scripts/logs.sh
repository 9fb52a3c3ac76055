#!/usr/bin/env bash
# Usage: tpu_scripts/logs.sh [-r RUN_NAME] [-n LINES] [WORKER]
#
# Without WORKER: prints the last LINES lines of every worker's log, each line tagged [worker N],
# then whether the run is still running there or its exit status (changes nothing: stop.sh is
# what stops a run).
# With WORKER (0, 1, ...): follows that worker's log (tail -F) until Ctrl-C, which stops following,
# not the run.
#   -r RUN_NAME   the run whose logs to show (default: each worker's latest run.sh)
#   -n LINES      how many lines (default 50)
set -euo pipefail
TPU_OPTIONS=r:n:h # getopts option string; env.sh answers -h/--help with it
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

RUN=""
LINES=50
while getopts "$TPU_OPTIONS" opt; do
  case $opt in
    r) RUN=$OPTARG ;;
    n) LINES=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# <= 1)) || die "expected at most one WORKER, got: $*"
WORKER_ARG=${1:-}
[[ -z "$WORKER_ARG" ]] || is_uint "$WORKER_ARG" || die "WORKER=$WORKER_ARG: expected 0, 1, ..."
[[ -z "$RUN" ]] || valid_run_name "$RUN" || die "-r $RUN: not a run name"
is_uint "$LINES" || die "-n $LINES: expected a number of lines"
require_settings PROJECT ZONE TPU_NAME LOG_DIR

body=$(
  cat <<'EOF'
run=$RUN
if [ -z "$run" ] && [ -f "$LOG_DIR/current" ]; then run=$(cat "$LOG_DIR/current"); fi
log="$LOG_DIR/$run/worker-$WORKER.log"
if [ -z "$run" ] || [ ! -f "$log" ]; then
  echo "[worker $WORKER] no log ${run:+for run $run }in $LOG_DIR"
  exit 0
fi
if [ "$FOLLOW" = 1 ]; then
  echo "following $log on worker $WORKER (Ctrl-C to stop following)"
  exec tail -n "$LINES" -F "$log"
fi
tail -n "$LINES" "$log" | sed "s/^/[worker $WORKER] /"
base="$LOG_DIR/$run/worker-$WORKER"
if [ -f "$base.pid" ] && kill -0 -- "-$(cat "$base.pid")" 2>/dev/null; then
  echo "[worker $WORKER] run $run: running"
elif [ -f "$base.exit" ]; then
  echo "[worker $WORKER] run $run: exited with status $(cat "$base.exit")"
else
  echo "[worker $WORKER] run $run: not running, exit status not recorded"
fi
EOF
)

# shellcheck disable=SC2034  # FOLLOW is read on the workers, through remote_command
if [[ -z "$WORKER_ARG" ]]; then
  FOLLOW=0
  on_all_workers "$body" RUN LOG_DIR LINES FOLLOW
else
  FOLLOW=1
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --worker="$WORKER_ARG" \
    --quiet --command="$(remote_command "$body" RUN LOG_DIR LINES FOLLOW)"
fi
