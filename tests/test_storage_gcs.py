"""gs:// everywhere, against a real storage server (fake-gcs-server on 127.0.0.1, tests/storage_emulators.py):
the storage calls, a training run that is preempted and resumes from the bucket, the corrupt
checkpoint fall-back, the export loaded back from the bucket, and stage-2 shards written to the
bucket and resumed."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from storage_emulators import denying_gcs, gcs_emulator, gcs_fs
from test_reliability import COMMON, TRAINER, wait_for

from cloud_jax import storage
from cloud_jax.data.synthetic.toy import write_toy_data
from cloud_jax.errors import PREEMPTED_EXIT_CODE
from cloud_jax.training.config import load_config
from cloud_jax.training.loop import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bucket():
    with gcs_emulator() as url:
        yield url


@pytest.fixture(scope="module")
def toy(tmp_path_factory, bucket):
    """The toy rows in the bucket, and a copy on local disk for the local reference runs."""
    base = tmp_path_factory.mktemp("toy")
    train, eval_ = write_toy_data(str(base / "data"), n_train=64, n_eval=8)
    storage.copy_file(train, f"{bucket}/data/train.jsonl")
    return {"train": train, "gs_train": f"{bucket}/data/train.jsonl",
            "tfds": str(base / "tfds")}


def overrides(out, train, tfds, *extra):
    return [f"data.train_path={train}", "data.eval_path=\"\"", f"data.tfds_dir={tfds}",
            f"output_dir={out}", "init_from=\"\"", "train.progress_bar=false", *COMMON, *extra]


def tiny(out, train, tfds, *extra):
    return load_config(ROOT / "configs/tiny_cpu_cloud.yaml", overrides(out, train, tfds, *extra))


def train_metrics(path):
    """The last row written for each train step of a metrics file (local or in the bucket)."""
    rows = {}
    for line in storage.read_text(path).splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            rows[row["step"]] = row
    return rows


def test_storage_calls_against_the_emulator(bucket, tmp_path):
    base = f"{bucket}/calls"
    storage.write_text_atomic(f"{base}/a/x.txt", "one")
    storage.write_text_atomic(f"{base}/a/y.txt", "two")
    assert storage.exists(f"{base}/a/x.txt") and storage.isdir(f"{base}/a")
    assert not storage.exists(f"{base}/b") and storage.listdir(f"{base}/b") == []
    assert storage.listdir(f"{base}/a") == ["x.txt", "y.txt"]
    assert storage.glob(f"{base}/a/*.txt") == [f"{base}/a/x.txt", f"{base}/a/y.txt"]
    # Append on an object store: the whole object is rewritten, earlier text kept.
    log = storage.AppendText(f"{base}/log.jsonl")
    log.write("1\n")
    log.write("2\n")
    log.close()
    storage.AppendText(f"{base}/log.jsonl").write("3\n")
    assert storage.read_text(f"{base}/log.jsonl") == "1\n2\n3\n"
    storage.rename(f"{base}/a", f"{base}/moved")
    assert storage.listdir(f"{base}/moved") == ["x.txt", "y.txt"] and not storage.exists(
        f"{base}/a/x.txt")
    # A remote directory staged on local disk; reused while unchanged, fetched again if changed.
    local = storage.local_copy(f"{base}/moved")
    assert Path(local, "x.txt").read_text() == "one"
    storage.write_text_atomic(f"{base}/moved/x.txt", "changed")
    assert Path(storage.local_copy(f"{base}/moved"), "x.txt").read_text() == "changed"
    with pytest.raises(FileNotFoundError):
        storage.local_copy(f"{base}/nothing")
    storage.remove_tree(f"{base}/moved")
    assert not storage.exists(f"{base}/moved/x.txt") and storage.listdir(f"{base}/moved") == []
    storage.remove_tree(f"{base}/moved")  # gone already: nothing to do


def test_a_run_in_the_bucket_is_preempted_resumes_to_the_same_losses_and_exports(
        toy, bucket, tmp_path, caplog):
    out = f"{bucket}/run"
    gs_tfds = f"{bucket}/tfds"
    steps = ["train.total_steps=16", "train.checkpoint_every=0",
             "train.tensorboard_dir=tensorboard"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", RELIABILITY_SLOW_STEP="0.2")
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER, "--config", str(ROOT / "configs/tiny_cpu_cloud.yaml"),
         # Uploads every second: lines reach the bucket while it runs (the wait below), and
         # those after the last upload only with the preemption's checkpoint.
         *overrides(out, toy["gs_train"], gs_tfds, *steps, "train.metrics_upload_every_s=1")],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = f"{out}/metrics.jsonl"
    wait_for(lambda: storage.exists(metrics) and len(storage.read_text(metrics).splitlines()) >= 3,
             proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    stopped = json.loads(stdout.strip().splitlines()[-1])["step"]
    assert 3 <= stopped < 16
    # The checkpoint is in the bucket with orbax's commit marker; nothing went to local disk.
    assert storage.listdir(f"{out}/checkpoints") == [str(stopped)]
    assert storage.exists(f"{out}/checkpoints/{stopped}/commit_success.txt")
    assert storage.exists(f"{out}/config.yaml")
    assert storage.listdir(f"{out}/tensorboard"), "TensorBoard events were not uploaded"
    # The tokenized dataset went to the bucket's cache, complete.
    assert storage.glob(f"{gs_tfds}/cloud_pairs/*/*/cloud_jax_uploaded")

    with caplog.at_level(logging.INFO):
        summary = run(tiny(out, toy["gs_train"], gs_tfds, *steps, "train.export_final=true"))
    assert f"resumed from {out}/checkpoints step {stopped}" in caplog.text
    assert summary["step"] == 16 and summary["final_dir"] == f"{out}/final"

    full = str(tmp_path / "full")
    run(tiny(full, toy["train"], toy["tfds"], *steps, "train.export_final=true"))
    a, b = train_metrics(f"{full}/metrics.jsonl"), train_metrics(metrics)
    assert sorted(b) == list(range(1, 17))
    for step in range(1, 17):
        for key in ("loss", "batch_digest", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)

    import cloud_jax

    rm = cloud_jax.load(f"{out}/final")
    reference = cloud_jax.load(f"{full}/final")
    prompts, responses = ["What is 2+2?", "Name a colour."], ["4.", "Blue."]
    got = rm.score(prompts, responses, max_critique_tokens=8)
    want = reference.score(prompts, responses, max_critique_tokens=8)
    np.testing.assert_allclose(got.rewards, want.rewards, atol=1e-5)
    assert got.critiques == want.critiques
    assert rm.base_model_name_or_path is None  # trained from scratch: nothing to point at


def test_a_run_in_the_bucket_uploads_its_metrics_on_a_cadence_and_at_each_checkpoint(
        toy, bucket, tmp_path, monkeypatch):
    # log_every=1 (as the 8B and 70B configs): the metrics objects and the TensorBoard events are
    # not written again at every logged step (the store allows one write per second to an
    # object), only every train.metrics_upload_every_s (30 s by default), before each checkpoint
    # (every line up to the saved step is in the bucket then) and at the end, an error's too.
    from cloud_jax.training import checkpointing, metrics as metrics_module

    out = f"{bucket}/cadence"
    metrics, throughput = f"{out}/metrics.jsonl", f"{out}/throughput.jsonl"
    writes, uploads, at_save = [], [], {}
    put, upload, save = storage._put_object, storage.upload_dir, checkpointing.Checkpointer.save
    monkeypatch.setattr(storage, "_put_object",
                        lambda url, data: (writes.append(url), put(url, data))[1])
    monkeypatch.setattr(storage, "upload_dir",
                        lambda *a, **k: (uploads.append(a[1]), upload(*a, **k))[1])

    def saving(self, step, *args, **kwargs):
        at_save[step] = (sorted(train_metrics(metrics)), sorted(train_metrics(throughput)),
                         storage.listdir(f"{out}/tensorboard"))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", saving)
    write = metrics_module.MetricsWriter.write

    def failing_after_step_6(self, step, *args, **kwargs):
        write(self, step, *args, **kwargs)
        if step == 6:
            raise RuntimeError("stopped after step 6")

    monkeypatch.setattr(metrics_module.MetricsWriter, "write", failing_after_step_6)
    cfg = tiny(out, toy["train"], toy["tfds"], "train.total_steps=8", "train.checkpoint_every=4",
               "train.tensorboard_dir=tensorboard", f"train.checkpoint_dir={tmp_path / 'ckpt'}")
    with pytest.raises(RuntimeError, match="stopped after step 6"):
        run(cfg)
    assert at_save.keys() == {4}
    assert at_save[4][:2] == ([1, 2, 3, 4], [1, 2, 3, 4]) and at_save[4][2]
    # Everything logged before the error reached the bucket when the run closed its files.
    assert sorted(train_metrics(metrics)) == sorted(train_metrics(throughput)) == list(range(1, 7))
    # Six logged steps within the cadence: the first, the checkpoint's and the end's uploads.
    assert writes.count(metrics) <= 3 and writes.count(throughput) <= 3, writes
    assert uploads.count(f"{out}/tensorboard") <= 3, uploads


def _truncate_remote_arrays(step_dir):
    fs = gcs_fs()
    inner = step_dir.removeprefix("gs://")
    for name in fs.find(f"{inner}/state"):
        if name.rsplit("/", 2)[-2] == "d":
            data = fs.cat_file(name)
            fs.pipe_file(name, data[: len(data) // 2])


def test_a_truncated_checkpoint_in_the_bucket_falls_back_with_a_log(toy, bucket, caplog):
    out = f"{bucket}/two"
    steps = ["train.total_steps=6", "train.checkpoint_every=2"]
    run(tiny(out, toy["train"], toy["tfds"], *steps, "train.stop_at_step=4"))
    assert storage.listdir(f"{out}/checkpoints") == ["2", "4"]
    _truncate_remote_arrays(f"{out}/checkpoints/4")
    with caplog.at_level(logging.INFO):
        summary = run(tiny(out, toy["train"], toy["tfds"], *steps))
    bad = f"{out}/checkpoints/4"
    assert any(r.levelno == logging.ERROR and bad in r.getMessage()
               and "falling back" in r.getMessage() for r in caplog.records), caplog.text
    assert f"resumed from {out}/checkpoints step 2" in caplog.text
    assert summary["step"] == 6
    listed = storage.listdir(f"{out}/checkpoints")
    assert listed[:2] == ["4", "6"] and listed[2].startswith("unusable.4."), listed


def test_a_config_change_is_refused_in_the_bucket_as_on_disk(toy, bucket):
    from cloud_jax.errors import ConfigError

    out = f"{bucket}/changed"
    run(tiny(out, toy["train"], toy["tfds"], "train.total_steps=4", "train.stop_at_step=2"))
    with pytest.raises(ConfigError, match="different config .*data.batch_pairs"):
        run(tiny(out, toy["train"], toy["tfds"], "train.total_steps=4", "data.batch_pairs=4"))


@pytest.fixture(scope="module")
def model_and_rows(bucket, tmp_path_factory):
    """A tiny random model saved straight to the bucket, and five preference rows there and on
    local disk."""
    from model_helpers import tiny_reward_model

    model = f"{bucket}/models/sft"
    saved = tiny_reward_model(2).save_pretrained(model)
    assert saved == model and storage.exists(f"{model}/config.json")
    rows = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    rows.write_text("".join(json.dumps(
        {"id": f"r{i}", "prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}",
         "chosen_feedback": "old", "rejected_feedback": "old"}) + "\n" for i in range(5)))
    storage.copy_file(str(rows), f"{bucket}/rows.jsonl")
    return model, rows


def test_score_and_evaluate_read_and_write_the_bucket(model_and_rows, bucket, tmp_path):
    from cloud_jax.cli import evaluate, score
    from cloud_jax.cli.common import run_command

    model, rows = model_and_rows
    common = ["--checkpoint", model, "--max-critique-tokens", "4", "--batch-size", "4"]
    assert run_command(score.main, [*common, "--input", f"{bucket}/rows.jsonl", "--output",
                                    f"{bucket}/scored.jsonl"]) == 0
    assert run_command(score.main, [*common, "--input", str(rows), "--output",
                                    str(tmp_path / "scored.jsonl")]) == 0
    assert storage.read_text(f"{bucket}/scored.jsonl") == (tmp_path / "scored.jsonl").read_text()
    out = f"{bucket}/eval"
    assert run_command(evaluate.main, [*common, "--input", f"{bucket}/rows.jsonl",
                                       "--output-dir", out, "--no-progress"]) == 0
    names = storage.listdir(out)
    assert {"report.json", "report.md", "critiques.jsonl"} <= set(names), names
    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert report["rewardbench"]["num_rows"] == 5
    assert len(storage.read_text(f"{out}/critiques.jsonl").splitlines()) == 5
    # An output that names the bucket or a directory in it is refused before any scoring.
    for output in (bucket, f"{bucket}/", f"{bucket}/eval", f"{bucket}/eval/new/"):
        assert run_command(score.main, [*common, "--input", f"{bucket}/rows.jsonl",
                                        "--output", output]) == 2, output


def test_stage_2_writes_its_shards_to_the_bucket_and_resumes(model_and_rows, bucket, tmp_path,
                                                              monkeypatch):
    from cloud_jax.cli import critique
    from cloud_jax.cli.common import run_command
    from cloud_jax.data.schema import load_rows
    from cloud_jax.scoring import relabel

    model, _ = model_and_rows

    def cmd(out):
        return ["--checkpoint", model, "--input", f"{bucket}/rows.jsonl", "--output", out,
                "--shard-rows", "2", "--batch-size", "4", "--max-critique-tokens", "5"]

    local = tmp_path / "local"
    assert run_command(critique.main, cmd(str(local))) == 0
    out = f"{bucket}/critiques"
    real_write, calls = relabel.write_jsonl_atomic, []

    def write_then_die(path, objs):
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        real_write(path, objs)

    monkeypatch.setattr(relabel, "write_jsonl_atomic", write_then_die)
    assert run_command(critique.main, cmd(out)) == 130  # Ctrl-C
    monkeypatch.setattr(relabel, "write_jsonl_atomic", real_write)
    assert [n for n in storage.listdir(out) if n.endswith(".jsonl")] == [
        "critiques-00000-of-00003.jsonl"]
    # The shard written does not pass for the data set.
    with pytest.raises(FileNotFoundError, match="2 of the 3 shards"):
        load_rows(f"{out}/critiques-*.jsonl", require_feedback=True)
    assert run_command(critique.main, cmd(out)) == 0
    names = sorted(p.name for p in local.iterdir())
    assert storage.listdir(out) == names
    for name in names:
        if name != "provenance.json":
            assert storage.read_text(f"{out}/{name}") == (local / name).read_text(), name
    # The shards in the bucket are what the cloud stage reads.
    loaded = load_rows(f"{out}/critiques-*.jsonl", require_feedback=True).rows
    assert [r.id for r in loaded] == [f"r{i}" for i in range(5)]
    prov = json.loads(storage.read_text(f"{out}/provenance.json"))
    assert prov["checkpoint"] == model and prov["input"] == [f"{bucket}/rows.jsonl"]


def test_a_hugging_face_dataset_directory_in_the_bucket_is_a_row_source(bucket, tmp_path):
    datasets = pytest.importorskip("datasets")
    from cloud_jax.data.schema import RowError, load_rows

    local = tmp_path / "prefs"
    rows = [{"id": f"r{i}", "question": f"What is {i}+1?", "chosen": f"{i + 1}.",
             "rejected": f"{i + 2}." if i != 2 else ""} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(local))
    url = f"{bucket}/datasets/prefs"
    storage.upload_dir(str(local), url)
    loaded = load_rows(url, require_feedback=False, columns={"prompt": "question"}, lenient=True)
    assert [r.id for r in loaded.rows] == ["r0", "r1"] and loaded.rows[1].prompt == "What is 1+1?"
    with pytest.raises(RowError, match=rf"{url}:train\[row 2\]: field 'rejected': is empty"):
        load_rows(url, require_feedback=False, columns={"prompt": "question"})


def test_an_export_over_an_earlier_sharded_one_in_the_bucket_loads_the_new_weights(
        bucket, tmp_path, capsys):
    """As on disk, the index and shards of an earlier (larger) save do not outlive a new save
    into the same bucket directory; and a backbone export to the bucket lands in the bucket."""
    import jax

    import cloud_jax
    from cloud_jax.checkpoints import hf as hf_io
    from cloud_jax.cli import export
    from cloud_jax.cli.common import run_command
    from model_helpers import TINY, tiny_reward_model

    old, new = tiny_reward_model(1), tiny_reward_model(2)
    url = f"{bucket}/models/resaved"
    old.save_pretrained(url)
    with storage.staged_output(url) as local:  # the old model as a large one: shards, an index
        hf_io.write_safetensors(hf_io.hf_state_dict(old.params, TINY, with_head=True,
                                                    hf_prefix=hf_io.REWARD_PREFIX), Path(local),
                                max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in storage.listdir(url)
    new.save_pretrained(url)
    assert [n for n in storage.listdir(url) if n.startswith("model")] == ["model.safetensors"]
    back = cloud_jax.load(url)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    backbone = f"{bucket}/models/backbone"
    assert run_command(export.main, ["--checkpoint", url, "--out", backbone,
                                     "--format", "backbone"]) == 0
    assert f"wrote {backbone}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        storage.listdir(backbone))
    assert not os.path.exists("gs:")


def test_an_export_over_an_earlier_one_in_the_bucket_removes_its_chat_template(bucket):
    """As on disk: a tokenizer without a chat template uploads none, so an earlier export's
    chat_template.jinja would be read back as the new model's template."""
    import cloud_jax
    from cloud_jax.data.tokenizer import byte_tokenizer
    from model_helpers import tiny_reward_model

    plain = byte_tokenizer()
    plain.chat_template = None
    url = f"{bucket}/models/no_template"
    tiny_reward_model(1).save_pretrained(url)
    storage.write_text_atomic(f"{url}/additional_chat_templates/tool_use.jinja", "{{ 'old' }}")
    assert "chat_template.jinja" in storage.listdir(url)
    old = tiny_reward_model(2)
    cloud_jax.RewardModel(old.config, old.params, plain).save_pretrained(url)
    assert {"chat_template.jinja", "additional_chat_templates"}.isdisjoint(storage.listdir(url))
    assert "tokenizer.json" in storage.listdir(url)


def test_a_dataset_built_into_the_bucket_writes_its_rejects_once(bucket, tmp_path,
                                                                   monkeypatch):
    """An object cannot be appended to: the rejects of a lenient build into a gs:// tfds_dir
    were rewritten whole for every bad row (each rewrite as long as all before it, and the store
    takes about one write of an object a second). They are written locally and the file
    copied to the bucket once the split is read, every bad row in it."""
    from test_data_schema import _jsonl, _row, _trimming_byte_tokenizer

    from cloud_jax.data.config import DataConfig
    from cloud_jax.data.tfds_builder import prepare_dataset

    monkeypatch.setenv("CLOUD_JAX_CACHE", str(tmp_path / "cache"))
    rows = [_row(0), *(_row(i, chosen=i) for i in range(1, 5)),
            _row(5, chosen="2.", rejected=" 2.\n"), _row(6)]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    writes = []
    put = storage._put_object
    monkeypatch.setattr(storage, "_put_object",
                        lambda url, data: (writes.append(url), put(url, data))[1])
    cfg = DataConfig(train_path=path, max_length=96, critique_prefix="C: ", lenient=True,
                     tfds_dir=f"{bucket}/tfds_rejects")
    stats = prepare_dataset(cfg, _trimming_byte_tokenizer(), "critique").stats["train"]
    url = stats["rejects_path"]
    assert url.startswith(f"{bucket}/tfds_rejects/") and url.endswith("rejects-train.jsonl")
    assert (stats["rejected_rows"], stats["pairs"]) == (5, 2)
    records = [json.loads(line) for line in storage.read_text(url).splitlines()]
    assert [r["line"] for r in records] == [2, 3, 4, 5, 6]
    assert writes.count(url) == 1, writes


def test_convert_gguf_writes_a_url_output_to_the_bucket(bucket, tmp_path, capsys):
    from test_gguf import write_tiny_llama_gguf

    from cloud_jax.cli import convert
    from cloud_jax.cli.common import run_command

    write_tiny_llama_gguf(tmp_path / "m.gguf")
    out = f"{bucket}/converted"
    assert run_command(convert.main, ["--gguf", str(tmp_path / "m.gguf"), "--out", out]) == 0
    assert f"uploaded to {out}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(storage.listdir(out))
    assert not os.path.exists("gs:")


def test_convert_gguf_over_a_url_output_removes_an_earlier_chat_template(bucket, tmp_path):
    """As on disk: a chat_template.jinja an earlier model left there would be read before the
    converted model's template."""
    from test_gguf import write_tiny_llama_gguf

    from cloud_jax.cli import convert
    from cloud_jax.cli.common import run_command

    write_tiny_llama_gguf(tmp_path / "m.gguf")
    out = f"{bucket}/converted_over"
    storage.write_text_atomic(f"{out}/chat_template.jinja", "{{ 'another model' }}")
    assert run_command(convert.main, ["--gguf", str(tmp_path / "m.gguf"), "--out", out,
                                      "--overwrite"]) == 0
    assert "chat_template.jinja" not in storage.listdir(out)
    assert "config.json" in storage.listdir(out)


def test_make_benchmark_writes_every_file_to_the_bucket(bucket, tmp_path, monkeypatch):
    from cloud_jax.cli import make_benchmark
    from cloud_jax.cli.common import run_command

    monkeypatch.chdir(tmp_path)  # where a URL taken for a local path would land
    out = f"{bucket}/benchmarks/small"
    assert run_command(make_benchmark.main, ["--out", out, "--train", "4", "--eval", "2",
                                             "--test", "2"]) == 0
    assert not (tmp_path / "gs:").exists()
    assert storage.listdir(out) == ["benchmark.json", "eval.jsonl", "test.jsonl", "train.jsonl"]
    summary = json.loads(storage.read_text(f"{out}/benchmark.json"))
    assert summary["splits"]["train"] == {**summary["splits"]["train"],
                                          "path": f"{out}/train.jsonl", "rows": 4}


def test_a_write_into_a_missing_bucket_names_the_bucket(bucket, tmp_path):
    (tmp_path / "a.txt").write_text("a")
    for write in (lambda: storage.write_text_atomic("gs://no-such-bucket/out/x.jsonl", "x"),
                  lambda: storage.upload_dir(str(tmp_path), "gs://no-such-bucket/out")):
        with pytest.raises(FileNotFoundError, match="no bucket 'no-such-bucket'"):
            write()
    # A read names it too (gcsfs says only its request path, b/no-such-bucket/o).
    import cloud_jax
    from cloud_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint there .*no bucket 'no-such-bucket'"):
        cloud_jax.load("gs://no-such-bucket/model")


def test_a_glob_or_a_read_that_finds_no_bucket_or_object_names_the_url(bucket):
    from cloud_jax.data.schema import expand_paths

    # gcsfs says only its request path (b/no-such-bucket/o, b/bucket/o/absent.txt).
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/.*no bucket 'no-such-bucket'"):
        storage.glob("gs://no-such-bucket/data/*.jsonl")
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/.*no bucket 'no-such-bucket'"):
        expand_paths("gs://no-such-bucket/data/*.jsonl")
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/x.txt"):
        storage.read_text("gs://no-such-bucket/x.txt")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/absent.txt: no such object"):
        storage.read_text(f"{bucket}/absent.txt")


def test_a_copy_stopped_part_way_leaves_what_the_destination_held(bucket, tmp_path,
                                                                  monkeypatch):
    """A stop while the source is read (SIGTERM raising Preempted, Ctrl-C) never leaves the
    destination holding a prefix of the source that reads as the whole file."""
    from cloud_jax.errors import Preempted

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(f'{{"row": {i}}}\n' for i in range(100_000)))
    real_open = storage.open_file

    def stopping_open(path, mode="r"):
        f = real_open(path, mode)
        if os.fspath(path) == str(src):
            reads = iter(range(1_000_000))
            real_read = f.read

            def read(size=-1):
                # The third chunk of a streamed copy, or a read of the whole file.
                if next(reads) == 2 or size is None or size < 0:
                    raise Preempted("stopped by SIGTERM")
                return real_read(size)

            f.read = read
        return f

    monkeypatch.setattr(storage, "open_file", stopping_open)
    for dst in (f"{bucket}/copy/rows.jsonl", str(tmp_path / "copy.jsonl")):
        storage.write_text_atomic(dst, "old\n")
        with pytest.raises(Preempted):
            storage.copy_file(str(src), dst)
        assert storage.read_text(dst) == "old\n", dst
    monkeypatch.setattr(storage, "open_file", real_open)
    for dst in (f"{bucket}/copy/rows.jsonl", str(tmp_path / "copy.jsonl")):
        storage.copy_file(str(src), dst)
        assert storage.read_text(dst) == src.read_text(), dst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.jsonl", "rows.jsonl"]


def test_an_upload_that_fails_part_way_never_leaves_a_new_config_beside_old_weights(
        bucket, monkeypatch):
    """config.json goes last (and the earlier one first): an export whose upload stops part-way
    is the earlier export whole, or a directory without config.json that no load takes for a
    model; never the new config beside the old weights."""
    import dataclasses

    import cloud_jax
    from cloud_jax.errors import CheckpointError
    from model_helpers import TINY, tiny_reward_model

    old = tiny_reward_model(1)
    new = tiny_reward_model(2, dataclasses.replace(TINY, intermediate_size=48))
    url = f"{bucket}/models/half_uploaded"
    old.save_pretrained(url)
    old_config = storage.read_text(f"{url}/config.json")
    fs, _ = storage._fs(url)
    real_put = fs.put_file  # the filesystem instance is shared (fsspec caches it)

    def put_then_fail_on_weights(lpath, rpath, *args, **kwargs):
        if str(rpath).endswith(".safetensors"):
            raise OSError("connection reset")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", put_then_fail_on_weights)
    with pytest.raises(OSError, match="connection reset"):
        new.save_pretrained(url)
    monkeypatch.undo()
    names = storage.listdir(url)
    if "config.json" in names:
        assert storage.read_text(f"{url}/config.json") == old_config
    else:
        with pytest.raises(CheckpointError, match="no config.json"):
            cloud_jax.load(url)
    new.save_pretrained(url)  # a retry completes the export
    assert cloud_jax.load(url).config.intermediate_size == 48


@pytest.mark.parametrize("status, needle", [
    (401, "no valid Google Cloud credentials were found"),
    (403, "the credentials in use may not do this"),
])
def test_a_store_that_refuses_the_caller_is_one_actionable_line(status, needle, tmp_path,
                                                                caplog, capsys):
    """Without credentials (gcsfs then calls as an anonymous user: 401) or with credentials that
    lack the permission (403), a command prints one error line that names the URL and what to
    do, not gcsfs's traceback; the storage calls raise PermissionError."""
    from cloud_jax.cli import score
    from cloud_jax.cli.common import run_command
    from cloud_jax.data.schema import load_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "b"}) + "\n")
    with denying_gcs(status), caplog.at_level(logging.ERROR, logger="gcsfs"):
        code = run_command(score.main, ["--checkpoint", "gs://private/model", "--input",
                                        str(rows), "--output", str(tmp_path / "out.jsonl")])
        for call in (lambda: storage.read_text("gs://private/rows.jsonl"),
                     lambda: storage.exists("gs://private/rows.jsonl"),
                     lambda: storage.isfile("gs://private/rows.jsonl"),
                     lambda: storage.isdir("gs://private/prefs"),
                     # not "does not exist": the rows may well be there
                     lambda: load_rows("gs://private/rows.jsonl", require_feedback=False),
                     lambda: storage.write_text_atomic("gs://private/out.jsonl", "x"),
                     lambda: storage.upload_dir(str(tmp_path), "gs://private/out")):
            with pytest.raises(PermissionError, match=needle):
                call()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: gs://private/model: ") and needle in err[0], err
    assert "HttpError" not in err[0] and "Traceback" not in err[0]
    # gcsfs logs the refusal with its traceback before raising it: not shown, the line says it.
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_an_output_in_a_missing_bucket_is_refused_before_any_work(bucket, toy, tmp_path,
                                                                  monkeypatch, capsys):
    """A mistyped bucket in an output is one error line naming the option and the bucket, given
    before the model loads or the data is prepared; not after hours of scoring, training or
    converting, when the first write finds no bucket."""
    import cloud_jax
    from test_gguf import write_tiny_llama_gguf

    from cloud_jax.cli import convert, critique, evaluate, export, make_benchmark, score
    from cloud_jax.cli.common import run_command
    from cloud_jax.errors import ConfigError
    from cloud_jax.training import loop
    from model_helpers import tiny_reward_model

    def work(*args, **kwargs):
        raise AssertionError("the work began")

    model = str(tmp_path / "model")
    tiny_reward_model(1).save_pretrained(model)
    write_tiny_llama_gguf(tmp_path / "m.gguf")
    monkeypatch.setattr(cloud_jax, "load", work)
    monkeypatch.setattr(convert, "convert_gguf_to_hf", work)
    monkeypatch.setattr(loop, "prepare_data", work)
    gone = "gs://no-such-bucket"
    sampling = ["--checkpoint", model, "--input", toy["train"], "--max-critique-tokens", "4"]
    commands = [
        (score.main, [*sampling, "--output", f"{gone}/scored.jsonl"], "--output"),
        (evaluate.main, [*sampling, "--output-dir", f"{gone}/eval"], "--output-dir"),
        (critique.main, [*sampling, "--output", f"{gone}/critiques"], "--output"),
        (export.main, ["--checkpoint", model, "--out", f"{gone}/export"], "--out"),
        (convert.main, ["--gguf", str(tmp_path / "m.gguf"), "--out", f"{gone}/hf"], "--out"),
        (make_benchmark.main, ["--out", f"{gone}/bench", "--train", "2", "--eval", "2",
                               "--test", "2"], "--out"),
    ]
    for main, argv, option in commands:
        assert run_command(main, argv) == 2, (main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {option}=") and (
            "no bucket 'no-such-bucket'" in err[0]), (main, err)
    for key in ("output_dir", "train.metrics_file", "data.tfds_dir"):
        paths = {"output_dir": str(tmp_path / "run"), "tfds": toy["tfds"]}
        paths["output_dir" if key == "output_dir" else "tfds"] = f"{gone}/x"
        extra = [f"{key}={gone}/x"] if key == "train.metrics_file" else []
        cfg = tiny(paths["output_dir"], toy["train"], paths["tfds"], *extra)
        with pytest.raises(ConfigError, match=rf"^{key}='{gone}/x': no bucket 'no-such-bucket'"):
            run(cfg)


def test_an_output_directory_that_is_an_object_is_refused_as_a_local_file_is(
        bucket, toy, tmp_path, monkeypatch, capsys):
    """An output directory named by an object in the bucket was taken for a directory: the
    files went under the object's name beside it. A local file is refused, before any work; an
    object is too, with the same line."""
    import cloud_jax

    from cloud_jax.cli import evaluate, export
    from cloud_jax.cli.common import run_command
    from model_helpers import tiny_reward_model

    def work(*args, **kwargs):
        raise AssertionError("the work began")

    model = str(tmp_path / "model")
    tiny_reward_model(1).save_pretrained(model)
    monkeypatch.setattr(cloud_jax, "load", work)
    storage.write_text_atomic(f"{bucket}/an_object", "a file")
    (tmp_path / "a_file").write_text("a file")
    sampling = ["--checkpoint", model, "--input", toy["train"], "--max-critique-tokens", "4"]
    for out in (f"{bucket}/an_object", str(tmp_path / "a_file")):
        for main, argv, option in (
                (export.main, ["--checkpoint", model, "--out", out, "--overwrite"], "--out"),
                (evaluate.main, [*sampling, "--output-dir", out], "--output-dir")):
            assert run_command(main, argv) == 2, (main, out)
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"error: {option}={out!r} is a file, not a directory: give a "
                           "directory (a new one, or one that exists)"], (main, err)
    assert storage.listdir(bucket).count("an_object") == 1
    assert not storage.exists(f"{bucket}/an_object/config.json")


def test_convert_gguf_reads_its_gguf_from_the_bucket(bucket, tmp_path, capsys):
    """--gguf gs://... is the object (copied to a temporary local file, as the GGUF reader maps a
    local file), not a local path "gs:/..." that does not exist; a missing object is named."""
    from test_gguf import write_tiny_llama_gguf

    from cloud_jax.cli import convert
    from cloud_jax.cli.common import run_command

    write_tiny_llama_gguf(tmp_path / "m.gguf")
    storage.copy_file(str(tmp_path / "m.gguf"), f"{bucket}/gguf/m.gguf")
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert run_command(convert.main, ["--gguf", str(tmp_path / "m.gguf"), "--out", str(local)]) == 0
    assert run_command(convert.main, ["--gguf", f"{bucket}/gguf/m.gguf", "--out", str(remote)]) == 0
    names = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in remote.iterdir()) == names
    for name in names:
        if name.endswith(".safetensors"):  # its header's metadata comes in no set order
            from safetensors import safe_open
            from safetensors.numpy import load_file

            a, b = load_file(local / name), load_file(remote / name)
            assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
            with safe_open(local / name, "np") as f, safe_open(remote / name, "np") as g:
                assert f.metadata() == g.metadata()
        else:
            assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    capsys.readouterr()
    assert run_command(convert.main, ["--gguf", f"{bucket}/gguf/none.gguf", "--out",
                                      str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --gguf {bucket}/gguf/none.gguf: no such object", err
    assert not (tmp_path / "none").exists()


def test_an_evaluation_rerun_in_the_bucket_never_shows_a_report_beside_other_files(
        bucket, tmp_path, monkeypatch):
    """A rerun into the same gs:// --output-dir: the earlier run stays whole while the inputs
    are read and the model loads; then its report.json goes first (before the new rejects are
    written) and the new one is uploaded last, so a reader never sees a report.json beside
    files of another run; an upload that fails part-way leaves no report."""
    import cloud_jax
    from cloud_jax.cli import evaluate
    from cloud_jax.cli.common import run_command
    from test_evaluate_cli import FakeModel
    from test_evaluate_helpers import synthetic_rows, write_jsonl

    out = f"{bucket}/eval_rerun"
    seen_at_load = []

    def load(path, **kw):  # what a reader of the bucket sees while the model loads
        seen_at_load.append((storage.listdir(out), storage.read_text(f"{out}/rejects.jsonl")
                             if storage.exists(f"{out}/rejects.jsonl") else None))
        return FakeModel()

    monkeypatch.setattr(cloud_jax, "load", load)

    def run(bad_rows):
        path = write_jsonl(tmp_path / f"rb{bad_rows}.jsonl",
                           synthetic_rows() + ["{not json"] * bad_rows)
        return run_command(evaluate.main, ["--checkpoint", "c", "--input", path, "--output-dir",
                                           out, "--lenient", "--no-progress"])

    assert run(2) == 0
    assert json.loads(storage.read_text(f"{out}/report.json"))["rewardbench"][
        "rejected_rows"] == 2
    fs, _ = storage._fs(out)
    real_put = fs.put_file  # the filesystem instance is shared (fsspec caches it)
    uploaded = []

    def put_then_fail_on_the_markdown(lpath, rpath, *args, **kwargs):
        uploaded.append(os.path.basename(str(rpath)))
        if str(rpath).endswith("report.md"):
            raise OSError("connection reset")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", put_then_fail_on_the_markdown)
    with pytest.raises(OSError, match="connection reset"):
        run(1)
    monkeypatch.setattr(fs, "put_file", real_put)
    names, rejects = seen_at_load[-1]
    assert "report.json" in names and len(rejects.splitlines()) == 2, seen_at_load[-1]
    assert "report.json" not in storage.listdir(out) and "report.json" not in uploaded, uploaded
    assert len(storage.read_text(f"{out}/rejects.jsonl").splitlines()) == 1

    uploaded.clear()
    monkeypatch.setattr(fs, "put_file", lambda lpath, rpath, *a, **kw: (
        uploaded.append(os.path.basename(str(rpath))), real_put(lpath, rpath, *a, **kw))[1])
    assert run(1) == 0
    assert uploaded[-1] == "report.json" and "report.md" in uploaded, uploaded
    report = json.loads(storage.read_text(f"{out}/report.json"))["rewardbench"]
    assert (report["rejected_rows"], report["rejects_path"]) == (1, f"{out}/rejects.jsonl")


def test_a_url_with_a_trailing_slash_names_a_directory_as_a_local_path_does(bucket, tmp_path):
    """``x/`` names a directory: an object x is not one (the store's client drops the slash and
    finds the object), as on local disk, where ``file/`` does not exist."""
    storage.write_text_atomic(f"{bucket}/slash/x.txt", "one")
    (tmp_path / "x.txt").write_text("one")
    for base in (f"{bucket}/slash", str(tmp_path)):
        assert storage.exists(f"{base}/x.txt") and storage.isfile(f"{base}/x.txt")
        assert not storage.exists(f"{base}/x.txt/"), base
        assert not storage.isfile(f"{base}/x.txt/") and not storage.isdir(f"{base}/x.txt/")
        assert storage.exists(f"{base}/") and storage.isdir(f"{base}/")
        assert not storage.exists(f"{base}/nothing/") and not storage.exists(f"{base}/nothing")
    assert storage.exists(f"{bucket}/") and storage.isdir(f"{bucket}/")


def test_a_listing_in_a_missing_bucket_names_the_url(bucket):
    """As a read, a glob or a write does: no bucket is not an empty directory (an export or
    a stage 2 that lists its output first would go on as if there were nothing there)."""
    for url in ("gs://no-such-bucket/out", "gs://no-such-bucket", "gs://no-such-bucket/"):
        with pytest.raises(FileNotFoundError,
                           match=f"{url}: no bucket 'no-such-bucket' \\(or no access to it\\)"):
            storage.listdir(url)
    # A directory with nothing under it, in a bucket that exists, is empty.
    assert storage.listdir(f"{bucket}/nothing-here") == []


def test_listing_a_file_is_empty_in_the_bucket_as_on_disk(bucket, tmp_path):
    """An object is not a directory: its listing is empty, as a local file's is (the store's
    client answered with the object's own name, read by callers as an entry under it)."""
    storage.write_text_atomic(f"{bucket}/listed/x.txt", "one")
    (tmp_path / "x.txt").write_text("one")
    for base in (f"{bucket}/listed", str(tmp_path)):
        assert storage.listdir(f"{base}/x.txt") == [], base
        assert storage.listdir(base) == ["x.txt"], base


def test_a_folder_made_in_the_console_lists_what_is_in_it_only(bucket):
    """The Cloud console's "create folder" writes an empty object ``name/``: it was listed as an
    entry of the folder, which an export-hf --out there then refused as not empty."""
    fs, inner = storage._fs(f"{bucket}/console_folder")
    fs.pipe_file(f"{inner}/", b"")
    assert storage.isdir(f"{bucket}/console_folder")
    assert storage.listdir(f"{bucket}/console_folder") == []
    storage.write_text_atomic(f"{bucket}/console_folder/x.txt", "one")
    assert storage.listdir(f"{bucket}/console_folder") == ["x.txt"]
    assert storage.listdir(f"{bucket}/console_folder/") == ["x.txt"]


def test_a_config_file_in_the_bucket_loads_as_a_local_one_does(bucket, tmp_path):
    """``--config gs://...`` (train, pipeline, aot): the file is read from the bucket; it was
    reported as a config file that does not exist."""
    from cloud_jax.cli import train as train_cli
    from cloud_jax.cli.common import run_command
    from cloud_jax.errors import ConfigError

    local = ROOT / "configs/tiny_cpu_cloud.yaml"
    storage.copy_file(str(local), f"{bucket}/configs/cloud.yaml")
    got = load_config(f"{bucket}/configs/cloud.yaml", ["seed=3"])
    assert got == load_config(local, ["seed=3"])
    with pytest.raises(ConfigError, match=f"config file {bucket}/configs/absent.yaml does not "
                                          "exist"):
        load_config(f"{bucket}/configs/absent.yaml")
    with pytest.raises(ConfigError, match=f"config file {bucket}/configs is a directory"):
        load_config(f"{bucket}/configs")
    storage.write_text_atomic(f"{bucket}/configs/bad.yaml", "model: [1\n")
    with pytest.raises(ConfigError, match=f"{bucket}/configs/bad.yaml: not valid YAML"):
        load_config(f"{bucket}/configs/bad.yaml")
    # The command reads it too (and stops at the data, which is not there).
    assert run_command(train_cli.main, ["--config", f"{bucket}/configs/cloud.yaml",
                                        f"data.train_path={tmp_path}/absent.jsonl"]) == 2


def test_a_tokenizer_directory_in_the_bucket_loads(bucket, tmp_path):
    """data.tokenizer / --tokenizer given as a URL: the directory is staged in the local cache and
    loaded; it was taken for a hub id ('Repo id must be in the form ...')."""
    from cloud_jax.data.tokenizer import byte_tokenizer, load_tokenizer, tokenizer_fingerprint
    from cloud_jax.errors import ConfigError
    from cloud_jax.training.loop import load_fitting_tokenizer

    byte_tokenizer().save_pretrained(str(tmp_path / "tok"))
    storage.upload_dir(str(tmp_path / "tok"), f"{bucket}/tokenizers/byte")
    want = tokenizer_fingerprint(load_tokenizer(str(tmp_path / "tok")))
    assert tokenizer_fingerprint(load_tokenizer(f"{bucket}/tokenizers/byte")) == want
    cfg = load_config(ROOT / "configs/tiny_cpu_cloud.yaml",
                      [f"data.tokenizer={bucket}/tokenizers/byte"])
    assert tokenizer_fingerprint(load_fitting_tokenizer(cfg)) == want
    cfg = load_config(ROOT / "configs/tiny_cpu_cloud.yaml",
                      [f"data.tokenizer={bucket}/tokenizers/absent"])
    with pytest.raises(ConfigError, match=f"data.tokenizer='{bucket}/tokenizers/absent' does not "
                                          f"load \\({bucket}/tokenizers/absent: no such "
                                          "directory"):
        load_fitting_tokenizer(cfg)


def test_loading_a_run_directory_in_the_bucket_names_the_url_and_downloads_nothing(
        bucket, tmp_path, monkeypatch):
    """cloud_jax.load (score's, evaluate's, serve's --checkpoint, init_from) of a URL that holds
    no config.json: the error names the URL (it named the local cache copy, also in the
    export-hf command it suggests), and the directory (a run's every checkpoint) is not
    downloaded first."""
    import cloud_jax
    from cloud_jax.errors import CheckpointError

    monkeypatch.setenv("CLOUD_JAX_CACHE", str(tmp_path / "cache"))
    run_dir = f"{bucket}/a-run"
    storage.write_text_atomic(f"{run_dir}/config.yaml", "seed: 0\n")
    storage.write_text_atomic(f"{run_dir}/checkpoints/2/state/blob", "x" * 1000)
    with pytest.raises(CheckpointError) as err:
        cloud_jax.load(run_dir)
    assert str(err.value).startswith(f"{run_dir}: no config.json"), err.value
    assert f"export-hf --checkpoint {run_dir} --step N" in str(err.value)
    storage.write_text_atomic(f"{bucket}/not-a-model/notes.txt", "x")
    with pytest.raises(CheckpointError, match=f"^{bucket}/not-a-model: no config.json; expected"):
        cloud_jax.load(f"{bucket}/not-a-model")
    assert not list((tmp_path / "cache").rglob("blob")) and not list(
        (tmp_path / "cache").rglob("notes.txt"))
