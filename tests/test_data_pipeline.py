"""TFDS build (array_record, no TensorFlow) and grain batches: shapes, pairs, order, sharding,
filler pairs, and iterator state across epochs."""

import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cloud_jax import storage
from cloud_jax.data import tfds_builder
from cloud_jax.data.config import DataConfig, resolved_buckets
from cloud_jax.data.pipeline import BATCH_KEYS, GlobalOrder, batch_iterator, pair_batches
from cloud_jax.data.tfds_builder import open_split, prepare_dataset
from cloud_jax.data.tokenizer import byte_tokenizer

NUM_ROWS = 11


def _rows(n=NUM_ROWS):
    # Prompt lengths grow so sequences straddle the 64-token bucket.
    return [{"id": f"r{i}", "prompt": "q" * (3 * i + 1), "chosen": f"good {i}",
             "rejected": f"bad {i}", "chosen_feedback": f"fine {i}",
             "rejected_feedback": [f"wrong {i}"], "subset": "s" if i % 2 else None}
            for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg_args(tmp, **kw):
    base = dict(train_path=str(tmp / "train.jsonl"), max_length=96, length_buckets=(32, 64),
                critique_prefix="C: ", tfds_dir=str(tmp / "tfds"), batch_pairs=4, num_epochs=3,
                seed=5, num_threads=1, prefetch_buffer_size=2)
    base.update(kw)
    return base


def _cfg(tmp, **kw):
    return DataConfig(**_cfg_args(tmp, **kw))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    _write(tmp / "train.jsonl", _rows())
    cfg = _cfg(tmp)
    tok = byte_tokenizer()
    dataset = prepare_dataset(cfg, tok, "critique")
    return cfg, tok, dataset, open_split(dataset, "train")


def test_tfds_round_trip(built):
    cfg, tok, dataset, source = built
    assert len(source) == NUM_ROWS
    assert dataset.stats["train"] == {"rows": NUM_ROWS, "rejected_rows": 0, "pairs": NUM_ROWS,
                                      "dropped_overlength": 0, "prompt_truncated": 0,
                                      "rejects_path": None}
    # Readable with tfds.data_source by name, without TensorFlow, in row order.
    by_name = tfds.data_source(dataset.name, split="train", data_dir=dataset.data_dir)
    record = by_name[3]
    assert record["id"] == b"r3" and record["subset"] == b"s"
    assert by_name[2]["subset"] == b""
    text = tok.decode(record["chosen_input_ids"])
    assert text == ("<bos><|user|>qqqqqqqqqq<eot><|assistant|>good 3<eot><|user|>C: fine 3<eot>")
    assert tok.decode(record["rejected_input_ids"]).endswith("bad 3<eot><|user|>C: wrong 3<eot>")
    assert record["chosen_input_ids"].dtype == np.int32
    assert record["chosen_reward_index"] == len(record["chosen_input_ids"]) - 1
    mask = record["rejected_target_mask"].astype(bool)
    # Layout version 2: the prefill ends at "C:", so the critique's targets start with the space.
    assert tok.decode(record["rejected_input_ids"][mask]) == " wrong 3<eot>"
    # Same inputs and settings: reused; a changed setting: a new dataset.
    assert prepare_dataset(cfg, tok, "critique").config_name == dataset.config_name
    assert prepare_dataset(cfg, tok, "classic").config_name != dataset.config_name
    v1 = dataclasses.replace(cfg, layout_version=1)
    assert prepare_dataset(v1, tok, "critique").config_name != dataset.config_name


def test_tfds_counts_drops_and_rejects(tmp_path):
    rows = _rows(4) + [{"id": "r0", "prompt": "dup", "chosen": "a", "rejected": "b",
                        "chosen_feedback": "c", "rejected_feedback": "d"}]
    rows[1]["prompt"] = "x" * 200
    _write(tmp_path / "train.jsonl", rows)
    cfg = _cfg(tmp_path, lenient=True)
    dataset = prepare_dataset(cfg, byte_tokenizer(), "critique")
    stats = dataset.stats["train"]
    assert (stats["rows"], stats["rejected_rows"], stats["pairs"],
            stats["dropped_overlength"]) == (5, 1, 3, 1)
    reject = json.loads(open(stats["rejects_path"]).read())
    assert (reject["line"], reject["field"]) == (5, "id")
    assert [r["id"] for r in open_split(dataset, "train")] == [b"r0", b"r2", b"r3"]
    cut = prepare_dataset(_cfg(tmp_path, lenient=True, overlength_policy="truncate_prompt"),
                          byte_tokenizer(), "critique")
    assert (cut.stats["train"]["pairs"], cut.stats["train"]["prompt_truncated"]) == (4, 1)
    # Another dataset in the same tfds_dir keeps its rejects apart: the cached first one's
    # stats still point at a file holding its own.
    other = tmp_path / "other"
    other.mkdir()
    _write(other / "train.jsonl", _rows(3) + [dict(_rows(1)[0], id="r1")])
    b = prepare_dataset(dataclasses.replace(cfg, train_path=str(other / "train.jsonl")),
                        byte_tokenizer(), "critique")
    assert b.stats["train"]["rejects_path"] != stats["rejects_path"]
    again = prepare_dataset(cfg, byte_tokenizer(), "critique").stats["train"]
    assert again["rejects_path"] == stats["rejects_path"]
    assert json.loads(open(again["rejects_path"]).read())["line"] == 5


def test_rejects_path_with_other_braces_is_taken_as_written(tmp_path):
    rows = _rows(2) + [dict(_rows(1)[0], prompt="dup")]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "eval.jsonl", _rows(2))
    pattern = str(tmp_path / "rejects {run} {}-{split}.jsonl")
    cfg = _cfg(tmp_path, lenient=True, rejects_path=pattern,
               eval_path=str(tmp_path / "eval.jsonl"))
    stats = prepare_dataset(cfg, byte_tokenizer(), "critique").stats
    assert stats["train"]["rejects_path"] == str(tmp_path / "rejects {run} {}-train.jsonl")
    assert json.loads(open(stats["train"]["rejects_path"]).read())["field"] == "id"
    assert stats["eval"]["rejected_rows"] == 0


def test_tfds_build_strict_error_and_eval_split(tmp_path):
    _write(tmp_path / "train.jsonl", _rows(3))
    _write(tmp_path / "eval.jsonl", _rows(2)[:1] + [{"id": "e", "prompt": "p"}])
    cfg = _cfg(tmp_path, eval_path=str(tmp_path / "eval.jsonl"))
    with pytest.raises(ValueError, match=r"eval.jsonl:2: field 'chosen': missing"):
        prepare_dataset(cfg, byte_tokenizer(), "critique")
    _write(tmp_path / "eval.jsonl", _rows(2))
    dataset = prepare_dataset(cfg, byte_tokenizer(), "critique")
    assert len(open_split(dataset, "eval")) == 2 and len(open_split(dataset, "train")) == 3


# A job that builds the dataset of _cfg(tmp) in layout "classic" and stops once it starts reading
# the rows (the build's staging directory made, the lock held) until a line arrives on stdin.
_BUILDING_JOB = """
import json, sys
from cloud_jax.data import tfds_builder
from cloud_jax import storage
from cloud_jax.data import tfds_builder
from cloud_jax.data.config import DataConfig
from cloud_jax.data.tokenizer import byte_tokenizer
kwargs = json.loads(sys.argv[1])
kwargs["length_buckets"] = tuple(kwargs["length_buckets"])
read_rows = tfds_builder.load_rows
def paused_load_rows(*args, **kw):
    print("building", flush=True)
    sys.stdin.readline()
    return read_rows(*args, **kw)
tfds_builder.load_rows = paused_load_rows
dataset = tfds_builder.prepare_dataset(DataConfig(**kwargs), byte_tokenizer(), "classic")
print("done", dataset.config_name, json.dumps(dataset.stats), flush=True)
"""


def _start_building_job(tmp_path):
    """A _BUILDING_JOB process on tmp_path's rows, once it is building (paused)."""
    cfg = _cfg_args(tmp_path)
    root = str(pathlib.Path(tfds_builder.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    job = subprocess.Popen([sys.executable, "-c", _BUILDING_JOB, json.dumps(cfg)], env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=open(tmp_path / "job.err", "w"), text=True)
    line = None
    while line not in ("building\n", ""):  # TFDS writes lines of its own to stdout
        line = job.stdout.readline()
    assert line == "building\n", (tmp_path / "job.err").read_text()[-3000:]
    return job


class _Waiting(logging.Handler):
    """Sets ``event`` on the line of a job that waits for another's build."""

    def __init__(self):
        super().__init__()
        self.event, self.messages = threading.Event(), []

    def emit(self, record):
        if "waiting for another job building" in record.getMessage():
            self.messages.append(record.getMessage())
            self.event.set()


def test_a_second_job_waits_for_the_build_of_the_first_and_reads_its_dataset(tmp_path,
                                                                             monkeypatch):
    # Two jobs build one new dataset into one tfds_dir at once: the second waits for the lock
    # beside the dataset's directory (saying so) and reuses the first one's dataset, where it
    # used to build its own and make the first one's rename fail (FileExistsError).
    _write(tmp_path / "train.jsonl", _rows(5))
    first = _start_building_job(tmp_path)
    builds = []
    read_rows = tfds_builder.load_rows
    monkeypatch.setattr(tfds_builder, "load_rows",
                        lambda *a, **k: builds.append(1) or read_rows(*a, **k))
    waiting = _Waiting()
    logging.getLogger("cloud_jax.storage").addHandler(waiting)
    second = {}

    def run_second():
        try:
            second["dataset"] = prepare_dataset(_cfg(tmp_path), byte_tokenizer(), "classic")
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            second["error"] = err

    thread = threading.Thread(target=run_second)
    try:
        thread.start()
        # Until the second job says it waits, or ends without waiting (the defect).
        while thread.is_alive() and not waiting.event.wait(0.05):
            pass
        assert waiting.event.is_set(), f"the second job did not wait: {second}"
        assert thread.is_alive()
    finally:
        first.stdin.write("go\n")
        first.stdin.flush()
        out, _ = first.communicate(timeout=300)
        thread.join(300)
        logging.getLogger("cloud_jax.storage").removeHandler(waiting)
    assert first.returncode == 0, (tmp_path / "job.err").read_text()[-3000:]
    _, config_name, stats = next(l for l in out.splitlines() if l.startswith("done ")).split(
        " ", 2)
    assert "error" not in second, second
    dataset = second["dataset"]
    assert (dataset.config_name, dataset.stats) == (config_name, json.loads(stats))
    assert builds == [] and len(open_split(dataset, "train")) == 5
    config_dir = tmp_path / "tfds" / "cloud_pairs" / config_name
    message = waiting.messages[0]
    assert f"the tokenized dataset {config_dir}" in message
    assert f"pid {first.pid} on host" in message and f"{config_dir}.lock" in message


def test_a_killed_build_leaves_no_lock_that_blocks_and_its_staging_directory_is_removed(
        tmp_path, caplog):
    _write(tmp_path / "train.jsonl", _rows(5))
    job = _start_building_job(tmp_path)
    locks = list((tmp_path / "tfds" / "cloud_pairs").glob("*.lock"))
    assert len(locks) == 1
    fd = os.open(locks[0], os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held by the building job
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        job.kill()
        job.wait()
        job.stdout.close()
        job.stdin.close()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel with its process
    finally:
        os.close(fd)
    config_dir = tmp_path / "tfds" / "cloud_pairs" / locks[0].name[:-len(".lock")]
    assert [p.name.startswith("incomplete.") for p in config_dir.iterdir()] == [True]
    with caplog.at_level(logging.INFO):
        dataset = prepare_dataset(_cfg(tmp_path), byte_tokenizer(), "classic")
    assert "waiting for another job" not in caplog.text
    assert "left by a build of the tokenized dataset that did not finish" in caplog.text
    assert len(open_split(dataset, "train")) == 5
    assert sorted(p.name for p in config_dir.iterdir()) == ["1.6.0"]


def test_wait_for_lock_waits_for_a_holder_with_another_descriptor(tmp_path):
    # Two holders in one process with their own descriptors exclude each other as two processes
    # do (flock locks an open file, not a process).
    lock_path = str(tmp_path / "d" / "x.lock")
    os.makedirs(tmp_path / "d")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 1 on host elsewhere\n")
    waiting = _Waiting()
    logging.getLogger("cloud_jax.storage").addHandler(waiting)
    inside = threading.Event()

    def second():
        with storage.wait_for_lock(lock_path, "the thing", poll_s=0.01) as held:
            assert held
            inside.set()

    thread = threading.Thread(target=second)
    try:
        thread.start()
        assert waiting.event.wait(60)
        assert not inside.is_set()
    finally:
        os.close(fd)  # the first holder ends
        thread.join(60)
        logging.getLogger("cloud_jax.storage").removeHandler(waiting)
    assert inside.is_set()
    assert waiting.messages == [f"waiting for another job building the thing: pid 1 on host "
                                f"elsewhere holds {lock_path}; this one goes on once that one "
                                "ends"]
    assert open(lock_path).read() == f"pid {os.getpid()} on host {socket.gethostname()}\n"


def test_a_host_share_is_given_whole_or_not_at_all(built):
    # shard_index alone was dropped without a word, the process's index taken instead.
    cfg, _, _, source = built
    for given in ({"shard_index": 1}, {"shard_count": 2}):
        with pytest.raises(ValueError, match="shard_index and shard_count together"):
            batch_iterator(cfg, source, **given)


def test_batch_shapes_dtypes_and_pairs(built):
    cfg, tok, _, source = built
    batches = list(batch_iterator(cfg, source, shard_index=0, shard_count=1))
    # 11 pairs in batches of 4: 3 batches per epoch, the last with one filler pair.
    assert len(batches) == 3 * 3
    dtypes = {"input_ids": np.int32, "attention_mask": np.int32, "positions": np.int32,
              "targets": np.int32, "loss_mask": np.float32, "reward_index": np.int32,
              "pair_valid": np.int32, "pair_index": np.int32}
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        t = b["input_ids"].shape[-1]
        assert t in (32, 64, 96)
        for key, dtype in dtypes.items():
            assert b[key].dtype == dtype, key
            assert b[key].shape == {"reward_index": (4, 2), "pair_valid": (4,),
                                    "pair_index": (4,)}.get(key, (4, 2, t)), key
        for i in range(4):
            if not b["pair_valid"][i]:
                continue
            record = source[int(b["pair_index"][i])]
            for j, side in enumerate(("chosen", "rejected")):
                ids = record[f"{side}_input_ids"]
                n = len(ids)
                assert b["input_ids"][i, j, :n].tolist() == ids.tolist()
                assert (b["input_ids"][i, j, n:] == 0).all()
                assert b["attention_mask"][i, j].tolist() == [1] * n + [0] * (t - n)
                assert b["positions"][i, j, :n].tolist() == list(range(n))
                assert b["targets"][i, j, :n - 1].tolist() == ids[1:].tolist()
                assert (b["targets"][i, j, n - 1:] == 0).all()
                r = b["reward_index"][i, j]
                assert r == n - 1 and b["attention_mask"][i, j, r] == 1
                picked = b["targets"][i, j][b["loss_mask"][i, j] == 1]
                assert tok.decode(picked) == tok.decode(ids[record[f"{side}_target_mask"] == 1])
        # The bucket is the smallest that holds the batch's longest sequence.
        longest = b["attention_mask"].sum(-1).max()
        assert t == min(x for x in (32, 64, 96) if x >= longest)
    valid = [b["pair_valid"].sum() for b in batches]
    assert valid == [4, 4, 3] * 3


def test_filler_pairs_are_real_tokens_without_loss(built):
    cfg, _, _, source = built
    last = list(batch_iterator(cfg, source, shard_index=0, shard_count=1, num_epochs=1))[-1]
    assert last["pair_valid"].tolist() == [1, 1, 1, 0] and last["pair_index"][3] == -1
    assert last["loss_mask"][3].sum() == 0
    for j in range(2):
        r = last["reward_index"][3, j]
        assert last["attention_mask"][3, j, r] == 1 and last["attention_mask"][3, j].sum() > 0


def test_drop_remainder(built):
    cfg, _, _, source = built
    no_filler = dataclasses.replace(cfg, drop_remainder=True)
    batches = list(batch_iterator(no_filler, source, shard_index=0, shard_count=1))
    assert len(batches) == 2 * 3 and all(b["pair_valid"].all() for b in batches)


def _order(batches):
    return [b["pair_index"].tolist() for b in batches]


def test_deterministic_and_reshuffled_each_epoch(built):
    cfg, _, _, source = built
    first = _order(list(batch_iterator(cfg, source, shard_index=0, shard_count=1)))
    again = _order(list(batch_iterator(cfg, source, shard_index=0, shard_count=1)))
    assert first == again
    epochs = [sorted(x for b in first[e * 3:(e + 1) * 3] for x in b) for e in range(3)]
    assert all(e == [-1] + list(range(NUM_ROWS)) for e in epochs)
    assert first[0:3] != first[3:6] != first[6:9]
    other = _order(list(batch_iterator(dataclasses.replace(cfg, seed=6), source, shard_index=0,
                                       shard_count=1)))
    assert other != first
    plain = _order(list(batch_iterator(cfg, source, shard_index=0, shard_count=1,
                                       shuffle=False, num_epochs=1)))
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, -1]]


def test_two_hosts_disjoint_equal_batches(built):
    cfg, _, _, source = built
    hosts = [list(batch_iterator(cfg, source, shard_index=h, shard_count=2, num_epochs=1))
             for h in range(2)]
    # 11 pairs in global batches of 4: 3 batches, the last one topped up with a filler, 2 rows
    # of each for each host.
    assert [len(h) for h in hosts] == [3, 3]
    assert all(b["input_ids"].shape[0] == 2 for h in hosts for b in h)
    seen = [{int(x) for b in h for x, v in zip(b["pair_index"], b["pair_valid"]) if v}
            for h in hosts]
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(NUM_ROWS))
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        batch_iterator(cfg, source, shard_index=0, shard_count=3)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_global_order_is_the_same_for_any_host_count(shuffle, drop_remainder):
    """The hosts' rows of each global batch, in host order, are the one-host batch: 1, 2 and 4
    virtual hosts read the same sequence of pairs, epoch after epoch."""
    order = GlobalOrder(23, 8, seed=3, shuffle=shuffle, num_epochs=3,
                        drop_remainder=drop_remainder)
    assert len(order) == (2 if drop_remainder else 3) * 3
    one = [order.host_rows(i, 0, 1) for i in range(len(order))]
    assert one == [order.batch(i) for i in range(len(order))]
    for hosts in (2, 4):
        split = [sum((order.host_rows(i, h, hosts) for h in range(hosts)), [])
                 for i in range(len(order))]
        assert split == one, hosts
        assert all(len(order.host_rows(i, h, hosts)) == 8 // hosts
                   for i in range(len(order)) for h in range(hosts))
    per_epoch = len(order) // 3
    for e in range(3):
        pairs = [p for b in one[e * per_epoch:(e + 1) * per_epoch] for p in b]
        real = [p for p in pairs if p >= 0]
        assert len(real) == len(set(real)) == (16 if drop_remainder else 23)
        assert pairs.count(-1) == (0 if drop_remainder else 1)
    if shuffle:
        assert one[:per_epoch] != one[per_epoch:2 * per_epoch]
        assert one != [GlobalOrder(23, 8, seed=4, num_epochs=3,
                                   drop_remainder=drop_remainder).batch(i)
                       for i in range(len(order))]
    else:
        assert one[0] == list(range(8)) and one[per_epoch] == list(range(8))
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        order.host_rows(0, 0, 3)


def test_hosts_of_the_pipeline_read_the_one_host_batches(built):
    """Through the pipeline (shuffled, three epochs): the two hosts' rows of batch i, host 0's
    then host 1's, are the one-host batch i, tokens and all, and their common length bucket is
    the one-host batch's."""
    cfg, _, _, source = built
    one = list(batch_iterator(cfg, source, shard_index=0, shard_count=1))
    hosts = [list(batch_iterator(cfg, source, shard_index=h, shard_count=2)) for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(one) == 9
    for i, whole in enumerate(one):
        parts = [h[i] for h in hosts]
        assert max(p["input_ids"].shape[-1] for p in parts) == whole["input_ids"].shape[-1]
        for key in BATCH_KEYS:
            if whole[key].ndim == 3:  # pad each part to the batch's bucket, as the hosts agree
                got = np.concatenate([np.pad(p[key], [(0, 0), (0, 0), (0, whole[key].shape[-1]
                                                                   - p[key].shape[-1])])
                                      for p in parts])
                real = np.concatenate([np.pad(p["attention_mask"], [(0, 0), (0, 0), (
                    0, whole[key].shape[-1] - p[key].shape[-1])]) for p in parts]) == 1
                np.testing.assert_array_equal(got[real], whole[key][real], err_msg=key)
            else:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                              whole[key], err_msg=key)


@pytest.mark.parametrize("consumed", [1, 3, 4])  # mid-epoch, at and across an epoch boundary
def test_restored_iterator_yields_the_same_batches(built, consumed):
    cfg, _, _, source = built
    it = batch_iterator(cfg, source, shard_index=0, shard_count=1)
    for _ in range(consumed):
        next(it)
    state = it.get_state()
    expected = list(it)
    restored = batch_iterator(cfg, source, shard_index=0, shard_count=1)
    restored.set_state(state)
    got = list(restored)
    assert len(got) == len(expected) == 9 - consumed
    for a, b in zip(got, expected):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_pair_batches_random_access_matches_iteration(built):
    cfg, _, _, source = built
    ds = pair_batches(source, pairs_per_host=4, length_buckets=(32, 64, 96), seed=5,
                      num_epochs=3)
    assert len(ds) == 9
    iterated = list(batch_iterator(cfg, source, shard_index=0, shard_count=1))
    assert _order([ds[i] for i in range(9)]) == _order(iterated)


def test_resolved_buckets():
    assert resolved_buckets((), 1000) == (128, 256, 512, 1000)
    assert resolved_buckets((), 512) == (128, 256, 512)
    assert resolved_buckets((32, 64, 512), 100) == (32, 64, 100)
    with pytest.raises(ValueError, match="strictly increasing"):
        DataConfig(length_buckets=(64, 32)).validate()


def test_truncate_prompt_gives_both_sides_of_a_pair_the_same_prompt(tmp_path):
    # Chosen is 8 tokens longer than rejected: to fit, chosen loses 6 prompt tokens. Rejected
    # loses the same 6, so the pair's rewards are compared on one prompt: "6789abcdef".
    rows = [{"id": "a", "prompt": "0123456789abcdef", "chosen": "long answer",
             "rejected": "abc", "chosen_feedback": "ok", "rejected_feedback": "no"}]
    _write(tmp_path / "train.jsonl", rows)
    tok = byte_tokenizer()
    chosen = "<bos><|user|>0123456789abcdef<eot><|assistant|>long answer<eot><|user|>C: ok<eot>"
    chosen_tokens = 1 + 1 + 16 + 1 + 1 + 11 + 1 + 1 + 5 + 1  # one token a character
    cfg = _cfg(tmp_path, max_length=chosen_tokens - 6, length_buckets=(64,),
               overlength_policy="truncate_prompt")
    dataset = prepare_dataset(cfg, tok, "critique")
    record = open_split(dataset, "train")[0]
    assert tok.decode(record["chosen_input_ids"]) == chosen.replace("012345", "")
    assert tok.decode(record["rejected_input_ids"]) == (
        "<bos><|user|>6789abcdef<eot><|assistant|>abc<eot><|user|>C: no<eot>")
    assert dataset.stats["train"]["prompt_truncated"] == 1


def test_a_first_build_logged_to_a_file_has_no_progress_bars(tmp_path, monkeypatch):
    """TFDS draws tqdm bars while it builds a dataset; in a log file (a pod worker's stderr) their
    carriage-return redraws pile up, and the last one, with no newline, glues itself in front of
    the next log line. They are off where stderr is no terminal, for the build only; on a
    terminal they stay."""
    import io

    from tensorflow_datasets.core.utils import tqdm_utils

    _write(tmp_path / "train.jsonl", _rows())
    tok = byte_tokenizer()
    before = tqdm_utils._active
    log_file = tmp_path / "stderr.log"
    with open(log_file, "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        prepare_dataset(_cfg(tmp_path), tok, "critique")
        print("the next log line", file=f)
    monkeypatch.undo()
    text = log_file.read_text()
    # No bar, its redraws (carriage returns, cursor moves) or the blanks that erase it.
    assert text.strip(" \n") == "the next log line", repr(text[-2000:])
    assert tqdm_utils._active == before  # the build changes no global setting of TFDS's

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    prepare_dataset(_cfg(tmp_path, tfds_dir=str(tmp_path / "tfds2")), tok, "critique")
    monkeypatch.undo()
    assert "splits/s" in term.getvalue() or not before  # TFDS's bars, where they are on
