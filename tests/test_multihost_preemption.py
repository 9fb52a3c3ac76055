"""Preemption on the pod path: two processes joined by jax.distributed on 127.0.0.1 (one CPU
device each) run `python -m cloud_jax.train`. A SIGTERM to one host or to every host, in the step
loop or before it (here: while a checkpoint is read back), stops every host after the same step,
with one complete checkpoint of it, and each exits 75 (docs/RELIABILITY.md, item 2)."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from distributed_helpers import start_joined, wait_joined

from cloud_jax.data.synthetic.toy import write_toy_data
from cloud_jax.errors import PREEMPTED_EXIT_CODE
from cloud_jax.training.checkpointing import COMMIT_MARKER

ROOT = Path(__file__).resolve().parents[1]

# The trainer's command line as `python -m cloud_jax.train` runs it (through run_command), with
# two test hooks: SLOW_STEP=<seconds> pauses after each logged step so a signal lands mid-run;
# with RESTORE_MARKER set, a checkpoint restore touches RESTORE_MARKER<process id>, then waits
# until the file RESTORE_GO exists.
TRAINER = """
import os, sys, time
from cloud_jax.training import checkpointing, metrics

write = metrics.MetricsWriter.write

def slow_write(self, *args, **kwargs):
    write(self, *args, **kwargs)
    time.sleep(float(os.environ.get("SLOW_STEP", "0")))

restore = checkpointing.Checkpointer.restore

def pausing_restore(*args, **kwargs):
    if os.environ.get("RESTORE_MARKER"):
        open(os.environ["RESTORE_MARKER"] + os.environ["JAX_PROCESS_ID"], "w").close()
        deadline = time.time() + 300
        while not os.path.exists(os.environ["RESTORE_GO"]) and time.time() < deadline:
            time.sleep(0.05)
    return restore(*args, **kwargs)

metrics.MetricsWriter.write = slow_write
checkpointing.Checkpointer.restore = pausing_restore
from cloud_jax.cli.common import run_command
from cloud_jax.cli.train import main
sys.exit(run_command(main, sys.argv[1:]))
"""


@pytest.fixture
def launch(tmp_path):
    train, _ = write_toy_data(str(tmp_path / "data"), n_train=32, n_eval=8)
    out = tmp_path / "run"
    started = []

    def start(*extra, **env):
        cmd = [sys.executable, "-c", TRAINER, "--config",
               str(ROOT / "configs/tiny_cpu_cloud.yaml"), f"data.train_path={train}",
               "data.eval_path=\"\"", f"data.tfds_dir={tmp_path / 'tfds'}", f"output_dir={out}",
               "init_from=\"\"", "data.batch_pairs=4", "train.log_every=1",
               "train.eval_every=0", "train.export_final=false", "train.progress_bar=false",
               "train.tensorboard_dir=\"\"", *extra]
        procs = start_joined(cmd, 2, dict(
            os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
            JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env), cwd=ROOT)
        started.extend(procs)
        return procs

    yield out, start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.communicate()


def wait_for(predicate, procs, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        for i, p in enumerate(procs):
            assert p.poll() is None, f"process {i} exited {p.returncode}:\n" + \
                p.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def assert_preempted_at_one_step(procs, out) -> int:
    """Every process exited 75 after writing (and waiting for) the checkpoint of one step, the
    same on each; returns that step."""
    outs = wait_joined(procs, timeout=240)
    stopped = set()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == PREEMPTED_EXIT_CODE, f"process {i}:\n{err[-3000:]}"
        lines = [line for line in err.splitlines() if "preempted: checkpoint of step " in line]
        assert len(lines) == 1, f"process {i}:\n{err[-3000:]}"
        stopped.add(int(lines[0].split("preempted: checkpoint of step ")[1].split()[0]))
    assert len(stopped) == 1, stopped
    step = stopped.pop()
    assert os.path.exists(out / "checkpoints" / str(step) / COMMIT_MARKER)
    return step


@pytest.mark.slow
def test_sigterm_to_one_host_in_the_step_loop_stops_every_host_at_the_same_step(launch):
    """(about 60 s) Only process 1 (not the coordinator) gets the signal: process 0 stops after
    the same step, as the hosts of a pod must for the checkpoint save every one takes part in."""
    out, start = launch
    procs = start("train.total_steps=30", "train.checkpoint_every=0", SLOW_STEP="0.2")
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, procs)
    procs[1].send_signal(signal.SIGTERM)
    stopped = assert_preempted_at_one_step(procs, out)
    assert 2 <= stopped < 30
    assert sorted(os.listdir(out / "checkpoints")) == [str(stopped)]


@pytest.mark.slow
def test_sigterm_to_every_host_before_the_step_loop_stops_after_the_first_step(launch, tmp_path):
    """(about 90 s) The signal lands while both hosts read back the checkpoint of step 1: each
    keeps it (a host leaving alone would strand the other in a cross-host operation), and all
    stop after step 2, the first of the loop, with its checkpoint, rather than train on."""
    out, start = launch
    steps = ["train.total_steps=4", "train.checkpoint_every=1"]
    procs = start(*steps, "train.stop_at_step=1")
    for i, (p, (_, err)) in enumerate(zip(procs, wait_joined(procs, timeout=240))):
        assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
    marker, go = str(tmp_path / "restoring"), tmp_path / "go"
    procs = start(*steps, RESTORE_MARKER=marker, RESTORE_GO=str(go))
    wait_for(lambda: all(os.path.exists(f"{marker}{i}") for i in range(2)), procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    go.touch()
    assert assert_preempted_at_one_step(procs, out) == 2
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]
