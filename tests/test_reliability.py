"""Reliability (issue 7): kill -9 mid-save, SIGTERM, corrupt or unfinished checkpoints,
restoring into another model shape (items 1-4); non-finite steps through the trainer (6); no
loader runs remote code (9); identical runs write identical metrics files (10).
docs/RELIABILITY.md maps each guarantee to its test."""

import ast
import fnmatch
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from source_helpers import package_sources

from cloud_jax.errors import CheckpointError
from cloud_jax.training.config import load_config
from cloud_jax.errors import ConfigError
from cloud_jax.training.checkpointing import COMMIT_MARKER
from cloud_jax.training.loop import run
from cloud_jax.data.synthetic.toy import write_toy_data

ROOT = Path(__file__).resolve().parents[1]

# Runs the trainer's command line with two test hooks: RELIABILITY_HANG_AT=<step> blocks the
# final rename of that step's checkpoint (a save caught in progress, orbax's temporary directory
# in place) after touching RELIABILITY_MARKER; RELIABILITY_SLOW_STEP=<seconds> pauses after each
# logged step so a signal lands mid-run. It goes through run_command, as `python -m
# cloud_jax.train` does: the exit status and the one-line messages are the command's.
TRAINER = """
import asyncio, os, sys, time
from orbax.checkpoint._src.path import atomicity
from cloud_jax.training import metrics

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def hanging_finalize(self):
    if self._final_path.name == os.environ.get("RELIABILITY_HANG_AT"):
        open(os.environ["RELIABILITY_MARKER"], "w").close()
        await asyncio.sleep(600)
    return await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = hanging_finalize
write = metrics.MetricsWriter.write

def slow_write(self, *args, **kwargs):
    write(self, *args, **kwargs)
    time.sleep(float(os.environ.get("RELIABILITY_SLOW_STEP", "0")))

metrics.MetricsWriter.write = slow_write
from cloud_jax.cli.common import run_command
from cloud_jax.cli.train import main
sys.exit(run_command(main, sys.argv[1:]))
"""

COMMON = ["train.log_every=1", "train.eval_every=0", "train.export_final=false",
          "train.tensorboard_dir=\"\"", "data.shuffle=true"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("toy")
    train, eval_ = write_toy_data(str(base / "data"), n_train=64, n_eval=8)
    return {"train": train, "eval": eval_, "tfds": str(base / "tfds")}


def overrides(toy, out, *extra):
    return [f"data.train_path={toy['train']}", "data.eval_path=\"\"",
            f"data.tfds_dir={toy['tfds']}", f"output_dir={out}", "init_from=\"\"",
            "train.progress_bar=false", *COMMON, *extra]


def tiny(toy, out, *extra):
    return load_config(ROOT / "configs/tiny_cpu_cloud.yaml", overrides(toy, out, *extra))


def trainer(toy, out, *extra, env):
    """Starts ``python -m cloud_jax.train``, with the hooks above, in a subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    cmd = [sys.executable, "-c", TRAINER, "--config", str(ROOT / "configs/tiny_cpu_cloud.yaml"),
           *overrides(toy, out, *extra)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def metrics_by_step(out):
    """The last row written for each step (a resumed run appends to the killed run's file)."""
    rows = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if row["split"] == "train":
                rows[row["step"]] = row
    return rows


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def step_dirs(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(toy, tmp_path, caplog):
    steps = ["train.total_steps=8", "train.checkpoint_every=2"]
    out, marker = str(tmp_path / "killed"), str(tmp_path / "saving")
    proc = trainer(toy, out, *steps,
                   env={"RELIABILITY_HANG_AT": "4", "RELIABILITY_MARKER": marker})
    try:
        wait_for(lambda: os.path.exists(marker), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    partial = [d for d in step_dirs(out) if d.startswith("4.")]
    assert "2" in step_dirs(out) and "4" not in step_dirs(out) and partial, step_dirs(out)
    # The partial copy holds step 4's files, but it has no final name: it must not be used.
    assert os.path.exists(os.path.join(out, "checkpoints", partial[0], "state"))

    with caplog.at_level(logging.INFO):
        run(tiny(toy, out, *steps))
    assert f"resumed from {os.path.join(out, 'checkpoints')} step 2" in caplog.text
    assert step_dirs(out) == ["6", "8"], step_dirs(out)  # partial copy removed, keep=2

    full = str(tmp_path / "full")
    run(tiny(toy, full, *steps))
    a, b = metrics_by_step(full), metrics_by_step(out)
    assert sorted(b) == list(range(1, 9))
    for step in range(3, 9):
        for key in ("loss", "batch_digest", "grad_norm", "learning_rate"):
            assert a[step][key] == b[step][key], (step, key)


def test_sigterm_saves_the_current_step_and_the_restart_resumes_there(toy, tmp_path, caplog):
    out = str(tmp_path / "preempted")
    steps = ["train.total_steps=30", "train.checkpoint_every=0"]
    proc = trainer(toy, out, *steps, env={"RELIABILITY_SLOW_STEP": "0.1"})
    metrics = os.path.join(out, "metrics.jsonl")
    wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    from cloud_jax.errors import PREEMPTED_EXIT_CODE
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    printed = json.loads(stdout.strip().splitlines()[-1])
    stopped = printed["step"]
    assert 3 <= stopped < 30 and printed["preempted"] is True, printed
    assert f"preempted: checkpoint of step {stopped} written" in stderr, stderr[-3000:]
    # The save finished before exit: the step is listed, with orbax's commit marker.
    assert step_dirs(out) == [str(stopped)]
    assert os.path.exists(os.path.join(out, "checkpoints", str(stopped), COMMIT_MARKER))
    assert max(metrics_by_step(out)) == stopped

    with caplog.at_level(logging.INFO):
        run(tiny(toy, out, *steps, f"train.stop_at_step={stopped + 2}"))
    assert f"resumed from {os.path.join(out, 'checkpoints')} step {stopped}" in caplog.text
    assert max(metrics_by_step(out)) == stopped + 2


@pytest.fixture(scope="module")
def two_checkpoints(toy, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, copied fresh for each test that damages it."""
    out = str(tmp_path_factory.mktemp("two") / "run")
    # The same total_steps as the resumed runs below: the schedule is compiled into the step.
    run(tiny(toy, out, "train.total_steps=6", "train.checkpoint_every=2", "train.stop_at_step=4"))
    return out


def test_a_resume_already_past_stop_at_step_says_that_nothing_runs(toy, two_checkpoints,
                                                                    tmp_path, caplog):
    # Checkpoint at step 4, train.stop_at_step=2: nothing to train. The run writes nothing new
    # and says so (it ended as if finished, with only a "steps 4 -> 2" line to tell).
    out = _copy(two_checkpoints, tmp_path / "run")
    with caplog.at_level(logging.INFO):
        summary = run(tiny(toy, out, "train.total_steps=6", "train.checkpoint_every=2",
                           "train.stop_at_step=2"))
    assert summary["step"] == 4 and summary["final_dir"] is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and "stop_at_step" in r.getMessage()]
    assert len(warned) == 1 and "step 4" in warned[0] and "train.stop_at_step=2" in warned[0], \
        caplog.text
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2", "4"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _truncate_arrays(step_dir):
    """Cuts every array data file of a step in half: what a full disk or a bad copy leaves."""
    for path in Path(step_dir, "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_falls_back_to_the_previous_one_with_a_log(
        toy, two_checkpoints, tmp_path, caplog):
    out = _copy(two_checkpoints, tmp_path / "run")
    _truncate_arrays(os.path.join(out, "checkpoints", "4"))
    with caplog.at_level(logging.INFO):
        summary = run(tiny(toy, out, "train.total_steps=6", "train.checkpoint_every=2"))
    bad = os.path.join(out, "checkpoints", "4")
    assert any(r.levelno == logging.ERROR and bad in r.getMessage()
               and "falling back" in r.getMessage() for r in caplog.records), caplog.text
    assert f"resumed from {os.path.join(out, 'checkpoints')} step 2" in caplog.text
    # The error names the read failure, and a warning lists what was skipped.
    error = next(r.getMessage() for r in caplog.records
                 if r.levelno == logging.ERROR and bad in r.getMessage())
    assert "does not read back (" in error and "Error" in error.split("does not read back (")[1]
    assert any(r.levelno == logging.WARNING and "after skipping 1 unusable checkpoint(s)"
               in r.getMessage() and f"{bad}: " in r.getMessage() for r in caplog.records)
    assert summary["step"] == 6 and sorted(metrics_by_step(out)) == list(range(1, 7))
    # The broken copy is kept under another name for a post mortem, out of the step listing.
    assert step_dirs(out)[:2] == ["4", "6"] and step_dirs(out)[2].startswith("unusable.4.")


def test_missing_commit_marker_is_not_resumed_from(toy, two_checkpoints, tmp_path, caplog):
    out = _copy(two_checkpoints, tmp_path / "run")
    os.remove(os.path.join(out, "checkpoints", "4", COMMIT_MARKER))
    with caplog.at_level(logging.INFO):
        run(tiny(toy, out, "train.total_steps=6", "train.checkpoint_every=0",
                 "train.stop_at_step=5"))
    assert f"{os.path.join(out, 'checkpoints', '4')} has no commit marker" in caplog.text
    assert f"resumed from {os.path.join(out, 'checkpoints')} step 2" in caplog.text
    # Set aside as in 3a: step 4 is saved again by the resumed run (here it stops at 5).
    assert step_dirs(out)[:2] == ["2", "5"] and step_dirs(out)[2].startswith("unusable.4."), \
        step_dirs(out)


def test_no_usable_checkpoint_is_an_error_naming_each_path_not_a_fresh_start(
        toy, two_checkpoints, tmp_path, monkeypatch, capsys):
    from cloud_jax.training.checkpointing import Checkpointer

    closed = []
    close = Checkpointer.close
    monkeypatch.setattr(Checkpointer, "close", lambda self: (closed.append(self), close(self)))
    out = _copy(two_checkpoints, tmp_path / "run")
    ckpts = os.path.join(out, "checkpoints")
    _truncate_arrays(os.path.join(ckpts, "4"))
    Path(ckpts, "2", "config", "metadata").write_text("{truncated")
    with pytest.raises(CheckpointError) as err:
        run(tiny(toy, out, "train.total_steps=6"))
    message = str(err.value)
    assert os.path.join(ckpts, "4") in message and os.path.join(ckpts, "2") in message, message
    assert "no usable checkpoint" in message
    # The failed run closed its checkpoint manager (a caller in the same process goes on).
    assert len(closed) == 1
    # `python -m cloud_jax.train` prints it on one line and exits with status 2; neither run
    # wrote or moved a step directory.
    from cloud_jax.cli import train as train_cli
    from cloud_jax.cli.common import run_command

    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # keep pytest's logging
    capsys.readouterr()
    assert run_command(train_cli.main, ["--config", str(ROOT / "configs/tiny_cpu_cloud.yaml"),
                                        *overrides(toy, out, "train.total_steps=6")]) == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    # The library's message on one line. Step 4's reason quotes the array the checkpoint reader
    # met first, which its concurrent reads make vary from run to run: that part is left out.
    want = f"error: {' '.join(message.split())}"
    step4, step2 = f"{os.path.join(ckpts, '4')}: ", f" | {os.path.join(ckpts, '2')}: "
    assert errors[0].split(step4)[0] == want.split(step4)[0], (errors, want)
    assert errors[0].split(step2)[1] == want.split(step2)[1], (errors, want)
    assert step_dirs(out) == ["2", "4"]


def test_restoring_into_another_model_shape_names_the_keys_and_shapes(
        toy, two_checkpoints, tmp_path):
    import dataclasses

    from cloud_jax.model.config import ModelConfig
    from cloud_jax.sharding import TRAIN_RULES, make_mesh
    from cloud_jax.training.checkpointing import Checkpointer
    from cloud_jax.training.step import StepBuilder

    cfg = tiny(toy, two_checkpoints)

    def restore_error(model: ModelConfig) -> str:
        """The error of restoring step 4 into ``model``'s state."""
        builder = StepBuilder(cfg, make_mesh(cfg.mesh), TRAIN_RULES, model)
        ckpt = Checkpointer(os.path.join(two_checkpoints, "checkpoints"), keep=2)
        try:
            with pytest.raises(CheckpointError) as err:
                ckpt.restore(4, builder.abstract_state(), data_iter=None)
        finally:
            ckpt.close()
        return str(err.value)

    message = restore_error(dataclasses.replace(cfg.model, intermediate_size=192))
    assert "does not fit the model" in message and os.path.join(
        two_checkpoints, "checkpoints", "4") in message
    assert message.index("params.layers_0.mlp.up_proj.kernel: checkpoint (64, 176) float32, "
                         "model (64, 192) float32") < message.index("opt_state"), message
    # Keys only one side has are named too: a deeper model's extra layer, a shallower one's
    # missing layer.
    for layers, side in ((3, "only in the model"), (1, "only in the checkpoint")):
        message = restore_error(dataclasses.replace(cfg.model, num_layers=layers))
        missing = "params.layers_2" if layers == 3 else "params.layers_1"
        assert f"{missing}.mlp.up_proj.kernel: {side} (64, 176)" in message, message
    # Through the trainer the changed config is named before any array is read.
    with pytest.raises(ConfigError, match=r"model.intermediate_size: 176 -> 192"):
        run(tiny(toy, _copy(two_checkpoints, tmp_path / "run"), "train.total_steps=6",
                 "model.intermediate_size=192"))


# -- item 6: non-finite steps through the trainer ----------------------------------------------

# With no warmup the first step moves every weight by about the learning rate: the weights stay
# finite (1e30 < 3.4e38) but the next forward overflows, so step 2 is the first non-finite one.
OVERFLOW = ["optim.learning_rate=1e30", "optim.warmup_ratio=0"]


def _saved_params(cfg, out, step):
    """The parameters of checkpoint ``step`` (its state item only)."""
    import orbax.checkpoint as ocp

    from cloud_jax.sharding import TRAIN_RULES, make_mesh
    from cloud_jax.training.checkpointing import Checkpointer
    from cloud_jax.training.step import StepBuilder

    builder = StepBuilder(cfg, make_mesh(cfg.mesh), TRAIN_RULES, cfg.model)
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=8)
    try:
        state = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(builder.abstract_state())))["state"]
        return jax.device_get(state["params"])
    finally:
        ckpt.close()


def test_nonfinite_error_names_the_step_and_saves_nothing_after_it(toy, tmp_path):
    out = str(tmp_path / "nan")
    # Logged every 4 steps but saved every step: the check must come before each save, not
    # only when a window is logged.
    proc = trainer(toy, out, *OVERFLOW, "train.total_steps=4", "train.checkpoint_every=1",
                   "train.log_every=4", env={})
    _, stderr = proc.communicate(timeout=300)
    # A user error of the command: one `error:` line naming the first such step, status 2.
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: step 2: non-finite loss"), lines
    assert "train.on_nonfinite=skip" in lines[0]
    assert step_dirs(out) == ["1"]


def test_nonfinite_skip_counts_steps_and_checkpoints_finite_unchanged_params(toy, tmp_path):
    out = str(tmp_path / "skip")
    # Logged every 2 steps: step 1 (applied) and 2 (skipped), then step 3 (skipped) alone. Saved
    # at steps 2 and 3 (a logged window ends at each checkpoint too).
    cfg = tiny(toy, out, *OVERFLOW, "train.total_steps=3", "train.checkpoint_every=2",
               "train.keep_checkpoints=3", "train.on_nonfinite=skip", "train.log_every=2")
    summary = run(cfg)
    rows = metrics_by_step(out)
    assert sorted(rows) == [2, 3]
    assert [rows[s]["nonfinite_steps"] for s in (2, 3)] == [1, 1]
    # The window's figures are step 1's, not NaN from the skipped step 2, and its learning rate
    # is the one step 1 applied (warmup 0: the peak); a window of skipped steps has none.
    assert all(np.isfinite(rows[2][k]) for k in ("loss", "grad_norm", "bt_loss", "lm_loss"))
    assert rows[2]["learning_rate"] == pytest.approx(1e30)
    assert all(rows[3][k] is None for k in ("loss", "grad_norm", "learning_rate", "accuracy"))
    assert rows[3]["tokens"] > 0
    assert summary["step"] == 3 and step_dirs(out) == ["2", "3"]
    after_2, after_3 = _saved_params(cfg, out, 2), _saved_params(cfg, out, 3)
    leaves = jax.tree.leaves(after_3)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after_2) + leaves)
    for a, b in zip(jax.tree.leaves(after_2), leaves):
        np.testing.assert_array_equal(a, b)


# -- item 9: no loader runs remote code ----------------------------------------------------------

# Calls that can fetch or import code a checkpoint names; hub downloads may fetch only data files.
_LOADERS = {"from_pretrained"}
_DOWNLOADS = {"snapshot_download", "hf_hub_download"}


def _calls():
    for path, tree in package_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                yield f"{path.relative_to(ROOT)}:{node.lineno}", name, node


def test_no_loader_in_the_package_can_run_remote_code():
    loaders = 0
    for where, name, call in _calls():
        keywords = {k.arg: k.value for k in call.keywords}
        trust = keywords.get("trust_remote_code")
        if trust is not None:
            assert isinstance(trust, ast.Constant) and trust.value is False, where
        if name in _LOADERS:
            loaders += 1
            # Explicit, so that no default (or a **kwargs from a caller) decides it.
            assert trust is not None and None not in keywords, f"{where}: {name} without " \
                "trust_remote_code=False"
        if name in _DOWNLOADS:
            patterns = keywords.get("allow_patterns")
            assert isinstance(patterns, (ast.List, ast.Tuple)), f"{where}: {name} unrestricted"
            globs = [ast.literal_eval(p) for p in patterns.elts]
            assert not any(fnmatch.fnmatch(f, g) for f in ("modeling_x.py", "x.py", "x.bin",
                                                            "x.pt", "x.pkl") for g in globs), where
    assert loaders >= 2  # the tokenizer loaders of data/tokenizer.py and api.py


def test_a_checkpoint_that_asks_for_remote_code_never_runs_it(tmp_path):
    from cloud_jax.api import from_config, load
    from cloud_jax.model.config import ModelConfig
    from cloud_jax.data.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer, load_tokenizer

    directory = tmp_path / "stranger"
    cfg = ModelConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1)
    from_config(cfg, tokenizer=byte_tokenizer()).save_pretrained(directory)
    marker = tmp_path / "code_ran"
    (directory / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")

    def edit(name, **fields):
        data = json.loads((directory / name).read_text())
        data.update(fields)
        (directory / name).write_text(json.dumps(data))

    # Weights are read from JSON and safetensors only: the config's auto_map is never followed.
    edit("config.json", auto_map={"AutoConfig": "evil.EvilConfig",
                                  "AutoModel": "evil.EvilModel"})
    assert load(directory).config == cfg
    assert not marker.exists()
    # A tokenizer that needs its own code is refused, with transformers' explanation.
    edit("tokenizer_config.json", tokenizer_class="EvilTokenizer",
         auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    for loader in (lambda: load(directory), lambda: load_tokenizer(str(directory))):
        with pytest.raises(ValueError, match="contains custom code"):
            loader()
    assert not marker.exists()


# -- item 10: identical runs, identical metrics files --------------------------------------------

def test_two_identical_runs_write_byte_identical_metrics_files(toy, tmp_path):
    files = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        # total_steps=6 and checkpoints every 2 steps: the programs two_checkpoints compiled.
        run(tiny(toy, out, "train.total_steps=6", "train.checkpoint_every=2",
                 f"data.eval_path={toy['eval']}", "train.eval_every=3",
                 "train.peak_flops_per_device=1e12"))
        files.append(Path(out, "metrics.jsonl").read_bytes())
        timing = [json.loads(line) for line in open(Path(out, "throughput.jsonl"))]
        assert [r["step"] for r in timing] == list(range(1, 7))
        assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in timing)
    rows = [json.loads(line) for line in files[0].splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train"), (5, "train"),
        (6, "train"), (6, "eval")]
    assert not any(k in r for r in rows for k in ("tokens_per_s", "mfu"))
    assert files[0] == files[1]


def test_a_model_key_added_later_or_an_attention_choice_does_not_stop_a_resume(caplog):
    """A checkpoint written before a model.* key existed resumes where the run leaves the key
    at its default; the attention implementations may change (a warning); what shapes the
    weights may not."""
    from cloud_jax.training.checkpointing import compare_configs

    saved = {"model": {"hidden_size": 64, "attention_impl": "xla"}, "data": {"batch_pairs": 4}}

    def resume(**model):
        compare_configs(saved, {"model": {"hidden_size": 64, "attention_impl": "xla", **model},
                                "data": {"batch_pairs": 4}}, "ckpt")

    with caplog.at_level(logging.WARNING):
        resume(decode_attention_impl="xla")  # added since, at its default: no change at all
        resume(eos_token_ids=[])  # a tuple default, as JSON gives it back
        assert not caplog.records
        resume(decode_attention_impl="pallas", attention_impl="cudnn")
        # How the step computes (memory knobs for another slice) may change too.
        resume(causal_block_size=64)
        resume(reward_dropout=0.1)  # a training choice: no saved array changes with it
    assert "model.reward_dropout: None -> 0.1" in caplog.text
    assert "model.attention_impl: 'xla' -> 'cudnn'" in caplog.text
    assert "model.decode_attention_impl: None -> 'pallas'" in caplog.text
    assert "model.causal_block_size: None -> 64" in caplog.text
    with pytest.raises(ConfigError, match="model.scan_layers: None -> True"):
        resume(scan_layers=True)  # added since, away from its default: the saved arrays differ
    with pytest.raises(ConfigError, match="model.hidden_size: 64 -> 32"):
        resume(hidden_size=32)


def test_sigterm_during_the_last_step_finishes_the_run(toy, tmp_path, monkeypatch):
    """The last step's checkpoint and export are written either way: the run is finished, not
    preempted (it exited 75, and its relaunch reported no train or eval metrics)."""
    from cloud_jax.training import metrics

    write = metrics.MetricsWriter.write

    def write_then_sigterm(self, step, *args, **kwargs):
        write(self, step, *args, **kwargs)
        if step == 2:  # the signal lands while step 3, the last, is under way
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write_then_sigterm)
    out = str(tmp_path / "run")
    summary = run(tiny(toy, out, "train.total_steps=3", "train.checkpoint_every=0",
                       "train.export_final=true"))
    assert summary["step"] == 3 and not summary["preempted"]
    assert summary["final_dir"] and os.path.isdir(os.path.join(out, "final"))
    assert step_dirs(out) == ["3"]


# The trainer's command line as `python -m cloud_jax.train` runs it (through run_command), with a
# hook: the restore of a checkpoint touches RELIABILITY_MARKER, then waits there for a signal.
RESTORE_TRAINER = """
import os, sys, time
from cloud_jax.training import checkpointing

restore = checkpointing.Checkpointer.restore

def pausing_restore(*args, **kwargs):
    open(os.environ["RELIABILITY_MARKER"], "w").close()
    time.sleep(600)
    return restore(*args, **kwargs)

checkpointing.Checkpointer.restore = pausing_restore
from cloud_jax.cli.common import run_command
from cloud_jax.cli.train import main
sys.exit(run_command(main, sys.argv[1:]))
"""


def test_sigterm_during_a_restore_exits_75_and_the_rerun_resumes(toy, tmp_path, caplog):
    """Preemption outside the step loop (here: while a checkpoint is read back): status 75 and
    one `preempted:` line, as in the step loop; the checkpoint being read is not taken for an
    unusable one (set aside), and the rerun resumes from it."""
    from cloud_jax.errors import PREEMPTED_EXIT_CODE

    out, marker = str(tmp_path / "run"), str(tmp_path / "restoring")
    steps = ["train.total_steps=2", "train.checkpoint_every=1"]
    run(tiny(toy, out, *steps, "train.stop_at_step=1"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", RELIABILITY_MARKER=marker)
    proc = subprocess.Popen(
        [sys.executable, "-c", RESTORE_TRAINER, "--config",
         str(ROOT / "configs/tiny_cpu_cloud.yaml"), *overrides(toy, out, *steps)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(marker), proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("preempted: ")]
    assert len(lines) == 1 and "run the same command again" in lines[0], stderr[-3000:]
    assert step_dirs(out) == ["1"]  # not moved aside as unusable
    with caplog.at_level(logging.INFO):
        summary = run(tiny(toy, out, *steps))
    assert f"resumed from {os.path.join(out, 'checkpoints')} step 1" in caplog.text
    assert summary["step"] == 2 and not summary["preempted"]


def test_a_second_run_on_a_held_output_dir_is_refused_naming_the_holder(toy, tmp_path):
    """Two runs on one output_dir would interleave their checkpoints: while one holds it, another
    is refused, naming the holder's pid and host; the lock of a holder that died (kill -9: its
    lock file stays) does not block."""
    import socket

    from cloud_jax.storage import LOCK_FILE

    out = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cloud_jax.storage import hold_dir\n"
         "with hold_dir(sys.argv[1], 'output_dir'):\n    print('held', flush=True)\n"
         "    time.sleep(600)\n", out],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"output_dir {out} is in use by pid {holder.pid} on "
                                              f"host {socket.gethostname()}"):
            run(tiny(toy, out, "train.total_steps=1"))
        assert not os.path.exists(os.path.join(out, "checkpoints"))
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(os.path.join(out, LOCK_FILE))  # left by the killed holder
    assert run(tiny(toy, out, "train.total_steps=1"))["step"] == 1


def test_an_empty_output_dir_is_held_as_the_working_directory(tmp_path, monkeypatch):
    """output_dir="" writes into the working directory (storage.join), and is held there."""
    from cloud_jax.storage import LOCK_FILE, hold_dir

    monkeypatch.chdir(tmp_path)
    with hold_dir("", "output_dir"):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on host ")


def test_an_export_stopped_after_its_weights_leaves_no_config_beside_them(tmp_path, monkeypatch):
    """A save_pretrained over an earlier export that dies after writing the weights leaves a
    directory without config.json (a load says so), not the earlier config beside new weights."""
    import dataclasses

    import cloud_jax
    from cloud_jax.checkpoints import hf as hf_io
    from model_helpers import TINY, tiny_reward_model

    out = tmp_path / "export"
    tiny_reward_model(1).save_pretrained(out)
    real_write = hf_io.write_safetensors

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_io, "write_safetensors", write_then_die)
    new = tiny_reward_model(2, dataclasses.replace(TINY, intermediate_size=48))
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(out)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="no config.json"):
        cloud_jax.load(out)
    new.save_pretrained(out)
    assert cloud_jax.load(out).config.intermediate_size == 48


def test_two_writers_of_one_file_at_once_leave_one_writer_s_whole_text(tmp_path, monkeypatch):
    """Two processes writing one output at once (two `score` runs with one --output): both went
    through one fixed temporary name, so the second truncated the first one's file mid-write;
    the result held the second's text, NUL bytes, then the rest of the first's, and the first
    failed with FileNotFoundError. Each writer now has its own temporary file."""
    import builtins

    from cloud_jax import storage

    path = str(tmp_path / "scored.jsonl")
    first, second = "a" * 1000 + "\n", "b" * 300 + "\n"
    real_open = builtins.open
    interleaved = []

    class Interleaved:
        """The first writer's file: the second writer runs whole in the middle of its write."""

        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:500])
            self.f.flush()
            interleaved.append(True)
            storage.write_text_atomic(path, second)
            self.f.write(text[500:])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def open_(name, mode="r", **kwargs):
        f = real_open(name, mode, **kwargs)
        return f if interleaved or "w" not in mode else Interleaved(f)

    monkeypatch.setattr(storage, "open", open_, raising=False)
    storage.write_text_atomic(path, first)
    assert interleaved
    assert Path(path).read_text() == first  # the last rename wins, whole
    assert os.listdir(tmp_path) == ["scored.jsonl"]


def test_temporaries_that_killed_writers_left_are_deleted_by_the_next_write(tmp_path):
    from cloud_jax import storage

    path = str(tmp_path / "out.json")
    storage.write_text_atomic(path, "first")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = storage._tmp_host()
    stale = [f"{path}.tmp", f"{path}.tmp1", f"{path}.tmp.{host}.{ended.pid}.0123abcd"]
    # A live writer's (this process) and another host's (its pids mean nothing here) stay.
    live = [f"{path}.tmp.{host}.{os.getpid()}.0123abcd",
            f"{path}.tmp.elsewhere.{ended.pid}.0123abcd"]
    for name in stale + live:
        Path(name).write_text("cut off")
    storage.write_text_atomic(path, "second")
    assert Path(path).read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.json"] + [os.path.basename(n) for n in live])


@pytest.fixture
def remote_model(tmp_path, monkeypatch):
    """A directory in fsspec's in-memory store (memory://), and the download cache in tmp_path."""
    import fsspec

    fs = fsspec.filesystem("memory")
    url = f"memory://reliability-{os.getpid()}-{tmp_path.name}/model"
    inner = url.split("://", 1)[1]
    fs.pipe_file(f"/{inner}/config.json", b"{}")
    fs.pipe_file(f"/{inner}/weights.bin", b"w" * 64)
    monkeypatch.setenv("CLOUD_JAX_CACHE", str(tmp_path / "cache"))
    yield url, fs, inner
    fs.rm(f"/{inner.split('/')[0]}", recursive=True)


def _staging_dirs(root):
    return sorted(p for p in Path(root).rglob(".download-*"))


@pytest.mark.parametrize("stop", ["Preempted", "KeyboardInterrupt", "OSError"])
def test_a_download_stopped_part_way_removes_its_staging_directory(remote_model, tmp_path,
                                                                     monkeypatch, stop):
    """SIGTERM (Preempted), Ctrl-C or a network error in the middle of a download into the cache
    left the half-filled .download-* directory there for good (gigabytes a model)."""
    from cloud_jax import storage
    from cloud_jax.errors import Preempted

    url, fs, _ = remote_model
    error = {"Preempted": Preempted("SIGTERM"), "KeyboardInterrupt": KeyboardInterrupt(),
             "OSError": OSError("connection reset")}[stop]
    real_get_file = type(fs).get_file

    def get_file(self, rpath, lpath, **kwargs):
        if rpath.endswith("weights.bin"):
            assert _staging_dirs(tmp_path / "cache")  # it was there while downloading
            raise error
        return real_get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(type(fs), "get_file", get_file)
    with pytest.raises(type(error)):
        storage.local_copy(url)
    assert _staging_dirs(tmp_path / "cache") == []
    monkeypatch.setattr(type(fs), "get_file", real_get_file)
    assert Path(storage.local_copy(url), "weights.bin").read_bytes() == b"w" * 64


def test_stale_staging_directories_are_removed_and_live_ones_kept(remote_model, tmp_path):
    """Staging directories a killed download left (kill -9: no cleanup runs) are removed by the
    next use of the cache entry; another download's, live or not known to be over, are kept."""
    import fcntl

    from cloud_jax import storage

    url, fs, inner = remote_model
    version_dir = Path(storage.local_copy(url)).parent
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = storage._tmp_host()
    day_ago = time.time() - 2 * 24 * 3600
    stale = [f".download-{host}.{ended.pid}.abcd_123", ".download-q8jnd17l"]
    live = [f".download-{host}.{os.getpid()}.abcd_123",   # this process: alive
            f".download-elsewhere.{ended.pid}.abcd_123",  # another host's pids mean nothing here
            ".download-x1y2z3w4",                         # an earlier release's, changed today
            f".download-{host}.{ended.pid}.locked_1"]     # its pid ended, but its lock is held
    for name in stale + live:
        (version_dir / name).mkdir()
        (version_dir / name / "part.bin").write_bytes(b"p")
    for path in (version_dir / ".download-q8jnd17l", version_dir / ".download-q8jnd17l/part.bin"):
        os.utime(path, (day_ago, day_ago))
    held = os.open(version_dir / live[-1], os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert Path(storage.local_copy(url)).parent == version_dir  # unchanged: not downloaded
        assert _staging_dirs(version_dir) == sorted(version_dir / n for n in live)
        # A changed directory is downloaded again; the older version, where downloads still
        # run, is kept until they are over.
        fs.pipe_file(f"/{inner}/weights.bin", b"v" * 65)  # another size: another version
        new_dir = Path(storage.local_copy(url)).parent
        assert new_dir != version_dir and version_dir.is_dir()
    finally:
        os.close(held)
    for name in live:
        shutil.rmtree(version_dir / name)
    storage.local_copy(url)
    assert not version_dir.exists() and _staging_dirs(tmp_path / "cache") == []
