#!/usr/bin/env bash
# Usage: tpu_scripts/run.sh [-n RUN_NAME] [-e NAME=VALUE]... CMD [ARG]...
#
# Starts CMD on every worker at once (--worker=all; a multi-host JAX program needs all of them, so
# this never targets one worker), in REPO_DIR with the virtualenv VENV_DIR first on PATH. Each
# worker runs it under setsid + nohup, so it survives the ssh session, and writes its output to
# ~/LOG_DIR/RUN_NAME/worker-N.log. Re-running with the same RUN_NAME while it runs changes nothing;
# starting another run while one runs is refused (stop.sh first).
#   -n RUN_NAME     name of the run and of its log folder (default: run-<UTC date>-<time>)
#   -e NAME=VALUE   export NAME to CMD's environment (repeatable; do not pass secrets this way:
#                   the value is visible in the ssh command line)
# BUCKET, when set, is exported to CMD's environment too. A literal $BUCKET in CMD or a -e value
# (quoted, so your shell left it) is warned about: nothing on the workers expands it.
# Example:
#   tpu_scripts/run.sh -n sft python -m cloud_jax.train --config configs/llama3_8b_critique_sft.yaml
set -euo pipefail
TPU_OPTIONS=n:e:h # getopts option string; env.sh answers -h/--help with it
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

RUN="run-$(date -u +%Y%m%d-%H%M%S)"
ENV_EXPORTS=""
env_values=()
while getopts "$TPU_OPTIONS" opt; do
  case $opt in
    n) RUN=$OPTARG ;;
    e)
      parse_env_option "$OPTARG"
      ENV_EXPORTS+="export $ENV_NAME=$(shquote "$ENV_VALUE")"$'\n'
      env_values+=("$ENV_VALUE")
      ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# > 0)) || die "no command given; e.g. run.sh python -m cloud_jax.train --config configs/X.yaml"
valid_run_name "$RUN" || die "-n $RUN: use letters, digits, '.', '_' and '-' only"
require_settings PROJECT ZONE TPU_NAME REPO_DIR VENV_DIR LOG_DIR
warn_literal_bucket "${env_values[@]}" "$@"
CMD=$(quote_words "$@")

# The wrapper records its pid (= the process group, thanks to setsid) before starting CMD and CMD's
# exit status after; stop.sh and babysit.sh read both.
body=$(
  cat <<'EOF'
if [ ! -x "$VENV_DIR/bin/python" ]; then
  echo "worker $WORKER: no virtualenv at $VENV_DIR; run tpu_scripts/setup.sh first" >&2
  exit 1
fi
if [ ! -d "$REPO_DIR" ]; then
  echo "worker $WORKER: no code at $REPO_DIR; run tpu_scripts/sync.sh first" >&2
  exit 1
fi
mkdir -p "$LOG_DIR/$RUN"
logs=$(cd "$LOG_DIR" && pwd)
venv=$(cd "$VENV_DIR" && pwd)
base="$logs/$RUN/worker-$WORKER"
alive() { [ -f "$1" ] && kill -0 -- "-$(cat "$1")" 2>/dev/null; }
if [ -f "$logs/current" ]; then
  current=$(cat "$logs/current")
  if alive "$logs/$current/worker-$WORKER.pid"; then
    if [ "$current" = "$RUN" ]; then
      echo "worker $WORKER: run $RUN is already running; left as it is"
      exit 0
    fi
    echo "worker $WORKER: run $current is still running; stop it first (tpu_scripts/stop.sh)" >&2
    exit 1
  fi
fi
printf "%s\n" "$RUN" >"$logs/current"
rm -f "$base.pid" "$base.exit"
printf "%s\n" "$CMD" >"$logs/$RUN/command"
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
printf "=== %s worker %s starts: %s\n" "$now" "$WORKER" "$CMD" >>"$base.log"
cd "$REPO_DIR"
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" PYTHONUNBUFFERED=1
if [ -n "$BUCKET" ]; then export BUCKET; fi
eval "$ENV_EXPORTS"
eval "set -- $CMD"
wrapper='echo $$ >"$0.pid"; "$@"; echo $? >"$0.exit"'
setsid nohup bash -c "$wrapper" "$base" "$@" >>"$base.log" 2>&1 </dev/null &
for _ in 1 2 3 4 5 6 7 8 9 10; do
  if [ -f "$base.pid" ]; then break; fi
  sleep 1
done
sleep 2
if ! alive "$base.pid"; then
  status=$(cat "$base.exit" 2>/dev/null || echo unknown)
  if [ "$status" = 0 ]; then
    echo "worker $WORKER: run $RUN already finished (exit status 0); log $base.log"
    exit 0
  fi
  echo "worker $WORKER: run $RUN ended at once (exit status $status); end of $base.log:" >&2
  tail -n 20 "$base.log" >&2
  exit 1
fi
echo "worker $WORKER: run $RUN started (process group $(cat "$base.pid")), log $base.log"
EOF
)

log "starting run $RUN on every worker of $TPU_NAME: $CMD"
if ! on_all_workers "$body" RUN CMD ENV_EXPORTS REPO_DIR VENV_DIR LOG_DIR BUCKET; then
  die "run $RUN did not start on every worker (see above). Workers that did start it keep" \
    "running: run.sh -n $RUN ... again leaves them as they are, or stop.sh ends them"
fi
cat <<EOF
Run $RUN is running on every worker of $TPU_NAME; each writes ~/$LOG_DIR/$RUN/worker-N.log there.
  tpu_scripts/logs.sh 0     follow worker 0's log (Ctrl-C stops following, not the run)
  tpu_scripts/logs.sh       last lines of every worker's log
  tpu_scripts/stop.sh       SIGTERM everywhere (the trainer saves), SIGKILL ${STOP_TIMEOUT}s later
EOF
