# shellcheck shell=bash disable=SC2034
# (SC2034: QR_STATE, NODE_STATE, ... are outputs, read by the scripts that source this file.)
# Settings and helpers shared by every script in tpu_scripts/. Sourced, never run.
#
# Each setting below is a default. Precedence, highest first:
#   1. the environment:        ZONE=us-central1-a tpu_scripts/create.sh
#   2. a file named by TPU_ENV: TPU_ENV=~/cloud-8b.env tpu_scripts/create.sh
#      (plain `NAME=value` lines, or a copy of this whole file with its values edited)
#   3. the values in this file.
#
# DRY_RUN=1 makes every script print the gcloud commands it would run ("DRY_RUN: gcloud ...", one
# per line, shell-quoted) instead of running them. Read-only queries are printed too; they then
# answer as if the queued resource were in state DRY_RUN_STATE (empty: it does not exist) and,
# for babysit.sh, as if the trainer were DRY_RUN_TRAINER (running, the default | finished | failed |
# none | usage_error | unknown).

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "tpu_scripts need bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 1
fi

# Prints the usage block: the script's leading comment lines after the shebang, without '# '.
usage() {
  sed -n '2,/^[^#]/{/^#/!d; s/^# \{0,1\}//; p;}' "$0"
}

# True when the script's options (the words before its first other argument, read as getopts
# reads them with the option string $1) ask for help: -h, also inside a group (-yh), or --help.
help_requested() {
  local spec=$1 word i c
  shift
  while (($#)); do
    word=$1
    shift
    case $word in
      --help) return 0 ;;
      -- | --* | - | [!-]*) return 1 ;;
    esac
    for ((i = 1; i < ${#word}; i++)); do
      c=${word:i:1}
      [[ $c == h ]] && return 0
      if [[ $c != : && $spec == *"$c:"* ]]; then
        # The option's value is the rest of the word, or else the next word.
        if ((i + 1 == ${#word} && $# > 0)); then shift; fi
        break
      fi
    done
  done
  return 1
}

# -h/--help prints the usage and exits 0 before any setting is read or checked, so that it works
# whatever the environment or TPU_ENV hold. "$@" are the sourcing script's arguments.
if help_requested "${TPU_OPTIONS:-h}" "$@"; then
  usage
  exit 0
fi

TPU_SETTINGS=(
  PROJECT ZONE TPU_NAME QUEUED_RESOURCE ACCELERATOR_TYPE RUNTIME_VERSION CAPACITY SERVICE_ACCOUNT
  CREATE_FLAGS BUCKET BUCKET_MOUNT REPO_DIR VENV_DIR LOG_DIR PYTHON_VERSION JAX_VERSION UV_VERSION
  CREATE_TIMEOUT POLL_SECONDS STOP_TIMEOUT SSH_RETRIES CHECK_SECONDS MAX_RETRIES BACKOFF_BASE
  BACKOFF_MAX MAX_ITERATIONS
)

# The user file is read first and the environment re-applied over it, so an exported value always
# wins even over a plain assignment in the file: the settings, the DRY_RUN switches (a rehearsal
# asked for on the command line stays one) and sync.sh's SRC_DIR. The guard stops a full copy of
# this file, which contains this very block, from reading itself again.
if [[ -n "${TPU_ENV:-}" && -z "${_TPU_ENV_LOADING:-}" ]]; then
  if [[ ! -f "$TPU_ENV" ]]; then
    echo "TPU_ENV=$TPU_ENV: no such file (unset TPU_ENV to use tpu_scripts/env.sh alone)" >&2
    exit 1
  fi
  _TPU_ENV_WINS=("${TPU_SETTINGS[@]}" DRY_RUN DRY_RUN_STATE DRY_RUN_TRAINER SRC_DIR)
  for _name in "${_TPU_ENV_WINS[@]}"; do
    if [[ -n "${!_name+set}" ]]; then printf -v "_TPU_FROM_ENV_$_name" '%s' "${!_name}"; fi
  done
  _TPU_ENV_LOADING=1
  # shellcheck source=/dev/null
  source "$TPU_ENV"
  unset _TPU_ENV_LOADING
  for _name in "${_TPU_ENV_WINS[@]}"; do
    _saved="_TPU_FROM_ENV_$_name"
    if [[ -n "${!_saved+set}" ]]; then printf -v "$_name" '%s' "${!_saved}"; fi
  done
  unset _name _saved _TPU_ENV_WINS
fi

# ---- settings ------------------------------------------------------------------------------------
# Google Cloud project id (required).
: "${PROJECT:=}"
# Zone holding the TPU; v5p slices are offered in us-east5-a and us-central1-a, among others.
: "${ZONE:=us-east5-a}"
# TPU VM (node) name; the queued resource that requests it gets the same name unless overridden.
: "${TPU_NAME:=cloud-jax}"
: "${QUEUED_RESOURCE:=$TPU_NAME}"
# Slice type and its matching TPU software version (v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite,
# v6e: v2-alpha-tpuv6e, v4: tpu-ubuntu2204-base).
: "${ACCELERATOR_TYPE:=v5p-64}"
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"
# spot (cheap, preemptible), reserved (your reservation) or on-demand.
: "${CAPACITY:=spot}"
# Service account of the TPU VMs (empty: the project's default compute service account). It needs
# write access to BUCKET.
: "${SERVICE_ACCOUNT:=}"
# Extra flags for `queued-resources create`, split on spaces
# (e.g. "--network=my-net --internal-ips").
: "${CREATE_FLAGS:=}"
# gs:// location for checkpoints and outputs; exported to the trainer's environment as BUCKET.
# Runs read and write gs:// paths natively (output_dir=$BUCKET/run, which your shell expands
# when you type the command - nothing on the workers expands a quoted '$BUCKET'; orbax commits
# checkpoints in the bucket itself), so nothing is mounted by default. BUCKET_MOUNT, when set (e.g. /mnt/bucket),
# makes setup.sh mount BUCKET there with gcsfuse on every worker, for runs that give local paths.
: "${BUCKET:=}"
: "${BUCKET_MOUNT:=}"
# On the workers, relative to the home directory (or absolute): the synced code, the virtualenv
# (kept outside the code so sync.sh never touches it) and the per-run logs.
: "${REPO_DIR:=cloud_jax}"
: "${VENV_DIR:=venvs/cloud_jax}"
: "${LOG_DIR:=logs}"
# The TPU VM images ship Python 3.10; jax 0.10 needs a newer one, which uv installs.
: "${PYTHON_VERSION:=3.11}"
# The project's jax pin (requirements.txt must agree; setup.sh checks).
: "${JAX_VERSION:=0.10.2}"
: "${UV_VERSION:=0.13.9}"
# Seconds: how long create.sh waits for ACTIVE, how often it polls (at least 10), how long
# stop.sh lets the trainer save before SIGKILL. SSH_RETRIES: attempts for the idempotent remote
# steps.
: "${CREATE_TIMEOUT:=7200}"
: "${POLL_SECONDS:=30}"
: "${STOP_TIMEOUT:=300}"
: "${SSH_RETRIES:=3}"
# babysit.sh: seconds between health checks (at least 60); recoveries allowed in a row without
# progress (a relaunch resuming from a newer checkpoint than before starts the count again); first
# and largest wait before a recovery (doubling in between, reset once the run is seen healthy);
# checks before it exits (0: no limit).
: "${CHECK_SECONDS:=300}"
: "${MAX_RETRIES:=20}"
: "${BACKOFF_BASE:=60}"
: "${BACKOFF_MAX:=1800}"
: "${MAX_ITERATIONS:=0}"
: "${DRY_RUN:=0}"
: "${DRY_RUN_STATE:=}"
# ---- end of settings -----------------------------------------------------------------------------

TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_NAME=$(basename "$0")

log() { printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SCRIPT_NAME" "$*" >&2; }

# Exit statuses of every script: 0 done (or -h); 2 the command line could not be parsed (getopts:
# an unknown option, an option without its value; the usage goes to stderr); 1 anything else that
# stops it, a missing or invalid setting first of all (docs/TPU_SCRIPTS.md, "Exit status").
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

# POSIX single-quoting, so a word survives one round of shell parsing on this machine or a worker.
shquote() {
  local s=$1 sq="'" esc="'\\''"
  if [[ -n $s && $s != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//"$sq"/"$esc"}"
  fi
}

# The arguments as one shell-quoted command line.
quote_words() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(shquote "$w")"; done
  printf '%s' "$out"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Fails with the names of the settings that are empty, and how to set them.
require_settings() {
  local name missing=()
  for name in "$@"; do [[ -n "${!name}" ]] || missing+=("$name"); done
  if ((${#missing[@]})); then
    die "${missing[*]} not set: export ${missing[0]}=..., or put it in a file named by TPU_ENV," \
      "or edit $TPU_SCRIPTS_DIR/env.sh"
  fi
}

validate_settings() {
  case "$CAPACITY" in spot | reserved | on-demand) ;; *)
    die "CAPACITY=$CAPACITY: expected spot, reserved or on-demand" ;;
  esac
  case "$DRY_RUN" in 0 | 1) ;; *) die "DRY_RUN=$DRY_RUN: expected 0 or 1" ;; esac
  if [[ -n "$BUCKET" && "$BUCKET" != gs://?* ]]; then
    die "BUCKET=$BUCKET: expected a gs:// location, e.g. gs://my-bucket/cloud_jax"
  fi
  if [[ -n "$BUCKET_MOUNT" && "$BUCKET_MOUNT" != /?* ]]; then
    die "BUCKET_MOUNT=$BUCKET_MOUNT: expected an absolute path on the workers, e.g. /mnt/bucket"
  fi
  local name min_poll=10 min_check=60
  for name in CREATE_TIMEOUT POLL_SECONDS STOP_TIMEOUT SSH_RETRIES CHECK_SECONDS MAX_RETRIES \
    BACKOFF_BASE BACKOFF_MAX MAX_ITERATIONS; do
    is_uint "${!name}" || die "$name=${!name}: expected a whole number of seconds/attempts"
  done
  ((SSH_RETRIES >= 1)) || die "SSH_RETRIES=$SSH_RETRIES: expected at least 1"
  # Each poll and each check is a round of gcloud calls (a check also ssh-es into every worker):
  # with no pause between them a script would hammer the TPU API for hours.
  ((10#$POLL_SECONDS >= min_poll)) || die "POLL_SECONDS=$POLL_SECONDS: expected at least" \
    "$min_poll (seconds between two reads of the queued resource's state; default 30)"
  ((10#$CHECK_SECONDS >= min_check)) || die "CHECK_SECONDS=$CHECK_SECONDS: expected at" \
    "least $min_check (seconds between two of babysit.sh's health checks; default 300)"
}
validate_settings

GCLOUD_LOCATION=(--project="$PROJECT" --zone="$ZONE")

# Runs gcloud, or with DRY_RUN=1 prints the command instead.
run_gcloud() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf 'DRY_RUN: %s\n' "$(quote_words gcloud "$@")"
    return 0
  fi
  gcloud "$@"
}

# Sleeps, or with DRY_RUN=1 only says so.
pause() {
  if [[ "$DRY_RUN" == 1 ]]; then
    log "DRY_RUN: would sleep ${1}s"
  else
    sleep "$1"
  fi
}

# Runs a read-only gcloud query and stores its stdout in QUERY_OUT. Returns 0 on success, 3 when the
# resource does not exist, 1 on any other failure (message on stderr).
_query() {
  local err rc=0
  if [[ "$DRY_RUN" == 1 ]]; then
    printf 'DRY_RUN: %s\n' "$(quote_words gcloud "$@")"
    return 0
  fi
  err=$(mktemp)
  QUERY_OUT=$(gcloud "$@" 2>"$err") || rc=$?
  if ((rc)); then
    if grep -qiE 'not[_ ]found|HTTPError 404' "$err"; then
      rm -f "$err"
      return 3
    fi
    log "query failed: gcloud $*: $(tr '\n' ' ' <"$err")"
    rm -f "$err"
    return 1
  fi
  rm -f "$err"
}

# Sets QR_STATE to the queued resource's state (ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING,
# ACTIVE, FAILED, SUSPENDING, SUSPENDED, DELETING, ...) or to "" when it does not exist.
read_qr_state() {
  local rc=0
  QUERY_OUT=$DRY_RUN_STATE
  if [[ "$DRY_RUN" == 1 ]]; then
    log "DRY_RUN: answering as if queued resource $QUEUED_RESOURCE were" \
      "${DRY_RUN_STATE:-absent} (DRY_RUN_STATE=ACTIVE, SUSPENDED, ... rehearses other states)"
  fi
  _query compute tpus queued-resources describe "$QUEUED_RESOURCE" "${GCLOUD_LOCATION[@]}" \
    --format='value(state.state)' || rc=$?
  case $rc in
    0) QR_STATE=$QUERY_OUT ;;
    3) QR_STATE="" ;;
    *) return 1 ;;
  esac
}

# Sets NODE_STATE to the TPU VM's state (READY, CREATING, PREEMPTED, TERMINATED, ...) or "".
read_node_state() {
  local rc=0
  QUERY_OUT=""
  [[ "$DRY_RUN_STATE" == ACTIVE ]] && QUERY_OUT=READY
  _query compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_LOCATION[@]}" \
    --format='value(state)' || rc=$?
  case $rc in
    0) NODE_STATE=$QUERY_OUT ;;
    3) NODE_STATE="" ;;
    *) return 1 ;;
  esac
}

# Shell code every remote script starts with: strict mode, the home directory as working directory
# (so relative REPO_DIR/VENV_DIR/LOG_DIR mean the same on every worker) and the worker's index,
# read from the metadata server like jax.distributed does, else from the hostname (...-w-N).
# shellcheck disable=SC2016
REMOTE_PRELUDE='set -euo pipefail
cd "$HOME"
worker_id() {
  local id url=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  id=$(curl -sf -m 5 -H "Metadata-Flavor: Google" "$url/agent-worker-number") || id=""
  if [ -z "$id" ]; then id=$(hostname); id=${id##*-w-}; fi
  printf "%s" "$id"
}
WORKER=$(worker_id)
'

# The --command string that runs a remote script under bash on a worker: the prelude, then
# `NAME='value'` lines for the named local variables, then the body ($1).
remote_command() {
  local body=$1 script=$REMOTE_PRELUDE name
  shift
  for name in "$@"; do script+="$name=$(shquote "${!name}")"$'\n'; done
  printf 'bash -c %s' "$(shquote "$script$body")"
}

# Runs a remote script (body, then the names of the variables it reads) on every worker at once.
# Multi-host JAX needs all workers to run the same program together, so nothing in these scripts
# starts work on one worker only.
on_all_workers() {
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --worker=all --quiet \
    --command="$(remote_command "$@")"
}

# Runs "$@" up to SSH_RETRIES times, 10 s apart (a fresh TPU VM can refuse ssh for a short while).
with_retries() {
  local attempt=1
  until "$@"; do
    if ((attempt >= SSH_RETRIES)); then
      log "gave up after $attempt attempts: $1"
      return 1
    fi
    log "attempt $attempt of $SSH_RETRIES failed; retrying in 10s"
    attempt=$((attempt + 1))
    pause 10
  done
}

valid_run_name() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; }

# The checkout sync.sh copies and whose requirements.txt setup.sh installs (SRC_DIR; default: the
# repository holding tpu_scripts/).
SRC_DIR=${SRC_DIR:-$(dirname "$TPU_SCRIPTS_DIR")}

# Sets REQUIREMENTS_FILE to SRC_DIR's requirements.txt, or dies where it is missing or pins a jax
# other than JAX_VERSION (setup.sh; babysit.sh before it requests a slice).
check_jax_pin() {
  local pinned
  REQUIREMENTS_FILE="$SRC_DIR/requirements.txt"
  [[ -f "$REQUIREMENTS_FILE" ]] ||
    die "$REQUIREMENTS_FILE not found (SRC_DIR must be the repo root)"
  pinned=$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "$REQUIREMENTS_FILE")
  if [[ -n "$pinned" && "$pinned" != "$JAX_VERSION" ]]; then
    die "JAX_VERSION=$JAX_VERSION but $REQUIREMENTS_FILE pins jax==$pinned; make them agree"
  fi
}

# Dies unless SRC_DIR is a git checkout (sync.sh; babysit.sh before it requests a slice).
check_source_checkout() {
  git -C "$SRC_DIR" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "SRC_DIR=$SRC_DIR is not a git checkout; sync.sh copies what git ls-files lists"
}

# The NAME=VALUE of a -e option (run.sh, babysit.sh) into ENV_NAME and ENV_VALUE, or dies.
parse_env_option() {
  [[ $1 =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] ||
    die "-e $1: expected NAME=VALUE with NAME a shell variable name"
  ENV_NAME=${BASH_REMATCH[1]}
  ENV_VALUE=${BASH_REMATCH[2]}
}

# Warns when a word of a run's command or of its -e values holds a literal $BUCKET (or ${BUCKET}),
# quoted on this machine: nothing on the workers expands it, so the trainer would write under a
# directory named $BUCKET on the worker's own disk, which a recreated TPU does not have.
warn_literal_bucket() {
  local word
  for word in "$@"; do
    # shellcheck disable=SC2016  # the literal text is what is looked for
    if [[ $word == *'$BUCKET'* || $word == *'${BUCKET}'* ]]; then
      log "warning: the command holds a literal \$BUCKET, which nothing expands on the workers;" \
        "let your shell expand it (no quotes around it) or write the gs:// path"
      return 0
    fi
  done
}
