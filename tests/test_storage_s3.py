"""s3:// through the same storage calls, against moto's S3 server (tests/storage_emulators.py):
what works (every path but the checkpoints) and the clear error for checkpoints, which orbax
cannot write to S3."""

import json
from pathlib import Path

import numpy as np
import pytest
from storage_emulators import s3_emulator

from cloud_jax import storage
from cloud_jax.data.synthetic.toy import write_toy_data
from cloud_jax.errors import ConfigError
from cloud_jax.training.config import load_config
from cloud_jax.training.loop import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bucket():
    with s3_emulator() as url:
        yield url


def test_storage_calls_on_s3(bucket):
    base = f"{bucket}/calls"
    storage.write_text_atomic(f"{base}/a/x.txt", "one")
    storage.write_text_atomic(f"{base}/a/y.txt", "two")
    assert storage.listdir(f"{base}/a") == ["x.txt", "y.txt"]
    assert storage.listdir(f"{base}/a/x.txt") == []  # an object is not a directory
    # The console's "create folder" writes an empty object a/: not an entry of a/.
    fs, inner = storage._fs(f"{base}/a")
    fs.pipe_file(f"{inner}/", b"")
    assert storage.listdir(f"{base}/a") == ["x.txt", "y.txt"]
    assert storage.glob(f"{base}/a/*.txt") == [f"{base}/a/x.txt", f"{base}/a/y.txt"]
    log = storage.AppendText(f"{base}/log.jsonl")
    log.write("1\n")
    log.write("2\n")
    assert storage.read_text(f"{base}/log.jsonl") == "1\n2\n"
    storage.rename(f"{base}/a", f"{base}/b")
    assert storage.listdir(f"{base}/b") == ["x.txt", "y.txt"]
    assert not storage.exists(f"{base}/a/x.txt")
    assert Path(storage.local_copy(f"{base}/b"), "y.txt").read_text() == "two"
    # No bucket is not an empty directory.
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/x: no bucket"):
        storage.listdir("s3://no-such-bucket/x")


def test_a_directory_changed_in_s3_is_downloaded_again_at_the_same_size(bucket, tmp_path,
                                                                         monkeypatch):
    """The cache of a remote directory is keyed by its objects' names, sizes and etags: s3fs
    names the etag "ETag", so only the sizes counted, and an object rewritten at the same size
    (new weights of the same shapes) was read from the stale copy."""
    monkeypatch.setenv("CLOUD_JAX_CACHE", str(tmp_path / "cache"))
    url = f"{bucket}/same_size"
    storage.write_text_atomic(f"{url}/w.bin", "one")
    assert Path(storage.local_copy(url), "w.bin").read_text() == "one"
    storage.write_text_atomic(f"{url}/w.bin", "two")
    assert Path(storage.local_copy(url), "w.bin").read_text() == "two"


def test_a_run_writes_everything_but_its_checkpoints_to_s3(bucket, tmp_path):
    train, _ = write_toy_data(str(tmp_path / "data"), n_train=32, n_eval=8)
    storage.copy_file(train, f"{bucket}/data/train.jsonl")
    out = f"{bucket}/run"
    common = [f"data.train_path={bucket}/data/train.jsonl", "data.eval_path=\"\"",
              f"data.tfds_dir={tmp_path / 'tfds'}", f"output_dir={out}", "init_from=\"\"",
              "train.progress_bar=false", "train.total_steps=3", "train.log_every=1",
              "train.eval_every=0"]
    cfg = load_config(ROOT / "configs/tiny_cpu_cloud.yaml", common)
    with pytest.raises(ConfigError, match=f"checkpoints would go to '{out}/checkpoints': orbax "
                                          "writes checkpoint arrays to local disk or gs://"):
        run(cfg)
    cfg = load_config(ROOT / "configs/tiny_cpu_cloud.yaml",
                      [*common, f"train.checkpoint_dir={tmp_path / 'ckpt'}"])
    summary = run(cfg)
    assert summary["step"] == 3 and summary["final_dir"] == f"{out}/final"
    rows = [json.loads(line) for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert storage.exists(f"{out}/config.yaml") and storage.listdir(f"{out}/tensorboard")

    import cloud_jax

    rm = cloud_jax.load(f"{out}/final")
    result = rm.score(["What is 2+2?"], ["4."], max_critique_tokens=4)
    assert np.isfinite(result.rewards).all()


def test_no_credentials_for_s3_is_one_actionable_line(bucket, monkeypatch):
    import fsspec

    storage.write_text_atomic(f"{bucket}/creds/x.txt", "x")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3 = fsspec.get_filesystem_class("s3")
    s3.clear_instance_cache()
    try:
        for call in (lambda: storage.read_text(f"{bucket}/creds/x.txt"),
                     lambda: storage.exists(f"{bucket}/creds/x.txt"),
                     lambda: storage.write_text_atomic(f"{bucket}/creds/y.txt", "y")):
            with pytest.raises(PermissionError, match=r"no credentials for the store .*set "
                                                      "AWS_ACCESS_KEY_ID"):
                call()
    finally:
        s3.clear_instance_cache()  # the next test's clients find the credentials again
