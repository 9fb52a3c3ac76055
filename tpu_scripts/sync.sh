#!/usr/bin/env bash
# Usage: tpu_scripts/sync.sh [-l] [-h]
#
# Copies this checkout to REPO_DIR on every worker: the files `git ls-files` lists (tracked, plus
# untracked ones that .gitignore does not exclude), never .venv/ or runs/, packed into one tarball
# that `scp --worker=all` sends to all workers at once. Files that an earlier sync brought and that
# are gone from the checkout are removed on the workers; anything else there (checkpoints or logs
# the trainer wrote under REPO_DIR) is left alone.
#   -l   only list the files that would be copied, then exit (no gcloud)
# SRC_DIR (default: the repo holding tpu_scripts/) names the checkout to copy.
set -euo pipefail
TPU_OPTIONS=lh # getopts option string; env.sh answers -h/--help with it
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

list_only=0
while getopts "$TPU_OPTIONS" opt; do
  case $opt in
    l) list_only=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# == 0)) || die "unexpected argument '$1' (see -h)"

check_source_checkout

# NUL-separated paths relative to SRC_DIR. Explicit excludes, because a .gitignore can change: a
# local virtualenv or run outputs must never land on (and overwrite things on) the workers.
list_files() {
  local f
  git -C "$SRC_DIR" ls-files -z --cached --others --exclude-standard | sort -zu |
    while IFS= read -r -d '' f; do
      case "$f" in .venv/* | */.venv/* | runs/*) continue ;; esac
      # Deleted in the work tree but still in the index.
      [[ -e "$SRC_DIR/$f" || -L "$SRC_DIR/$f" ]] || continue
      printf '%s\0' "$f"
    done
}

if ((list_only)); then
  list_files | tr '\0' '\n'
  exit 0
fi
require_settings PROJECT ZONE TPU_NAME REPO_DIR

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
list_files >"$work/files"
count=$(tr -cd '\0' <"$work/files" | wc -c)
((count > 0)) || die "git ls-files lists no files in $SRC_DIR"
# COPYFILE_DISABLE keeps macOS tar from adding ._* resource-fork files.
COPYFILE_DISABLE=1 tar -czf "$work/code.tgz" -C "$SRC_DIR" --null -T "$work/files"
size=$(du -k "$work/code.tgz" | cut -f1)
log "copying $count files ($size KiB) to REPO_DIR=$REPO_DIR on every worker"

TARBALL=.cloud_jax_sync.tgz
body=$(
  cat <<'EOF'
export LC_ALL=C
mkdir -p "$REPO_DIR"
tarball="$HOME/$TARBALL"
cd "$REPO_DIR"
new=$(mktemp)
tar -tzf "$tarball" | sort >"$new"
if [ -f .tpu_sync_files ]; then
  comm -23 .tpu_sync_files "$new" | while IFS= read -r f; do
    if [ ! -d "$f" ]; then rm -f -- "$f"; fi
  done
fi
tar -xzf "$tarball"
mv "$new" .tpu_sync_files
# The tarball stays until every worker has unpacked it: a retry of this step on every worker,
# after one of them failed, must find it on those that had already unpacked it.
echo "worker $WORKER: $(wc -l <.tpu_sync_files) files in $REPO_DIR"
EOF
)

with_retries run_gcloud compute tpus tpu-vm scp "$work/code.tgz" "$TPU_NAME:$TARBALL" \
  "${GCLOUD_LOCATION[@]}" --worker=all --quiet
with_retries on_all_workers "$body" REPO_DIR TARBALL
# shellcheck disable=SC2016  # expanded on the workers
on_all_workers 'rm -f "$HOME/$TARBALL"' TARBALL >/dev/null ||
  log "warning: could not remove ~/$TARBALL on every worker (the next sync overwrites it)"
log "done"
