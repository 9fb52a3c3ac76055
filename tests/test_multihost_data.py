"""Data preparation on the pod path: two processes joined by jax.distributed on 127.0.0.1 (one CPU
device each) run `python -m cloud_jax.train` with one shared data.tfds_dir. Process 0 builds the
tokenized dataset; the other waits on the coordination service (not a device collective), then
reads that copy. A build that fails on process 0 stops the other with process 0's error. The
decisions of cloud_jax.sharding.first_on_process_0 are pinned one process at a time against a
stand-in for the key-value store (fast)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_helpers import start_joined

from cloud_jax import sharding
from cloud_jax.data.synthetic.toy import write_toy_data
from cloud_jax.errors import ConfigError, Preempted
from cloud_jax.cli.common import USER_ERROR_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]

# The trainer's command line as `python -m cloud_jax.train` runs it, with test hooks:
# SLOW_BUILD=<seconds> makes process 0's dataset preparation take that much longer;
# STOP_AFTER_DATA=1 ends each process once it has the dataset, with a line naming what it read.
TRAINER = """
import os, sys, time
from cloud_jax.training import loop

prepare, open_split = loop.prepare_dataset, loop.open_split

def slow_prepare(*args, **kwargs):
    if os.environ.get("JAX_PROCESS_ID") == "0":
        time.sleep(float(os.environ.get("SLOW_BUILD", "0")))
    return prepare(*args, **kwargs)

def stopping_open_split(dataset, split):
    source = open_split(dataset, split)
    if os.environ.get("STOP_AFTER_DATA"):
        print(f"read {dataset.config_name} {split}: {len(source)} records", file=sys.stderr)
        sys.exit(0)
    return source

loop.prepare_dataset, loop.open_split = slow_prepare, stopping_open_split
from cloud_jax.cli.common import run_command
from cloud_jax.cli.train import main
sys.exit(run_command(main, sys.argv[1:]))
"""

# What TFDS logs when it builds a dataset (absl INFO), not when it reads one.
BUILDING = "Generating dataset cloud_pairs"


def _run(tmp_path, *extra, **env):
    train, _ = write_toy_data(str(tmp_path / "data"), n_train=16, n_eval=4)
    cmd = [sys.executable, "-c", TRAINER, "--config", str(ROOT / "configs/tiny_cpu_cloud.yaml"),
           f"data.train_path={train}", "data.eval_path=\"\"", f"data.tfds_dir={tmp_path / 'tfds'}",
           f"output_dir={tmp_path / 'run'}", "init_from=\"\"", "data.batch_pairs=4",
           "train.total_steps=1", "train.log_every=1", "train.eval_every=0",
           "train.export_final=false", "train.progress_bar=false", "train.tensorboard_dir=\"\"",
           *extra]
    procs = start_joined(cmd, 2, dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env), cwd=ROOT)
    deadline, errs = time.time() + 240, []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=max(deadline - time.time(), 1))[1])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        # What each process had written says where it waited.
        errs += [p.communicate()[1] for p in procs[len(errs):]]
        pytest.fail("timed out after 240 s:\n" + "\n".join(
            f"process {i}:\n{err[-2500:]}" for i, err in enumerate(errs)))
    return [(p.returncode, err) for p, err in zip(procs, errs)]


@pytest.mark.slow
def test_other_host_waits_for_a_long_build_on_process_0_and_reads_its_copy(tmp_path):
    """(about 50 s) Process 0 builds for longer than the 30 s a CPU device collective waits for
    its peers (the barrier this once was): process 1 waits, builds nothing, and reads the same
    records."""
    results = _run(tmp_path, SLOW_BUILD="33", STOP_AFTER_DATA="1")
    for i, (code, err) in enumerate(results):
        assert code == 0, f"process {i}:\n{err[-3000:]}"
    read = [[line for line in err.splitlines() if line.startswith("read ")] for _, err in results]
    assert read[0] == read[1] and len(read[0]) == 1, read
    assert read[0][0].endswith("train: 16 records"), read
    assert BUILDING in results[0][1]
    assert BUILDING not in results[1][1], results[1][1][-3000:]
    # One dataset, and beside it the lock its builds take (cloud_pairs/<dataset>.lock).
    datasets = sorted(os.listdir(tmp_path / "tfds" / "cloud_pairs"))
    assert len(datasets) == 2 and datasets[1] == datasets[0] + ".lock", datasets
    # One complete version directory: no incomplete or second copy beside it.
    assert os.listdir(tmp_path / "tfds" / "cloud_pairs" / datasets[0]) == ["1.6.0"]


@pytest.mark.slow
def test_a_build_that_fails_on_process_0_stops_the_other_host_with_its_error(tmp_path):
    """(about 20 s) Every pair is longer than data.max_length: process 0's build fails with a
    config error, and process 1, which waited for it, exits at once with the same error and
    status instead of waiting in a barrier process 0 never reaches."""
    results = _run(tmp_path, "data.max_length=20", "data.length_buckets=[20]")
    for i, (code, err) in enumerate(results):
        assert code == USER_ERROR_EXIT_CODE, f"process {i}:\n{err[-3000:]}"
    errors = [[line for line in err.splitlines() if line.startswith("error: ")]
              for _, err in results]
    assert len(errors[0]) == 1 and "has no usable pair" in errors[0][0], errors
    assert len(errors[1]) == 1, results[1][1][-3000:]
    assert errors[1][0].startswith("error: process 0 could not prepare the tokenized dataset"), \
        errors[1]
    assert "has no usable pair" in errors[1][0]
    assert BUILDING not in results[1][1]


# --- first_on_process_0, one process at a time against a stand-in for the key-value store ------

class _Store:
    """What first_on_process_0 uses of jax.distributed's client."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, key, value):
        assert key not in self.values, f"{key} set twice"
        self.values[key] = value

    def key_value_dir_get(self, directory):
        return [(k, v) for k, v in self.values.items() if k.startswith(directory + "/")]


class _Lost:
    def key_value_dir_get(self, directory):
        raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")


@pytest.fixture
def as_process(monkeypatch):
    """Calls first_on_process_0 as process ``index`` of 2, each process with its own count of
    calls (as separate processes have)."""
    counts = {}

    def call(index, work, store, **kwargs):
        monkeypatch.setattr(sharding, "_FIRST_ON_PROCESS_0_CALLS", counts.setdefault(index, {}))
        return sharding.first_on_process_0(work, "test", "make the thing", client=store,
                                           process_index=index, process_count=2, **kwargs)

    return call


def test_one_process_runs_the_work_and_asks_no_store():
    assert sharding.first_on_process_0(lambda: 7, "test", "make it", client=_Lost(),
                                       process_index=0, process_count=1) == 7


def test_the_others_run_the_work_after_process_0_did(as_process):
    store, ran = _Store(), []
    assert as_process(0, lambda: ran.append(0) or "made", store) == "made"
    # Process 1's next call waits for process 0's next call, not for the first one.
    assert as_process(1, lambda: ran.append(1) or "read", store) == "read"
    assert ran == [0, 1]
    assert as_process(0, lambda: "again", store) == "again"
    assert sorted(store.values) == ["cloud_jax/test/0/outcome", "cloud_jax/test/1/outcome"]


@pytest.mark.parametrize("error, raised, said", [
    (ConfigError("split 'train' has no usable pair"), ConfigError,
     "ConfigError: split 'train' has no usable pair"),
    (FileNotFoundError(2, "No such file or directory", "/rows.jsonl"), ConfigError,
     "FileNotFoundError: /rows.jsonl: No such file or directory"),
    (KeyError("a bug"), RuntimeError, "KeyError: 'a bug'"),
    (Preempted("stopped by SIGTERM"), Preempted, None),
])
def test_an_error_on_process_0_is_raised_on_the_others_without_their_work(as_process, error,
                                                                        raised, said):
    store = _Store()

    def fail():
        raise error

    with pytest.raises(type(error)):
        as_process(0, fail, store, user_errors=(ConfigError, FileNotFoundError))
    with pytest.raises(raised) as caught:
        as_process(1, lambda: pytest.fail("process 1 ran its work"), store, timeout_s=5)
    if said is None:
        assert str(caught.value).startswith("process 0 was stopped before it could make the thing")
    else:
        assert str(caught.value) == (f"process 0 could not make the thing: {said} (process 1 of 2 "
                                     "waited for it; process 0's log has the details)")


def test_a_wait_longer_than_the_timeout_ends_with_an_error(as_process):
    with pytest.raises(RuntimeError, match="process 0 did not make the thing within 0 s"):
        as_process(1, lambda: pytest.fail("process 1 ran its work"), _Store(), timeout_s=0.0,
                   poll_s=0.01)


def test_a_store_that_stops_answering_ends_the_wait(as_process):
    with pytest.raises(RuntimeError, match=r"lost contact with process 0 .* UNAVAILABLE"):
        as_process(1, lambda: pytest.fail("process 1 ran its work"), _Lost())
