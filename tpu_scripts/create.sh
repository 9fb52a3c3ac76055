#!/usr/bin/env bash
# Usage: tpu_scripts/create.sh [-h]
#
# Requests the TPU slice as a queued resource (ACCELERATOR_TYPE in ZONE, CAPACITY spot, reserved or
# on-demand) and waits until it is ACTIVE, printing its state every POLL_SECONDS, for at most
# CREATE_TIMEOUT seconds. Does nothing if the queued resource is already ACTIVE, and only waits if
# it is already queued; one still being deleted is waited out first, then requested anew. Settings come from tpu_scripts/env.sh (see there).
set -euo pipefail
TPU_OPTIONS=h # getopts option string; env.sh answers -h/--help with it
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

while getopts "$TPU_OPTIONS" opt; do
  case $opt in
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# == 0)) || die "unexpected argument '$1' (see -h)"
require_settings PROJECT ZONE TPU_NAME QUEUED_RESOURCE ACCELERATOR_TYPE RUNTIME_VERSION

read_qr_state || die "could not read the state of queued resource $QUEUED_RESOURCE (see above)"
# A queued resource still being deleted (delete.sh a moment ago, or a recreate) is waited out, then
# requested anew under the same name.
if [[ "$QR_STATE" == DELETING && "$DRY_RUN" == 1 ]]; then
  log "DRY_RUN: would wait for queued resource $QUEUED_RESOURCE to be deleted, then request it"
  QR_STATE=""
fi
start=$SECONDS
while [[ "$QR_STATE" == DELETING ]]; do
  elapsed=$((SECONDS - start))
  ((elapsed < CREATE_TIMEOUT)) || die "queued resource $QUEUED_RESOURCE still DELETING after" \
    "${elapsed}s; run create.sh again once it is gone"
  log "queued resource $QUEUED_RESOURCE is being deleted; waiting for it to go (${elapsed}s)"
  sleep "$POLL_SECONDS"
  read_qr_state || die "could not read the state of queued resource $QUEUED_RESOURCE (see above)"
done
case "$QR_STATE" in
  ACTIVE)
    log "queued resource $QUEUED_RESOURCE is already ACTIVE; nothing to do"
    exit 0
    ;;
  "")
    create=(compute tpus queued-resources create "$QUEUED_RESOURCE" "${GCLOUD_LOCATION[@]}"
      --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE"
      --runtime-version="$RUNTIME_VERSION"
      --scopes=https://www.googleapis.com/auth/cloud-platform --quiet)
    case "$CAPACITY" in
      spot) create+=(--spot) ;;
      reserved) create+=(--reserved) ;;
    esac
    [[ -z "$SERVICE_ACCOUNT" ]] || create+=(--service-account="$SERVICE_ACCOUNT")
    if [[ -n "$CREATE_FLAGS" ]]; then
      read -r -a extra <<<"$CREATE_FLAGS"
      create+=("${extra[@]}")
    fi
    log "requesting $ACCELERATOR_TYPE ($CAPACITY) in $ZONE as queued resource $QUEUED_RESOURCE"
    run_gcloud "${create[@]}"
    ;;
  CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING)
    log "queued resource $QUEUED_RESOURCE already requested (state $QR_STATE); waiting for it"
    ;;
  *)
    die "queued resource $QUEUED_RESOURCE is in state $QR_STATE and will not become ACTIVE:" \
      "delete it with tpu_scripts/delete.sh, then run create.sh again"
    ;;
esac

if [[ "$DRY_RUN" == 1 ]]; then
  log "DRY_RUN: would poll every ${POLL_SECONDS}s, for at most ${CREATE_TIMEOUT}s, until ACTIVE"
  exit 0
fi

start=$SECONDS
while :; do
  elapsed=$((SECONDS - start))
  if read_qr_state; then
    case "$QR_STATE" in
      ACTIVE)
        log "queued resource $QUEUED_RESOURCE is ACTIVE after ${elapsed}s"
        exit 0
        ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "queued resource $QUEUED_RESOURCE went to state $QR_STATE after ${elapsed}s; see" \
          "gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --zone=$ZONE" \
          "--project=$PROJECT, then delete.sh and create.sh"
        ;;
    esac
    log "state ${QR_STATE:-not visible yet} after ${elapsed}s (waiting up to ${CREATE_TIMEOUT}s)"
  fi
  if ((elapsed >= CREATE_TIMEOUT)); then
    die "queued resource $QUEUED_RESOURCE not ACTIVE after ${CREATE_TIMEOUT}s (state" \
      "${QR_STATE:-unknown}); the request stays queued: run create.sh again to keep waiting," \
      "or delete.sh to withdraw it"
  fi
  sleep "$POLL_SECONDS"
done
