#!/usr/bin/env bash
# Usage: tpu_scripts/setup.sh [-h]
#
# Builds the same virtualenv on every worker at once (--worker=all): Python PYTHON_VERSION via uv,
# then "jax[tpu]==JAX_VERSION" and the pinned requirements.txt of this checkout. A stamp in the
# virtualenv records what it was built from, so a re-run with the same requirements, Python and
# JAX_VERSION does nothing, and any change rebuilds it from scratch. The virtualenv lives at
# VENV_DIR, outside REPO_DIR, so sync.sh never touches it.
#
# Runs read and write gs:// paths natively, so nothing is mounted by default. With BUCKET and
# BUCKET_MOUNT set, it first mounts the bucket with gcsfuse at BUCKET_MOUNT on every worker
# (installing gcsfuse from Google's apt repository if missing), every time it runs: a recreated
# worker starts unmounted, and babysit.sh runs setup.sh before relaunching.
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
require_settings PROJECT ZONE TPU_NAME VENV_DIR PYTHON_VERSION JAX_VERSION UV_VERSION

check_jax_pin
# Sent inline with the command, so the stamp hashes exactly this checkout's pins.
# shellcheck disable=SC2034  # read on the workers, through remote_command
REQUIREMENTS=$(<"$REQUIREMENTS_FILE")

body=$(
  cat <<'EOF'
if [ -n "$BUCKET" ] && [ -n "$BUCKET_MOUNT" ]; then
  if ! command -v gcsfuse >/dev/null 2>&1; then
    echo "worker $WORKER: installing gcsfuse"
    repo="gcsfuse-$(lsb_release -c -s)"
    key=/usr/share/keyrings/cloud.google.asc
    curl -sfL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$key" >/dev/null
    echo "deb [signed-by=$key] https://packages.cloud.google.com/apt $repo main" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse
  fi
  if mountpoint -q "$BUCKET_MOUNT"; then
    echo "worker $WORKER: $BUCKET is mounted at $BUCKET_MOUNT"
  else
    sudo mkdir -p "$BUCKET_MOUNT"
    sudo chown "$(id -u):$(id -g)" "$BUCKET_MOUNT"
    # gs://name/some/prefix: the bucket "name", showing only some/prefix.
    path=${BUCKET#gs://}
    name=${path%%/*}
    only=${path#"$name"}
    only=${only#/}
    only=${only%/}
    # Directories another worker or tool created are visible (--implicit-dirs), and directory
    # renames (how a checkpoint is committed) are allowed for large directories.
    set -- --implicit-dirs --rename-dir-limit=1000000
    if [ -n "$only" ]; then set -- "$@" --only-dir "$only"; fi
    gcsfuse "$@" "$name" "$BUCKET_MOUNT"
    echo "worker $WORKER: mounted $BUCKET at $BUCKET_MOUNT"
  fi
fi
req=$(mktemp)
printf "%s\n" "$REQUIREMENTS" >"$req"
hash=$(sha256sum "$req" | cut -d" " -f1)
want="python=$PYTHON_VERSION jax[tpu]==$JAX_VERSION uv=$UV_VERSION requirements=$hash"
stamp="$VENV_DIR/.cloud_jax_setup"
if [ -x "$VENV_DIR/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "worker $WORKER: $VENV_DIR is up to date"
  rm -f "$req"
  exit 0
fi
echo "worker $WORKER: building $VENV_DIR ($want)"
uv="$HOME/.local/bin/uv"
case "$("$uv" --version 2>/dev/null || true)" in
  "uv $UV_VERSION" | "uv $UV_VERSION "*) ;;
  *)
    if ! python3 -m pip --version >/dev/null 2>&1; then
      sudo apt-get update -qq
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
    fi
    # Newer images mark the system Python as externally managed (PEP 668); a --user install of
    # this one tool is harmless there, and older pip ignores the variable.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user "uv==$UV_VERSION"
    ;;
esac
rm -rf "$VENV_DIR"
mkdir -p "$(dirname "$VENV_DIR")"
"$uv" venv --quiet --python "$PYTHON_VERSION" "$VENV_DIR"
"$uv" pip install --quiet --python "$VENV_DIR/bin/python" -r "$req" "jax[tpu]==$JAX_VERSION"
got=$("$VENV_DIR/bin/python" -c "import jax; print(jax.__version__)")
if [ "$got" != "$JAX_VERSION" ]; then
  echo "worker $WORKER: installed jax $got, expected $JAX_VERSION" >&2
  exit 1
fi
printf "%s\n" "$want" >"$stamp"
rm -f "$req"
echo "worker $WORKER: $VENV_DIR ready (jax $got)"
EOF
)

log "setting up $VENV_DIR on every worker of $TPU_NAME"
with_retries on_all_workers "$body" VENV_DIR PYTHON_VERSION JAX_VERSION UV_VERSION \
  REQUIREMENTS BUCKET BUCKET_MOUNT
log "done"
