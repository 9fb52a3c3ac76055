#!/usr/bin/env bash
# Usage: tpu_scripts/delete.sh [-y] [-h]
#
# Deletes the queued resource QUEUED_RESOURCE together with its TPU VM (or, if the TPU was made
# without a queued resource, the TPU VM TPU_NAME). Asks first unless -y; an answer other than y
# (or no answer, as when stdin is not a terminal) deletes nothing. Does nothing if neither exists.
# Everything on the workers' disks goes with them; checkpoints in BUCKET stay.
#   -y   do not ask
set -euo pipefail
TPU_OPTIONS=yh # getopts option string; env.sh answers -h/--help with it
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

assume_yes=0
while getopts "$TPU_OPTIONS" opt; do
  case $opt in
    y) assume_yes=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# == 0)) || die "unexpected argument '$1' (see -h)"
require_settings PROJECT ZONE TPU_NAME QUEUED_RESOURCE

confirm() {
  local answer=""
  ((assume_yes)) && return 0
  read -r -p "Delete $1? Its disks are lost; checkpoints in BUCKET stay. [y/N] " answer || true
  [[ "$answer" == y || "$answer" == Y || "$answer" == yes ]]
}

read_qr_state || die "could not read the state of queued resource $QUEUED_RESOURCE (see above)"
if [[ "$QR_STATE" == DELETING ]]; then
  log "queued resource $QUEUED_RESOURCE is already being deleted"
  exit 0
fi
if [[ -n "$QR_STATE" ]]; then
  confirm "queued resource $QUEUED_RESOURCE (state $QR_STATE) and TPU $TPU_NAME in $ZONE" ||
    die "not deleted"
  log "deleting queued resource $QUEUED_RESOURCE and its TPU"
  # --force: also delete the TPU VM the queued resource holds; --quiet: we asked already.
  run_gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${GCLOUD_LOCATION[@]}" \
    --force --quiet
  exit 0
fi

read_node_state || die "could not read the state of TPU $TPU_NAME (see above)"
if [[ -n "$NODE_STATE" ]]; then
  confirm "TPU $TPU_NAME (state $NODE_STATE) in $ZONE" || die "not deleted"
  log "deleting TPU $TPU_NAME"
  run_gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --quiet
  exit 0
fi
log "neither queued resource $QUEUED_RESOURCE nor TPU $TPU_NAME exists in $ZONE; nothing to delete"
