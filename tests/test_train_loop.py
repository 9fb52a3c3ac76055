"""The training loop on the toy preference set: every stage learns, stop + resume equals an
uninterrupted run exactly, two processes equal one, bad data and bad settings give clear errors."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_helpers import run_joined

from cloud_jax.training.config import load_config
from cloud_jax.errors import ConfigError
from cloud_jax.training.loop import prepare_data, run
from cloud_jax.data.synthetic.toy import write_toy_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("toy")
    train, eval_ = write_toy_data(str(base / "data"), n_train=128, n_eval=32)
    return {"train": train, "eval": eval_, "tfds": str(base / "tfds")}


def tiny(stage, toy, out, *extra):
    return load_config(ROOT / f"configs/tiny_cpu_{stage}.yaml", [
        f"data.train_path={toy['train']}", f"data.eval_path={toy['eval']}",
        f"data.tfds_dir={toy['tfds']}", f"output_dir={out}", "init_from=\"\"",
        "train.progress_bar=false", *extra])


def read_metrics(out, split="train"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.parametrize("stage", ["lm_pretrain", "critique_sft", "cloud", "classic"])
def test_every_stage_learns(stage, toy, tmp_path):
    out = str(tmp_path / stage)
    summary = run(tiny(stage, toy, out, "train.total_steps=30", "train.eval_every=30",
                       "train.log_every=5", "train.export_final=false",
                       "train.peak_flops_per_device=1e12"))
    train = read_metrics(out)
    # Wall-clock figures live beside the (deterministic) metrics file.
    with open(os.path.join(out, "throughput.jsonl")) as f:
        timing = [json.loads(line) for line in f]
    assert 0 < timing[-1]["mfu"] < 1 and timing[-1]["tokens_per_s"] > 0
    assert os.listdir(os.path.join(out, "tensorboard"))
    assert summary["step"] == 30 and [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"], train
    assert summary["compile_reports"] and "memory per device" in summary["compile_reports"][0]
    ev = read_metrics(out, "eval")[-1]
    if stage in ("cloud", "classic"):
        # Chance is 0.5 (and a constant reward scores 0: ties count as wrong).
        assert ev["accuracy"] >= 0.9, ev
    if stage != "classic":
        # A model that has learnt nothing scores about log(vocab) = 5.6 nats per token.
        assert ev["lm_loss"] < 0.6 * np.log(272), ev
    assert os.path.exists(os.path.join(out, "config.yaml"))


def test_the_progress_of_a_run_logged_to_a_file_is_plain_lines(toy, tmp_path, capsys):
    # On a pod the trainer's stderr is a worker's log file: a tqdm bar there piles its redraws
    # (carriage returns) into one line and glues itself in front of every log line after it.
    out = str(tmp_path / "progress")
    cfg = tiny("critique_sft", toy, out, "train.total_steps=3", "train.eval_every=0",
               "train.log_every=1", "train.export_final=false", "train.progress_bar=true")
    prepare_data(cfg)  # TFDS's own bars of a first build are not the trainer's
    capsys.readouterr()
    run(cfg)
    err = capsys.readouterr().err
    assert not re.search(r"\r[^\n]*critique_sft", err), err[-2000:]
    assert re.search(r"^critique_sft: 3/3 steps \(100\.0%\).*loss=", err, re.M), err[-2000:]


def test_stop_and_resume_equals_uninterrupted_run(toy, tmp_path):
    common = ["train.total_steps=8", "train.log_every=1", "train.eval_every=0",
              "train.checkpoint_every=0", "train.export_final=false"]
    full = str(tmp_path / "full")
    run(tiny("cloud", toy, full, *common))
    parts = str(tmp_path / "parts")
    first = run(tiny("cloud", toy, parts, *common, "train.stop_at_step=3"))
    assert first["step"] == 3
    assert sorted(os.listdir(os.path.join(parts, "checkpoints"))) == ["3"]
    second = run(tiny("cloud", toy, parts, *common))
    assert second["step"] == 8
    a, b = read_metrics(full), read_metrics(parts)
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss", "batch_digest", "grad_norm", "accuracy", "lm_loss", "learning_rate"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_a_resume_after_a_crash_logs_the_windows_of_the_uninterrupted_run(toy, tmp_path):
    """Checkpoints every 2 steps, a log line every 3: a run killed before its step 4 checkpoint
    resumes from step 2 and drops the lines after it, so no logged window may reach across a
    checkpoint (the step 3 line would have covered steps 1-3 and been replaced by one of step 3
    alone)."""
    out = str(tmp_path / "run")
    common = ["train.total_steps=4", "train.log_every=3", "train.checkpoint_every=2",
              "train.eval_every=0", "train.export_final=false"]
    run(tiny("classic", toy, out, *common))
    before = read_metrics(out)
    shutil.rmtree(os.path.join(out, "checkpoints", "4"))  # killed before it was written
    run(tiny("classic", toy, out, *common))
    after = read_metrics(out)
    for key in ("step", "loss", "batch_digest", "accuracy", "learning_rate"):
        assert [r[key] for r in after] == [r[key] for r in before], key
    assert [r["step"] for r in after] == [2, 3, 4]


@pytest.mark.slow
def test_two_processes_equal_one(toy, tmp_path):
    # No shuffling: then global batch k holds the same pairs however they are split over hosts.
    args = ["--config", str(ROOT / "configs/tiny_cpu_cloud.yaml"),
            f"data.train_path={toy['train']}", f"data.eval_path={toy['eval']}",
            f"data.tfds_dir={toy['tfds']}", "init_from=\"\"", "train.progress_bar=false",
            "train.tensorboard_dir=\"\"", "train.total_steps=4", "train.log_every=1",
            "train.eval_every=4", "train.export_final=false", "data.shuffle=false"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    one = str(tmp_path / "one")
    proc = subprocess.run([sys.executable, "-m", "cloud_jax.train", *args, f"output_dir={one}"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = str(tmp_path / "two")
    run_joined([sys.executable, "-m", "cloud_jax.train", *args, f"output_dir={two}"], 2, env,
               timeout=600, cwd=ROOT)
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    np.testing.assert_allclose(read_metrics(one, "eval")[-1]["accuracy"],
                               read_metrics(two, "eval")[-1]["accuracy"])


@pytest.mark.slow
def test_a_resume_on_another_mesh_and_device_count_goes_on_as_the_uninterrupted_run(toy,
                                                                                    tmp_path):
    """Stopped on 8 devices as mesh data=8, resumed on 4 as fsdp=2 x tensor=2 with the same
    global batch in two micro-batches: the state is restored into the new shardings, the data
    position, step and learning-rate schedule go on, and the losses are the uninterrupted run's
    up to rounding."""
    args = ["--config", str(ROOT / "configs/tiny_cpu_cloud.yaml"),
            f"data.train_path={toy['train']}", "data.eval_path=\"\"",
            f"data.tfds_dir={toy['tfds']}", "init_from=\"\"", "train.progress_bar=false",
            "train.tensorboard_dir=\"\"", "train.total_steps=4", "train.log_every=1",
            "train.eval_every=0", "train.checkpoint_every=0", "train.export_final=false"]

    def train(devices, *extra):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run([sys.executable, "-m", "cloud_jax.train", *args, *extra], env=env,
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    full, parts = tmp_path / "full", tmp_path / "parts"
    train(8, "mesh.data=8", f"output_dir={full}")
    train(8, "mesh.data=8", f"output_dir={parts}", "train.stop_at_step=2")
    log = train(4, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum_steps=2",
                f"output_dir={parts}")
    assert "resumed from" in log and "step 2" in log
    a, b = read_metrics(full), read_metrics(parts)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["batch_digest"] for r in a] == [r["batch_digest"] for r in b]
    assert [r["learning_rate"] for r in a] == [r["learning_rate"] for r in b]
    for key in ("loss", "grad_norm", "accuracy", "lm_loss"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5,
                                   err_msg=key)


def test_malformed_row_is_an_error_naming_file_line_and_field(toy, tmp_path, capsys):
    from cloud_jax.cli.common import run_command
    from cloud_jax.cli.train import main

    bad = tmp_path / "bad.jsonl"
    lines = Path(toy["train"]).read_text().splitlines()
    row = json.loads(lines[2])
    row["chosen"] = 7
    lines[2] = json.dumps(row)
    lines[4] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    args = ["--config", str(ROOT / "configs/tiny_cpu_classic.yaml"), f"data.train_path={bad}",
            "data.eval_path=\"\"", f"data.tfds_dir={tmp_path / 'tfds'}",
            f"output_dir={tmp_path / 'out'}", "init_from=\"\"", "train.progress_bar=false"]
    assert run_command(main, args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "chosen" in err, err
    # Lenient mode skips both bad rows, writes them to the rejects file, and trains.
    lenient = args + ["data.lenient=true", "train.total_steps=2", "train.export_final=false"]
    assert main(lenient) == 0
    # Beside the dataset built from these rows (tfds/cloud_pairs/<dataset>/).
    [rejects] = (tmp_path / "tfds" / "cloud_pairs").glob("*/rejects-train.jsonl")
    assert len(rejects.read_text().splitlines()) == 2
    # The summary line the command prints names them, also for a run that reuses the tokenized
    # dataset (which logs nothing of the rows its build skipped).
    for run_dir in ("out", "again"):
        if run_dir == "again":
            assert main(lenient + [f"output_dir={tmp_path / run_dir}"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        train = summary["data"]["train"]
        assert (train["rejected_rows"], train["rejects_path"]) == (2, str(rejects)), summary


def test_overlength_pairs_are_dropped_and_counted(toy, tmp_path):
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    rows[0]["rejected"] = "x" * 200  # over data.max_length=96 tokens of the byte tokenizer
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(tiny("classic", toy, str(tmp_path / "out"), f"data.train_path={path}",
                       "train.total_steps=2", "train.export_final=false", "train.eval_every=0"))
    stats = summary["data"]["train"]
    assert (stats["pairs"], stats["dropped_overlength"]) == (len(rows) - 1, 1)


def test_a_split_of_overlength_pairs_is_an_error_naming_the_longest_and_the_settings(toy, tmp_path):
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    rows[1]["rejected"] = "x" * 300
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as err:
        run(tiny("cloud", toy, str(tmp_path / "out"), f"data.train_path={path}",
                 "data.max_length=8"))
    message = str(err.value)
    assert f"{len(rows)} of {len(rows)} pairs are longer than data.max_length=8" in message
    assert f"the longest, {path}:2 (rejected), has " in message
    for setting in ("data.max_length", "model.max_position_embeddings", "data.length_buckets",
                    "self_critique.max_critique_tokens"):
        assert setting in message


def test_too_few_batches_and_uneven_micro_batches_are_config_errors(toy, tmp_path):
    with pytest.raises(ConfigError, match="raise data.num_epochs"):
        run(tiny("classic", toy, str(tmp_path / "a"), "train.total_steps=1000"))
    with pytest.raises(ConfigError, match="grad_accum_steps=3"):
        run(tiny("classic", toy, str(tmp_path / "b"), "train.grad_accum_steps=3"))


def test_resume_with_another_stage_is_refused(toy, tmp_path):
    out = str(tmp_path / "run")
    run(tiny("classic", toy, out, "train.total_steps=2", "train.export_final=false",
             "train.eval_every=0"))
    with pytest.raises(ConfigError, match="train.stage"):
        run(tiny("cloud", toy, out, "train.total_steps=2"))


def _as_written_by(step_dir: Path, processes: int) -> None:
    """Rewrites a one-process checkpoint's data position as ``processes`` processes save it:
    one file each, every one holding the global batch number."""
    data = step_dir / "data"
    saved = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for i in range(processes):
        (data / f"process_{i}-of-{processes}.json").write_text(saved)


def test_resume_on_another_number_of_processes_goes_on_with_the_same_global_batches(toy,
                                                                                     tmp_path):
    """A checkpoint's data position is a global batch number, the same in each process's file:
    a checkpoint of two processes resumes on one and reads the batches the uninterrupted run
    read (shuffled, as configured). One written before the order was global (no data_order in
    its config) by two processes is refused on one, and kept."""
    common = ["train.total_steps=5", "train.log_every=1", "train.eval_every=0",
              "train.checkpoint_every=0", "train.export_final=false"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    run(tiny("classic", toy, str(full), *common))
    run(tiny("classic", toy, str(parts), *common, "train.stop_at_step=2"))
    step_dir = parts / "checkpoints" / "2"
    _as_written_by(step_dir, 2)

    config_file = step_dir / "config" / "metadata"
    config = json.loads(config_file.read_text())
    assert config.pop("data_order") == "global"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"written by a run of 2 processes before the train "
                                          r"order was global .* this run has 1: resume it on 2 "
                                          r"processes"):
        run(tiny("classic", toy, str(parts), *common))
    assert sorted(os.listdir(parts / "checkpoints")) == ["2"]

    config_file.write_text(json.dumps({**config, "data_order": "global"}))
    assert run(tiny("classic", toy, str(parts), *common))["step"] == 5
    a, b = read_metrics(full), read_metrics(parts)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "batch_digest", "grad_norm", "learning_rate"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_which_checkpoints_go_on_in_the_global_order_on_which_host_counts(caplog):
    from cloud_jax.training.checkpointing import check_data_order

    with caplog.at_level(logging.WARNING):
        for saved, now in ((1, 4), (4, 2), (2, 2), (None, 3)):
            check_data_order("ckpt", "global", saved, now, shuffle=True)
        check_data_order("ckpt", None, 1, 2, shuffle=True)  # one host's order was global
        check_data_order("ckpt", None, 2, 2, shuffle=False)  # so was an unshuffled one
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        check_data_order("ckpt", None, 2, 2, shuffle=True)
    assert "read twice or not at all" in caplog.text
    with pytest.raises(ConfigError, match="ckpt was written by a run of 4 processes before"):
        check_data_order("ckpt", None, 4, 2, shuffle=False)


def test_resume_past_total_steps_is_refused_not_a_finished_run(toy, tmp_path):
    out = str(tmp_path / "run")
    common = ["train.export_final=false", "train.eval_every=0", "train.checkpoint_every=0"]
    run(tiny("cloud", toy, out, "train.total_steps=4", *common))
    config = (Path(out) / "config.yaml").read_text()
    # It ran no step and exported nothing, yet ended as a finished run (exit status 0).
    with pytest.raises(ConfigError, match="step 4, past train.total_steps=2"):
        run(tiny("cloud", toy, out, "train.total_steps=2", "train.export_final=true"))
    assert not os.path.exists(os.path.join(out, "final"))
    assert (Path(out) / "config.yaml").read_text() == config

TRAIN_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*_*.yaml")
                       if p.stem.split("_")[-1] in ("sft", "cloud", "classic", "pretrain"))


def test_train_configs_load_with_the_reference_hyperparameters():
    assert len(TRAIN_CONFIGS) == 13, TRAIN_CONFIGS
    for path in TRAIN_CONFIGS:
        cfg = load_config(ROOT / path)
        assert cfg.train.stage in path, path
        if path.startswith("configs/llama3_"):
            o = cfg.optim
            assert (o.b1, o.b2, o.eps, o.warmup_ratio, o.final_lr_ratio, o.grad_clip_norm) == (
                0.9, 0.95, 1e-10, 0.1, 0.01, 1.0), path
            assert o.resolved_weight_decay == o.learning_rate
            assert o.learning_rate == (1e-6 if cfg.train.stage == "cloud" else 5e-6), path
            assert (cfg.data.batch_pairs, cfg.data.max_length) == (96, 2048)
            assert cfg.loss.lm_coef == (1.25 if "8b" in path else 0.75)
            assert cfg.data.num_epochs == (2 if path.endswith("8b_classic.yaml") else 1)
            assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"


@pytest.mark.slow
def test_tiny_stage_chain_from_the_command_line(toy, tmp_path):
    """lm_pretrain -> critique_sft -> cloud and classic through each stage's final export."""
    from cloud_jax.cli.train import main

    common = [f"data.train_path={toy['train']}", f"data.eval_path={toy['eval']}",
              f"data.tfds_dir={toy['tfds']}", "train.progress_bar=false", "data.num_epochs=16"]
    finals = {}
    for stage, base in (("lm_pretrain", None), ("critique_sft", "lm_pretrain"),
                        ("cloud", "critique_sft"), ("classic", "lm_pretrain")):
        init = finals[base] if base else '""'
        out = tmp_path / stage
        assert main(["--config", str(ROOT / f"configs/tiny_cpu_{stage}.yaml"), *common,
                     f"output_dir={out}", f"init_from={init}"]) == 0
        finals[stage] = str(out / "final")
        exported = json.loads((out / "final" / "config.json").read_text())
        # Models trained on critiques record the prefix they start after; scoring reads it.
        assert exported.get("critique_prefix") == (
            "Critique: " if stage in ("critique_sft", "cloud") else None), stage
    for stage in ("cloud", "classic"):
        assert read_metrics(str(tmp_path / stage), "eval")[-1]["accuracy"] >= 0.95


@pytest.mark.parametrize("override", ["output_dir=ftp://bucket/run", "data.tfds_dir=http://b/tfds",
                                      "init_from=gcs://bucket/sft/final",
                                      "data.train_path=az://b/train.jsonl"])
def test_an_unsupported_url_is_a_config_error_before_anything_is_written(tmp_path, monkeypatch,
                                                                         override):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/tiny_cpu_critique_sft.yaml",
                      [f"output_dir={tmp_path / 'run'}", override])
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError, match=f"{key}={value!r}: unsupported URL scheme"):
        run(cfg)
    assert os.listdir(tmp_path) == []  # no local directory named "ftp:" (or anything else)


def test_an_empty_output_dir_is_a_config_error_before_anything_is_written(toy, tmp_path,
                                                                          monkeypatch):
    # Not the current directory, where a later run would resume from this one's checkpoints.
    monkeypatch.chdir(tmp_path)
    cfg = tiny("lm_pretrain", toy, "", "train.total_steps=1", "train.eval_every=0")
    with pytest.raises(ConfigError, match="output_dir is empty"):
        run(cfg)
    assert os.listdir(tmp_path) == []


def test_a_url_whose_client_is_missing_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)
    cfg = load_config(ROOT / "configs/tiny_cpu_critique_sft.yaml",
                      [f"output_dir={tmp_path / 'run'}", "train.checkpoint_dir=s3://b/ckpt"])
    with pytest.raises(ConfigError, match=r"train.checkpoint_dir='s3://b/ckpt' needs the s3fs "
                                          r"package: pip install 'cloud-jax\[s3\]'"):
        run(cfg)


def test_a_classic_export_says_vanilla_and_reloads_as_classic(toy, tmp_path):
    import cloud_jax

    out = tmp_path / "classic"
    run(tiny("classic", toy, str(out), "train.total_steps=2", "train.eval_every=0"))
    exported = json.loads((out / "final" / "config.json").read_text())
    from cloud_jax.data.config import LAYOUT_VERSION

    assert exported["feedback_method"] == "vanilla"
    assert exported["layout_version"] == LAYOUT_VERSION == 3
    # Trained from scratch: no hub id, so the portable name of the copy beside the weights.
    assert exported["base_model_name_or_path"] == "base_config"
    rm = cloud_jax.load(out / "final")
    assert rm.is_classic
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()[:3]]
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    auto = rm.score(prompts, responses)
    explicit = rm.score(prompts, responses, classic=True)
    assert auto.critiques == [[], [], []]
    np.testing.assert_array_equal(auto.rewards, explicit.rewards)


def test_a_saved_step_exports_as_the_final_step_does(toy, tmp_path):
    """export-hf --checkpoint RUN [--step N]: the newest step of a finished run gives final/'s
    files; an earlier step other weights, from the run's output_dir or its checkpoint directory."""
    from safetensors.numpy import load_file

    import cloud_jax
    from cloud_jax.cli.export import main
    from cloud_jax.errors import CheckpointError

    out = tmp_path / "sft"
    run(tiny("critique_sft", toy, str(out), "train.total_steps=4", "train.checkpoint_every=2",
             "train.keep_checkpoints=3", "train.eval_every=0"))

    def weights(d):
        return load_file(str(d / "model.safetensors"))

    final = weights(out / "final")
    assert main(["--checkpoint", str(out), "--out", str(tmp_path / "newest")]) == 0
    newest = weights(tmp_path / "newest")
    assert newest.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(newest[k], final[k], err_msg=k)
    for name in ("config.json", "tokenizer_config.json"):
        assert (tmp_path / "newest" / name).read_text() == (out / "final" / name).read_text()

    assert main(["--checkpoint", str(out), "--step", "2", "--out", str(tmp_path / "s2")]) == 0
    assert main(["--checkpoint", str(out / "checkpoints"), "--step", "2",
                 "--out", str(tmp_path / "s2b")]) == 0
    s2, s2b = weights(tmp_path / "s2"), weights(tmp_path / "s2b")
    assert all(np.array_equal(s2[k], s2b[k]) for k in final)
    # The checkpoint directory without --step: its newest step, as from the output_dir.
    assert main(["--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "c4")]) == 0
    c4 = weights(tmp_path / "c4")
    assert all(np.array_equal(c4[k], final[k]) for k in final)
    assert not all(np.array_equal(s2[k], final[k]) for k in final)
    rm = cloud_jax.load(tmp_path / "s2")
    assert rm.critique_prefix == "Critique: " and not rm.is_classic

    assert main(["--checkpoint", str(out), "--step", "2", "--format", "backbone",
                 "--out", str(tmp_path / "s2_hf")]) == 0
    assert json.loads((tmp_path / "s2_hf" / "config.json").read_text())["model_type"] == "llama"

    with pytest.raises(CheckpointError, match="no completed checkpoint of step 3; saved steps: "
                                              "2, 4"):
        main(["--checkpoint", str(out), "--step", "3", "--out", str(tmp_path / "s3")])
    with pytest.raises(CheckpointError, match="training run's output_dir.*export-hf --checkpoint"):
        cloud_jax.load(out)

    # A truncated newest checkpoint is an error naming it and the other steps, not a traceback.
    for path in (out / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=r"checkpoints/4 does not read back \(.*saved "
                                              r"steps: 2\)"):
        main(["--checkpoint", str(out), "--out", str(tmp_path / "broken")])


def test_a_resume_after_a_crash_logs_each_step_once_and_uses_the_new_attention_choice(
        toy, tmp_path, caplog):
    """An attempt that died after logging steps it never checkpointed leaves lines the resume
    drops; a changed attention choice is used, not just logged; a train split whose rows changed
    is named; settings that did not change are not reported as changed."""
    import logging
    import shutil

    import yaml

    train = str(tmp_path / "train.jsonl")
    shutil.copy(toy["train"], train)
    out = str(tmp_path / "run")
    common = ["train.total_steps=4", "train.log_every=1", "train.eval_every=0",
              "train.export_final=false", f"data.train_path={train}"]
    run(tiny("classic", toy, out, *common, "train.stop_at_step=2"))
    metrics, throughput = (os.path.join(out, name) for name in ("metrics.jsonl",
                                                               "throughput.jsonl"))
    logged = open(metrics).read()
    # What an attempt killed after step 3, and mid-line, would have left.
    for path in (metrics, throughput):
        with open(path, "a") as f:
            f.write('{"step": 3, "split": "train", "loss": 9.0}\n{"step": 4, "spl')
    with caplog.at_level(logging.WARNING):
        run(tiny("classic", toy, out, *common, "train.stop_at_step=3"))
    assert "changed settings" not in caplog.text  # nothing changed: no (list vs tuple) noise
    steps = [json.loads(line)["step"] for line in open(metrics)]
    assert steps == [1, 2, 3] and open(metrics).read().startswith(logged)
    assert [json.loads(line)["step"] for line in open(throughput)] == [1, 2, 3]
    assert json.loads(open(metrics).read().splitlines()[-1])["loss"] != 9.0

    rows = open(train).read().splitlines(keepends=True)
    with open(train, "w") as f:
        f.writelines(rows[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(tiny("classic", toy, out, *common, "model.decode_attention_impl=auto"))
    assert "model.decode_attention_impl: 'xla' -> 'auto'" in caplog.text
    assert "the train split's rows, or how they are tokenized, changed" in caplog.text
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["model"]["decode_attention_impl"] == "auto"
    assert [json.loads(line)["step"] for line in open(metrics)] == [1, 2, 3, 4]


def test_a_resume_may_change_how_the_step_computes_to_fit_another_slice(toy, tmp_path, caplog):
    """remat and the attention's causal blocks change no array of the train state: a resume on a
    slice with less memory per device may change them (it was refused as a changed model) and
    goes on as the uninterrupted run does."""
    import logging

    import yaml

    common = ["train.total_steps=3", "train.log_every=1", "train.eval_every=0",
              "train.checkpoint_every=0", "train.export_final=false"]
    full = str(tmp_path / "full")
    run(tiny("cloud", toy, full, *common))
    parts = str(tmp_path / "parts")
    run(tiny("cloud", toy, parts, *common, "train.stop_at_step=2"))
    with caplog.at_level(logging.WARNING):
        run(tiny("cloud", toy, parts, *common, "model.remat=full", "model.causal_block_size=32"))
    assert "model.remat: 'none' -> 'full'" in caplog.text
    assert "model.causal_block_size: 128 -> 32" in caplog.text
    saved = yaml.safe_load(open(os.path.join(parts, "config.yaml")))
    assert (saved["model"]["remat"], saved["model"]["causal_block_size"]) == ("full", 32)
    a, b = read_metrics(full), read_metrics(parts)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["batch_digest"] for r in a] == [r["batch_digest"] for r in b]
    assert [r["learning_rate"] for r in a] == [r["learning_rate"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)


@pytest.mark.parametrize("key, old, new, allowed", [
    ("remat", "none", "dots_no_batch", True), ("causal_block_size", 128, 0, True),
    ("dtype", "float32", "bfloat16", True), ("attention_impl", "xla", "cudnn", True),
    # These change the saved arrays: their dtype, or the layers' tree.
    ("param_dtype", "float32", "bfloat16", False), ("scan_layers", False, True, False)])
def test_a_resume_refuses_only_model_keys_that_change_the_saved_state(key, old, new, allowed,
                                                                       caplog):
    import logging

    from cloud_jax.training.checkpointing import compare_configs

    saved, current = {"model": {key: old}}, {"model": {key: new}}
    if not allowed:
        with pytest.raises(ConfigError, match=f"model.{key}"):
            compare_configs(saved, current, "checkpoint 2")
        return
    with caplog.at_level(logging.WARNING):
        compare_configs(saved, current, "checkpoint 2")
    assert f"resuming with changed settings: model.{key}" in caplog.text


@pytest.mark.parametrize("key, old, new, allowed", [
    ("grad_clip_norm", 1.0, 0.5, True), ("grad_clip_norm", 0.0, 2.0, False),
    ("grad_clip_norm", 1.0, 0.0, False), ("grad_clip_norm", None, 0.0, False),
    ("mu_dtype", "float32", "bfloat16", False), ("mu_dtype", None, "float32", True),
    ("decay_norms_and_biases", True, False, False), ("learning_rate", 1e-3, 2e-3, True)])
def test_a_resume_refuses_optimizer_keys_that_change_the_saved_state(key, old, new, allowed,
                                                                      caplog):
    """Another moment dtype, weight-decay mask or clipping on/off has other optimizer-state
    arrays than the checkpoint: a config error naming the key, not a checkpoint that "does not
    fit the model" or "does not read back" (None: a checkpoint written before the key existed,
    which had its default)."""
    import logging

    from cloud_jax.training.checkpointing import compare_configs

    saved = {"optim": {"b1": 0.9, **({} if old is None else {key: old})}}
    current = {"optim": {"b1": 0.9, key: new}}
    if not allowed:
        with pytest.raises(ConfigError, match=f"optim.{key}: .*shapes the optimizer state"):
            compare_configs(saved, current, "checkpoint 2")
        return
    with caplog.at_level(logging.WARNING):
        compare_configs(saved, current, "checkpoint 2")
    assert ("resuming with changed settings" in caplog.text) == (old is not None)


def test_a_resume_with_another_weight_decay_mask_is_a_config_error_naming_it(toy, tmp_path):
    common = ["train.total_steps=3", "train.log_every=1", "train.eval_every=0",
              "train.checkpoint_every=0", "train.export_final=false"]
    out = str(tmp_path / "run")
    run(tiny("classic", toy, out, *common, "train.stop_at_step=1"))
    with pytest.raises(ConfigError, match="optim.decay_norms_and_biases: True -> False"):
        run(tiny("classic", toy, out, *common, "optim.decay_norms_and_biases=false"))
    assert os.listdir(os.path.join(out, "checkpoints")) == ["1"]  # kept, not set aside


@pytest.mark.parametrize("key, old, new", [("data.seed", 0, 1), ("data.shuffle", True, False),
                                            ("data.drop_remainder", False, True)])
def test_a_resume_in_another_data_order_says_pairs_may_repeat_or_be_skipped(key, old, new,
                                                                             caplog):
    """The saved data position is a batch number: another order goes on at that number, so the
    pairs of the current epoch are not each read once (it was only listed as a changed
    setting)."""
    import logging

    from cloud_jax.training.checkpointing import compare_configs

    section, name = key.split(".")
    with caplog.at_level(logging.WARNING):
        compare_configs({section: {name: old}}, {section: {name: new}}, "checkpoint 2")
    assert (f"checkpoint 2: {key} changed, so the train split's batches may hold other pairs"
            in caplog.text)
    assert "may be read twice or not at all" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        compare_configs({"data": {"num_epochs": 1}}, {"data": {"num_epochs": 2}}, "checkpoint 2")
    assert "read twice" not in caplog.text  # more epochs: the same batches, then more


def test_a_resume_with_another_batch_size_says_how_to_keep_it_on_another_slice():
    from cloud_jax.training.checkpointing import compare_configs

    with pytest.raises(ConfigError, match=r"data.batch_pairs: 16 -> 8\). Resume with the same "
                                          r"settings \(.*keep it and change "
                                          r"train.grad_accum_steps or the mesh\)"):
        compare_configs({"data": {"batch_pairs": 16}}, {"data": {"batch_pairs": 8}},
                        "checkpoint 2")


def test_init_from_takes_the_checkpoints_architecture_and_says_what_it_overrides(
        toy, tmp_path, caplog):
    import logging

    import cloud_jax

    base = tiny("critique_sft", toy, str(tmp_path / "unused"))
    init = str(tmp_path / "init")
    cloud_jax.from_config(base.model, seed=1).save_pretrained(init)
    for override, key in (("model.head_dim=32", "head_dim: config 32, checkpoint 16"),
                          # A llama with q/k/v bias is refused before init_from is read: the
                          # bias is Qwen2's, and such a model would not export as a llama.
                          ("model.attention_bias=true", "attention_bias=true with model.family"),
                          ("model.sliding_window=4", "sliding-window attention is Mistral's")):
        with pytest.raises(ConfigError, match=key):
            run(tiny("critique_sft", toy, str(tmp_path / "bad"), f"init_from={init}", override,
                     "train.total_steps=1"))
    out = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        run(tiny("critique_sft", toy, out, f"init_from={init}", "model.rope_theta=500000",
                 "train.total_steps=1", "train.eval_every=0", "train.export_final=false"))
    assert "rope_theta: config 500000.0, checkpoint 10000.0" in caplog.text
    assert "bos_token_id" not in caplog.text  # left at None in the model section: not given


def test_a_max_length_past_the_models_positions_is_refused(toy, tmp_path):
    """data.max_length above model.max_position_embeddings (the model section's, or the
    init_from checkpoint's) is a ConfigError naming both, before anything is built or written."""
    import dataclasses

    import cloud_jax

    out = tmp_path / "long"
    with pytest.raises(ConfigError) as err:
        run(tiny("cloud", toy, str(out), "data.max_length=2048", "train.total_steps=1"))
    assert "data.max_length=2048 is more than model.max_position_embeddings=1024" in str(err.value)
    assert "raise model.max_position_embeddings" in str(err.value)
    assert not out.exists()
    base = tiny("critique_sft", toy, str(tmp_path / "unused"))
    init = str(tmp_path / "init")
    cloud_jax.from_config(dataclasses.replace(base.model, max_position_embeddings=64),
                          seed=1).save_pretrained(init)
    with pytest.raises(ConfigError, match=r"data.max_length=96 is more than "
                                          r"model.max_position_embeddings=64 \(init_from="):
        run(tiny("critique_sft", toy, str(tmp_path / "b"), f"init_from={init}",
                 "train.total_steps=1"))
    assert not (tmp_path / "b" / "config.yaml").exists()


def test_a_cloud_run_trains_after_the_prefix_and_layout_its_init_from_export_records(
        toy, tmp_path, caplog):
    """A critique_sft export records data.critique_prefix and data.layout_version; a cloud run
    from it that leaves those keys at their defaults trains (and exports) with the recorded ones,
    as scoring and stage 2 read that model. A value the run sets otherwise is kept and warned of,
    naming both values and the key."""
    import dataclasses
    import logging

    import yaml

    import cloud_jax
    from cloud_jax.data.config import CRITIQUE_PREFIX, LAYOUT_VERSION

    base = tiny("critique_sft", toy, str(tmp_path / "unused"))
    init = tmp_path / "sft_final"
    cloud_jax.from_config(base.model, seed=1).save_pretrained(str(init))
    config = json.loads((init / "config.json").read_text())
    config.update(critique_prefix="Judge: ", layout_version=2)
    (init / "config.json").write_text(json.dumps(config))

    out = tmp_path / "cloud"
    # The default prefix is ~100 bytes: room for the rows, were it (wrongly) the one used.
    cfg = tiny("cloud", toy, str(out), f"init_from={init}", "train.total_steps=1",
               "train.eval_every=0", "data.max_length=288", "data.eval_path=")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, critique_prefix=CRITIQUE_PREFIX, layout_version=LAYOUT_VERSION))
    assert LAYOUT_VERSION != 2
    run(cfg)
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (saved["critique_prefix"], saved["layout_version"]) == ("Judge: ", 2)
    exported = json.loads((out / "final" / "config.json").read_text())
    assert (exported["critique_prefix"], exported["layout_version"]) == ("Judge: ", 2)

    # Set to another value: kept (as --critique-prefix is when scoring), and named.
    from cloud_jax.training.loop import follow_init_from

    cfg = tiny("cloud", toy, str(tmp_path / "other"), f"init_from={init}")
    assert cfg.data.critique_prefix == "Critique: "
    with caplog.at_level(logging.WARNING):
        kept = follow_init_from(cfg)
    assert kept.data.critique_prefix == "Critique: " and kept.data.layout_version == 2
    assert ("data.critique_prefix='Critique: ', but init_from=" in caplog.text
            and "set data.critique_prefix='Judge: '" in caplog.text), caplog.text
    # classic reads no critiques: nothing to follow.
    classic = tiny("classic", toy, str(tmp_path / "classic"), f"init_from={init}")
    assert follow_init_from(classic) == classic


def test_init_from_a_qwen2_checkpoint_implies_its_bias_and_warns_only_of_keys_set(
        toy, tmp_path, caplog):
    """A qwen2 model section need not say attention_bias: true (the family has it); keys left at
    their defaults (rope_theta, max_position_embeddings, rms_norm_eps) take the checkpoint's
    values without a warning, and a key the section sets otherwise is still named."""
    import dataclasses
    import logging

    import cloud_jax
    from cloud_jax.training.loop import _initial_params

    base = tiny("critique_sft", toy, str(tmp_path / "unused"), "model.family=qwen2")
    assert not base.model.attention_bias
    ckpt = dataclasses.replace(base.model, attention_bias=True, rope_theta=1e6, rms_norm_eps=1e-6,
                               max_position_embeddings=4096)
    init = str(tmp_path / "init")
    cloud_jax.from_config(ckpt, seed=1).save_pretrained(init)
    cfg = tiny("critique_sft", toy, str(tmp_path / "run"), "model.family=qwen2",
               "model.max_position_embeddings=2048", f"init_from={init}")
    with caplog.at_level(logging.WARNING):
        params, model_cfg = _initial_params(cfg, None)
    assert model_cfg.attention_bias and "bias" in params["layers_0"]["attn"]["q_proj"]
    assert model_cfg.rope_theta == 1e6 and model_cfg.max_position_embeddings == 4096
    assert "rope_theta" not in caplog.text and "rms_norm_eps" not in caplog.text
    # tiny_cpu.yaml sets 1024 (not the default 2048), so this override is a key the run sets.
    caplog.clear()
    cfg = tiny("critique_sft", toy, str(tmp_path / "run"), "model.family=qwen2",
               f"init_from={init}")
    with caplog.at_level(logging.WARNING):
        _initial_params(cfg, None)
    assert "max_position_embeddings: config 1024, checkpoint 4096" in caplog.text


def test_eval_reads_the_whole_split_and_a_split_without_a_full_batch_is_a_config_error(
        toy, tmp_path):
    summary = run(tiny("classic", toy, str(tmp_path / "a"), "data.batch_pairs=24",
                       "data.drop_remainder=true", "train.total_steps=1", "train.eval_every=1",
                       "train.export_final=false"))
    assert summary["eval"]["pairs"] == 32  # not the 24 of one full batch
    small = tmp_path / "small.jsonl"
    small.write_text("".join(open(toy["train"]).read().splitlines(keepends=True)[:5]))
    for steps in ("0", "1"):
        with pytest.raises(ConfigError, match="no full batch of data.batch_pairs=16 with "
                                              "data.drop_remainder=true"):
            run(tiny("classic", toy, str(tmp_path / "b"), f"data.train_path={small}",
                     "data.drop_remainder=true", f"train.total_steps={steps}"))
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


@pytest.mark.parametrize("override,message", [
    ("model.attention_impl=cudnn", "model.attention_impl=cudnn runs on NVIDIA GPUs only"),
    ("data.rejects_path=foo://bucket/rejects.jsonl", "data.rejects_path='foo://bucket/rejects"),
    # Mesh sizes that make no mesh of this machine's devices (a traceback before).
    ("mesh.data=64", r"data\*fsdp\*tensor = 64 but \d+ devices are present"),
    ("mesh.fsdp=0", r"mesh.fsdp=0: an axis size is >= 1, or -1"),
    ("mesh.tensor=-3", r"mesh.tensor=-3: an axis size is >= 1, or -1"),
])
def test_settings_this_machine_cannot_run_are_config_errors_before_training(
        toy, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(tiny("classic", toy, str(tmp_path / "run"), override, "model.dtype=bfloat16",
                 "data.lenient=true"))


def test_throughput_leaves_out_the_time_a_checkpoint_save_blocks(toy, tmp_path, monkeypatch):
    # Like an evaluation, a save is no step's work: a window after a slow save (a synchronous
    # one, a slow bucket) must not report the steps as slower by the save's duration.
    import time

    from cloud_jax.training import checkpointing

    save = checkpointing.Checkpointer.save

    def slow_save(self, *args, **kwargs):
        time.sleep(5.0)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", slow_save)
    out = str(tmp_path / "slow_save")
    run(tiny("critique_sft", toy, out, "train.total_steps=4", "train.log_every=1",
             "train.checkpoint_every=2", "train.eval_every=0", "train.export_final=false"))
    with open(os.path.join(out, "throughput.jsonl")) as f:
        timing = [json.loads(line) for line in f]
    tokens = {r["step"]: r["tokens"] for r in read_metrics(out)}
    assert [t["step"] for t in timing] == [1, 2, 3, 4]
    # Step 3's window starts as the save of step 2 does; a step of this model takes well under
    # a second.
    assert tokens[3] / timing[2]["tokens_per_s"] < 2.5, timing
