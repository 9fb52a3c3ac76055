#!/usr/bin/env bash
# Usage: tpu_scripts/babysit.sh [-n RUN_NAME] [-e NAME=VALUE]... CMD [ARG]...
#
# Keeps CMD running on the TPU until it finishes on every worker. Every CHECK_SECONDS it reads the
# queued resource, the TPU VM and the run's state on each worker, and:
#   - TPU missing, preempted, suspended or failed: delete.sh -y, create.sh, setup.sh, sync.sh, then
#     run.sh with the same RUN_NAME and CMD (the trainer resumes from its latest checkpoint, which
#     must therefore be in BUCKET - output_dir=gs://..., or under its mount BUCKET_MOUNT: worker
#     disks do not survive);
#   - run crashed or gone on some worker (or its state unreadable 3 checks in a row): stop.sh,
#     then run.sh again;
#   - run finished (exit status 0) on every worker: exits 0;
#   - run stopped with exit status 2 on some worker (a usage or config error: bad flag, config key,
#     path or data, which a relaunch would only repeat): exits 2.
# On its first check it brings the TPU up and starts the run if needed (or adopts a run of the same
# RUN_NAME that is already running). Recoveries wait BACKOFF_BASE seconds, doubling up to
# BACKOFF_MAX while they keep failing; after MAX_RETRIES recoveries without progress it gives up
# (exit 1). Progress: the trainer's log on a worker says it resumed from a newer checkpoint
# ("resumed from DIR step N" with N above every step seen before for DIR); the count of recoveries
# then starts again from 0, so a long run preempted many times is not given up on.
# MAX_ITERATIONS > 0 stops it after that many checks. Every event is logged to stderr with a UTC
# timestamp; keep it alive with e.g. `nohup tpu_scripts/babysit.sh ... >babysit.log 2>&1 &`.
#   -n RUN_NAME     as for run.sh (default: run-<UTC date>-<time>, fixed for all relaunches)
#   -e NAME=VALUE   as for run.sh
set -euo pipefail
TPU_OPTIONS=n:e:h # getopts option string; env.sh answers -h/--help with it
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

RUN="run-$(date -u +%Y%m%d-%H%M%S)"
run_opts=()
while getopts "$TPU_OPTIONS" opt; do
  case $opt in
    n) RUN=$OPTARG ;;
    e)
      parse_env_option "$OPTARG" # refused now, not at the first launch on a slice set up for it
      run_opts+=(-e "$OPTARG")
      ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# > 0)) || die "no command given; e.g. babysit.sh python -m cloud_jax.train --config X.yaml"
valid_run_name "$RUN" || die "-n $RUN: use letters, digits, '.', '_' and '-' only"
require_settings PROJECT ZONE TPU_NAME QUEUED_RESOURCE ACCELERATOR_TYPE RUNTIME_VERSION
case "${DRY_RUN_TRAINER:-running}" in
  running | finished | failed | none | usage_error | unknown) ;;
  *) die "DRY_RUN_TRAINER=$DRY_RUN_TRAINER: expected running, finished, failed, none, usage_error" \
    "or unknown (the trainer's state a DRY_RUN rehearses)" ;;
esac
# What setup.sh and sync.sh would refuse on this machine, refused before a slice is requested.
check_jax_pin
check_source_checkout
CMD=("$@")

warn_literal_bucket "${run_opts[@]}" "${CMD[@]}"
if [[ -z "$BUCKET" ]]; then
  log "warning: BUCKET is not set; a recreated TPU starts with empty disks, so the run can only" \
    "resume if its checkpoints are written to a bucket (output_dir=gs://...)"
elif [[ -n "$BUCKET_MOUNT" && "${CMD[*]}" != *"$BUCKET_MOUNT"* && "${CMD[*]}" != *gs://* ]]; then
  log "warning: the command mentions neither BUCKET_MOUNT=$BUCKET_MOUNT (where setup.sh mounts" \
    "BUCKET=$BUCKET) nor a gs:// path; make sure its config writes checkpoints there, or a" \
    "recreated TPU restarts the run from scratch"
elif [[ -z "$BUCKET_MOUNT" && "${CMD[*]}" != *gs://* ]]; then
  log "warning: the command mentions no gs:// path (BUCKET=$BUCKET); make sure its config" \
    "writes checkpoints to the bucket (output_dir=$BUCKET/run), or a recreated TPU restarts the" \
    "run from scratch"
fi

# Sets TRAINER to running | finished | none | failed | unknown, and TRAINER_DETAIL to what each
# worker said ("0:running 1:exited 1 ...").
body=$(
  cat <<'EOF'
base="$LOG_DIR/$RUN/worker-$WORKER"
if [ "$(cat "$LOG_DIR/current" 2>/dev/null || true)" != "$RUN" ] || [ ! -f "$base.pid" ]; then
  echo "STATUS $WORKER none"
elif kill -0 -- "-$(cat "$base.pid")" 2>/dev/null; then
  echo "STATUS $WORKER running"
elif [ -f "$base.exit" ]; then
  echo "STATUS $WORKER exited $(cat "$base.exit")"
else
  echo "STATUS $WORKER lost"
fi
# The checkpoints this run's starts resumed from (the trainer logs "resumed from DIR step N").
if [ "$(cat "$LOG_DIR/current" 2>/dev/null || true)" = "$RUN" ] && [ -f "$base.log" ]; then
  sed -n 's/^.*resumed from \(.*[^ ]\) step \([0-9][0-9]*\)$/PROGRESS \2 \1/p' "$base.log"
fi
EOF
)
read_trainer_status() {
  local out rc=0 line running=0 ok=0 none=0 bad=0 usage=0
  TRAINER_DETAIL=""
  if [[ "$DRY_RUN" == 1 ]]; then
    on_all_workers "$body" RUN LOG_DIR
    TRAINER=${DRY_RUN_TRAINER:-running}
    return 0
  fi
  out=$(on_all_workers "$body" RUN LOG_DIR) || rc=$?
  while IFS= read -r line; do
    if [[ $line =~ ^PROGRESS\ ([0-9]+)\ (.+)$ ]]; then
      note_resumed_step "${BASH_REMATCH[2]}" "${BASH_REMATCH[1]}"
      continue
    fi
    [[ $line =~ ^STATUS\ ([^ ]+)\ (.*)$ ]] || continue
    TRAINER_DETAIL+="${TRAINER_DETAIL:+, }${BASH_REMATCH[1]}:${BASH_REMATCH[2]}"
    case "${BASH_REMATCH[2]}" in
      running) running=$((running + 1)) ;;
      "exited 0") ok=$((ok + 1)) ;;
      "exited 2") usage=$((usage + 1)) bad=$((bad + 1)) ;;
      none) none=$((none + 1)) ;;
      *) bad=$((bad + 1)) ;;
    esac
  done <<<"$out"
  if ((rc != 0 || running + ok + none + bad == 0)); then
    TRAINER=unknown
  elif ((usage > 0)); then
    TRAINER=usage_error
  elif ((bad == 0 && none == 0 && running > 0)); then
    TRAINER=running
  elif ((bad == 0 && none == 0)); then
    TRAINER=finished
  elif ((none > 0 && running + ok + bad == 0)); then
    TRAINER=none
  else
    TRAINER=failed
  fi
}

# $1: a checkpoint directory the trainer resumed from, $2: the step. A step above every one seen
# before for that directory means the runs since the last recovery made progress: the recovery
# count starts again, so that only recoveries in a row without progress count against MAX_RETRIES.
declare -A resumed_step=()
note_resumed_step() {
  if (($2 > ${resumed_step[$1]:--1})); then
    resumed_step[$1]=$2
    if ((recoveries > 0)); then
      log "run $RUN resumed from $1 step $2, a newer checkpoint than before: it makes progress;" \
        "recovery count reset (was $recoveries of at most $MAX_RETRIES)"
      recoveries=0
    fi
  fi
}

# In a dry run nothing changes in the cloud; this keeps the pretended state in step with what the
# printed commands would have done, for the scripts started after them.
dry_run_now() {
  if [[ "$DRY_RUN" == 1 ]]; then export DRY_RUN_STATE=$1; fi
}

attempted=0 # set once babysit has tried to start the run, or found it running
recoveries=0
failures_in_row=0
unknown_in_row=0 # a transient ssh failure must not restart a healthy run

# $1: what happened; $2: recreate (new TPU, then setup, sync, run) or relaunch (stop, run).
# Only the very first start is free; every later one counts against MAX_RETRIES.
recover() {
  local delay first=$((!attempted))
  if ((first)); then
    log "$1; bringing the run up"
  else
    recoveries=$((recoveries + 1))
    if ((recoveries > MAX_RETRIES)); then
      log "$1; giving up after $MAX_RETRIES recoveries (MAX_RETRIES)"
      exit 1
    fi
    delay=$((BACKOFF_BASE << (failures_in_row < 16 ? failures_in_row : 16)))
    ((delay <= BACKOFF_MAX)) || delay=$BACKOFF_MAX
    failures_in_row=$((failures_in_row + 1))
    log "$1; recovery $recoveries of at most $MAX_RETRIES ($2) in ${delay}s"
    pause "$delay"
  fi
  attempted=1
  if [[ $2 == recreate && -n "$QR_STATE" ]]; then
    "$TPU_SCRIPTS_DIR/delete.sh" -y || return 1
    dry_run_now ""
  fi
  # The first start also makes sure the TPU, its virtualenv and the code are there (no-ops or
  # cheap when they are).
  if [[ $2 == recreate ]] || ((first)); then
    "$TPU_SCRIPTS_DIR/create.sh" || return 1
    dry_run_now ACTIVE
    "$TPU_SCRIPTS_DIR/setup.sh" || return 1
    "$TPU_SCRIPTS_DIR/sync.sh" || return 1
  fi
  if [[ $2 == relaunch ]]; then
    "$TPU_SCRIPTS_DIR/stop.sh" -r "$RUN" || return 1
  fi
  "$TPU_SCRIPTS_DIR/run.sh" -n "$RUN" "${run_opts[@]}" "${CMD[@]}" || return 1
  log "run $RUN launched"
}

log "babysitting run $RUN on $TPU_NAME ($ACCELERATOR_TYPE, $ZONE): $(quote_words "${CMD[@]}")"
checks=0
while :; do
  checks=$((checks + 1))
  if ! read_qr_state; then
    log "could not read the queued resource's state; checking again in ${CHECK_SECONDS}s"
  else
    case "$QR_STATE" in
      ACTIVE)
        if ! read_node_state; then
          log "could not read the TPU VM's state; checking again in ${CHECK_SECONDS}s"
        elif [[ "$NODE_STATE" == READY ]]; then
          read_trainer_status
          [[ "$TRAINER" == unknown ]] || unknown_in_row=0
          case "$TRAINER" in
            running)
              ((attempted)) || log "run $RUN is already running on every worker"
              attempted=1
              failures_in_row=0
              ;;
            finished)
              log "run $RUN finished on every worker (exit status 0)"
              exit 0
              ;;
            none) recover "run $RUN is not running on the TPU" relaunch || log "recovery failed" ;;
            usage_error)
              # Status 2: a bad flag, config key, path or data file (cloud_jax's usage errors),
              # which every relaunch would meet again.
              log "run $RUN stopped with exit status 2 on some worker ($TRAINER_DETAIL): a usage" \
                "or config error that a relaunch would repeat; tpu_scripts/logs.sh shows it." \
                "Fix it, then start babysit.sh again"
              exit 2
              ;;
            failed)
              recover "run $RUN stopped on some worker ($TRAINER_DETAIL)" relaunch ||
                log "recovery failed"
              ;;
            unknown)
              unknown_in_row=$((unknown_in_row + 1))
              if ((unknown_in_row < 3)); then
                log "could not read the run's state on every worker" \
                  "(${TRAINER_DETAIL:-no answer}); checking again in ${CHECK_SECONDS}s"
              else
                recover "run's state unreadable $unknown_in_row checks in a row" relaunch ||
                  log "recovery failed"
              fi
              ;;
          esac
        elif [[ "$NODE_STATE" =~ ^(PREEMPTED|TERMINATED|STOPPED|STOPPING)$ ]]; then
          recover "TPU VM $TPU_NAME is $NODE_STATE" recreate || log "recovery failed"
        else
          log "TPU VM $TPU_NAME is ${NODE_STATE:-not visible}; waiting"
        fi
        ;;
      "" | FAILED | SUSPENDING | SUSPENDED)
        recover "queued resource $QUEUED_RESOURCE is ${QR_STATE:-absent}" recreate ||
          log "recovery failed"
        ;;
      *)
        log "queued resource $QUEUED_RESOURCE is $QR_STATE; waiting"
        ;;
    esac
  fi
  if ((MAX_ITERATIONS > 0 && checks >= MAX_ITERATIONS)); then
    log "stopping after $checks checks (MAX_ITERATIONS=$MAX_ITERATIONS); the run itself goes on"
    exit 0
  fi
  pause "$CHECK_SECONDS"
done
