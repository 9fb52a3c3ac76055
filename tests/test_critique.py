"""Stage 2 (`python -m cloud_jax critique`): shards, provenance, resuming, several hosts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from distributed_helpers import run_joined
from model_helpers import tiny_reward_model

from cloud_jax.cli import critique
from cloud_jax.cli.common import run_command
from cloud_jax.scoring import relabel
from cloud_jax.data.schema import load_rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("critique")
    ckpt = tiny_reward_model(2).save_pretrained(root / "sft")
    rows = [{"id": f"r{i}", "prompt": f"Question {i}?", "chosen": f"Good answer {i}.",
             "rejected": f"Bad {i}", "chosen_feedback": "old", "rejected_feedback": "old",
             "subset": "s"} for i in range(5)]
    src = root / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ckpt, src


def run(setup, out, *extra):
    root, ckpt, src = setup
    return run_command(critique.main, [
        "--checkpoint", str(ckpt), "--input", str(src), "--output", str(out), "--shard-rows", "2",
        "--batch-size", "4", "--max-critique-tokens", "5", "--checkpoint-step", "100", *extra])


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def reference(setup):
    out = setup[0] / "uninterrupted"
    assert run(setup, out) == 0
    return out


def test_output_is_a_cloud_dataset_with_provenance(setup, reference):
    assert sorted(files(reference)) == [f"critiques-0000{i}-of-00003.jsonl" for i in range(3)] + [
        "provenance.json"]
    loaded = load_rows(str(reference / "critiques-*.jsonl"), require_feedback=True).rows
    assert [r.id for r in loaded] == [f"r{i}" for i in range(5)]
    assert all(r.chosen_feedback != "old" and r.subset == "s" for r in loaded)
    prov = json.loads((reference / "provenance.json").read_text())
    assert prov["checkpoint_step"] == 100 and prov["num_rows"] == 5
    assert prov["sampling"]["temperature"] == 0.0 and prov["sampling"]["seed"] == 0
    assert prov["sampling"]["max_critique_tokens"] == 5
    # No --max-length: the default it stands for, as runs before it recorded it.
    assert prov["sampling"]["max_length"] == 2048


def test_progress_in_a_log_is_lines_without_carriage_returns(setup, tmp_path, capsys):
    """stderr redirected to a file (not a terminal): no tqdm redraws, a plain line at the end."""
    capsys.readouterr()
    assert run(setup, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "critique: 10/10 responses (100.0%), " in err and "tokens_per_s=" in err


def test_interrupted_run_resumes_to_identical_files(setup, reference, monkeypatch):
    out = setup[0] / "interrupted"
    real_write = relabel.write_jsonl_atomic
    calls = []

    def write_then_die(path, objs):
        if calls:
            # Killed while writing the second shard: a partial temporary file is left behind.
            with open(f"{path}.tmp", "w") as f:
                f.write('{"id": "r2", "pro')
            raise KeyboardInterrupt
        calls.append(path)
        real_write(path, objs)

    monkeypatch.setattr(relabel, "write_jsonl_atomic", write_then_die)
    assert run(setup, out) == 130  # Ctrl-C: one `interrupted:` line (tests/test_cli_errors.py)
    monkeypatch.setattr(relabel, "write_jsonl_atomic", real_write)
    assert len([p for p in out.iterdir() if p.name.endswith(".jsonl")]) == 1
    # The shard written does not pass for the data set (the cloud stage reads this glob).
    with pytest.raises(FileNotFoundError, match="2 of the 3 shards"):
        load_rows(str(out / "critiques-*.jsonl"), require_feedback=True)
    assert run(setup, out) == 0
    assert files(out) == files(reference)


def test_two_hosts_split_the_shards(setup, reference):
    out = setup[0] / "two_hosts"
    assert run(setup, out, "--num-hosts", "2", "--host-index", "1") == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["critiques-00001-of-00003.jsonl"]
    assert run(setup, out, "--num-hosts", "2", "--host-index", "0") == 0
    assert files(out) == files(reference)


def test_other_settings_into_the_same_directory_are_refused(setup, reference, capsys):
    capsys.readouterr()
    assert run(setup, reference, "--seed", "1") == 2
    assert "seed" in capsys.readouterr().err
    # Weights in another precision give other critiques: refused too.
    assert run(setup, reference, "--param-dtype", "bfloat16") == 2
    assert "param_dtype" in capsys.readouterr().err


def test_a_resume_may_change_how_critiques_are_batched_but_not_the_rows(setup, reference,
                                                                         tmp_path, capsys):
    """The batch size, the checks per step and the decode phases give the same critiques, so a
    resume may change them (a smaller batch after running out of memory); rows whose contents
    changed are refused, even when their path and count are the same."""
    root, ckpt, src = setup

    def started(name):  # a run into `name` stopped after its first shard
        out = tmp_path / name
        out.mkdir()
        for file in ("provenance.json", "critiques-00000-of-00003.jsonl"):
            (out / file).write_bytes((reference / file).read_bytes())
        return out

    out = started("resumed")
    assert run(setup, out, "--batch-size", "2", "--steps-per-check", "3",
               "--decode-phases", "1") == 0
    assert files(out) == files(reference)
    original = src.read_text()
    capsys.readouterr()
    try:
        src.write_text(original.replace("Question 4?", "Question 4, changed?"))
        assert run(setup, started("changed")) == 2
    finally:
        src.write_text(original)
    assert "rows_sha256" in capsys.readouterr().err


def test_a_resume_may_name_a_step_the_first_run_left_unrecorded_but_not_another(
        setup, reference, tmp_path, capsys):
    """A provenance whose checkpoint_step is null recorded no step (the pipeline's
    self_critique stage wrote such before it passed the SFT stage's step): a resume that names
    one goes on; a step other than the one recorded is refused."""
    out = tmp_path / "unrecorded"
    out.mkdir()
    provenance = json.loads((reference / "provenance.json").read_text())
    assert provenance["checkpoint_step"] == 100
    (out / "provenance.json").write_text(json.dumps({**provenance, "checkpoint_step": None}))
    name = "critiques-00000-of-00003.jsonl"
    (out / name).write_bytes((reference / name).read_bytes())
    assert run(setup, out) == 0
    assert {n: b for n, b in files(out).items() if n != "provenance.json"} == \
        {n: b for n, b in files(reference).items() if n != "provenance.json"}
    capsys.readouterr()
    assert run(setup, reference, "--checkpoint-step", "5") == 2
    assert "checkpoint_step" in capsys.readouterr().err


def test_a_resume_may_give_max_length_as_any_value_held_to_the_same_limit(setup, reference,
                                                                           tmp_path, capsys):
    """A max_length the model's positions hold to the same limit samples the same critiques:
    the tiny model's 2048 positions leave 2042 tokens after a 5-token critique, so the default
    (recorded as 2048, as runs before it recorded it), 2048 and 4096 resume one another. The
    pipeline holds data.max_length to that limit itself now, and its self-critiques recorded
    before still resume. A max_length below the limit is another setting."""
    for given in ("4096", "2042"):
        out = tmp_path / given
        out.mkdir()
        for file in ("provenance.json", "critiques-00000-of-00003.jsonl"):
            (out / file).write_bytes((reference / file).read_bytes())
        assert run(setup, out, "--max-length", given) == 0
        assert files(out) == files(reference)
    capsys.readouterr()
    assert run(setup, reference, "--max-length", "2041") == 2
    assert "sampling.max_length" in capsys.readouterr().err


def test_a_resume_over_other_weights_at_the_same_path_is_refused(setup, tmp_path, capsys):
    """The checkpoint directory retrained (rewritten) in place between a run and its resume: the
    weights' digest in the provenance refuses the mix of two models' critiques."""
    root, _, src = setup
    ckpt = tiny_reward_model(2).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--input", str(src), "--output", str(out),
            "--shard-rows", "2", "--batch-size", "4", "--max-critique-tokens", "3"]
    assert run_command(critique.main, args) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert len(provenance["weights_sha256"]) == 64
    (out / "critiques-00002-of-00003.jsonl").unlink()  # as if stopped before the last shard
    assert run_command(critique.main, args) == 0  # the same weights: resumed
    tiny_reward_model(3).save_pretrained(ckpt)
    capsys.readouterr()
    assert run_command(critique.main, args) == 2
    assert "weights_sha256" in capsys.readouterr().err


def test_empty_inputs_are_usage_errors(setup, tmp_path, capsys):
    from cloud_jax.cli import evaluate, score

    root, ckpt, _ = setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for main, args in ((critique.main, ["--output", str(tmp_path / "c")]),
                       (score.main, ["--output", str(tmp_path / "s.jsonl")])):
        assert run_command(main, ["--checkpoint", str(ckpt), "--input", str(empty), *args]) == 2
        assert "no rows in" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert run_command(evaluate.main, ["--checkpoint", str(ckpt), "--best-of-n", str(empty),
                                       "--output-dir", str(tmp_path / "e")]) == 2
    assert "no Best-of-N rows" in capsys.readouterr().err


def test_a_classic_checkpoint_is_refused_before_anything_is_written(setup, tmp_path, capsys):
    """A classic (feedback_method 'vanilla') model writes no critiques: stage 2 from one is a
    user error naming the cause, not an IndexError after the provenance is written."""
    import dataclasses

    root, _, src = setup
    vanilla = dataclasses.replace(tiny_reward_model(2), feedback_method="vanilla")
    ckpt = vanilla.save_pretrained(tmp_path / "classic")
    out = tmp_path / "out"
    assert run((root, ckpt, src), out) == 2
    err = capsys.readouterr().err
    assert "a classic reward model writes no critiques" in err and "vanilla" in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    rows = load_rows(str(src), require_feedback=False).rows
    with pytest.raises(relabel.ConfigError, match="classic"):
        relabel.relabel(vanilla, rows, str(tmp_path / "api"), relabel.ScoreConfig(classic=True))


def test_a_too_long_row_is_named_by_its_line_and_field(setup, tmp_path, capsys):
    root, ckpt, _ = setup
    rows = [{"id": f"r{i}", "prompt": "Q?", "chosen": "Yes.", "rejected": "No."}
            for i in range(5)]
    rows[3]["rejected"] = "x" * 300  # line 4: the second row of the second shard
    src = tmp_path / "long.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run((root, ckpt, src), tmp_path / "out", "--max-length", "200") == 2
    err = capsys.readouterr().err
    assert f"{src}:4: field 'rejected': " in err
    # In the command's flags; from Python, in the settings' names.
    assert "over --max-length 200 " in err and "; raise --max-length or shorten" in err
    rows = load_rows(str(src), require_feedback=False).rows
    with pytest.raises(relabel.ConfigError, match=f"{src}:4: field 'rejected': .*over "
                                                  "max_length=200 .*; raise max_length or"):
        relabel.relabel(tiny_reward_model(2), rows, str(tmp_path / "api"),
                        relabel.ScoreConfig(max_length=200, max_critique_tokens=5),
                        relabel.RelabelSettings(shard_rows=2))


def test_a_column_json_cannot_hold_is_named_before_any_critique_is_sampled(setup, tmp_path,
                                                                          capsys, monkeypatch):
    # An unread column holding NaN (pandas writes a missing number so; Python's JSON reader takes
    # it) or a time (a Parquet timestamp) cannot be written back out as JSON: the run says so
    # before it samples, not after a whole shard's critiques.
    root, ckpt, _ = setup
    rows = [{"id": f"r{i}", "prompt": "Q?", "chosen": "Yes.", "rejected": "No.", "score": i}
            for i in range(3)]
    src = tmp_path / "nan.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows).replace('"score": 2', '"score": NaN'))
    sampled = []
    monkeypatch.setattr(relabel, "regenerate", lambda *a, **k: sampled.append(1))
    out = tmp_path / "out"
    assert run((root, ckpt, src), out) == 2
    err = capsys.readouterr().err
    assert f"{src}:3: field 'score': " in err and "NaN" in err
    assert not sampled and not out.exists()
    # `score` writes every column back out beside the rewards: the same check, before scoring.
    from cloud_jax.cli import score

    monkeypatch.setattr(score, "score", lambda *a, **k: sampled.append(1))
    assert run_command(score.main, ["--checkpoint", str(ckpt), "--input", str(src),
                                    "--output", str(tmp_path / "s.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3: field 'score': " in err and "NaN" in err
    assert not sampled and not (tmp_path / "s.jsonl").exists()

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    import datetime
    table = pa.table({"id": ["a", "b"], "prompt": ["Q?", "Q?"], "chosen": ["Yes.", "Yes!"],
                      "rejected": ["No.", "No!"],
                      "when": [datetime.datetime(2026, 1, 1), datetime.datetime(2026, 1, 2)]})
    pq.write_table(table, tmp_path / "rows.parquet")
    assert run((root, ckpt, tmp_path / "rows.parquet"), out) == 2
    err = capsys.readouterr().err
    assert "field 'when': " in err and "JSON" in err
    assert not sampled and not out.exists()


def test_an_unsupported_url_output_is_a_usage_error(setup, capsys):
    assert run(setup, "ftp://bucket/self_critique") == 2
    assert ("--output='ftp://bucket/self_critique': unsupported URL scheme 'ftp'"
            in capsys.readouterr().err)


@pytest.mark.slow
def test_killed_process_restarts_to_identical_files(setup, tmp_path):
    """A real SIGKILL of `python -m cloud_jax critique` after its first shard, then a rerun."""
    root, ckpt, _ = setup
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps({"id": f"m{i}", "prompt": f"Q{i}?", "chosen": f"A{i}.",
                                       "rejected": f"B{i}"}) + "\n" for i in range(120)))
    args = ["--checkpoint", str(ckpt), "--input", str(src), "--shard-rows", "2",
            "--batch-size", "4", "--max-critique-tokens", "5"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cloud_jax", "critique", *args, "--output",
                             str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(killed.glob("critiques-*.jsonl")) and time.time() < deadline:
            assert proc.poll() is None, "the critique command ended before writing a shard"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list(killed.glob("critiques-*.jsonl")))
    assert 0 < done < 60, f"{done} of 60 shards written when killed: not midway"
    assert critique.main([*args, "--output", str(killed)]) == 0
    whole = tmp_path / "whole"
    assert critique.main([*args, "--output", str(whole)]) == 0
    assert files(killed) == files(whole)


@pytest.mark.slow
def test_two_processes_split_the_shards_and_write_what_one_writes(setup, reference, tmp_path):
    """`python -m cloud_jax critique` started on two processes joined by jax.distributed (on
    127.0.0.1, as on a pod's workers), each sampling on its own two-device tensor mesh."""
    root, ckpt, src = setup
    out = tmp_path / "two"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "cloud_jax", "critique", "--checkpoint", str(ckpt), "--input",
           str(src), "--output", str(out), "--shard-rows", "2", "--batch-size", "4",
           "--max-critique-tokens", "5", "--checkpoint-step", "100", "--mesh", "tensor=2"]
    for i, err in enumerate(run_joined(cmd, 2, env, timeout=300)):
        # 3 shards: host 0 takes shards 0 and 2, host 1 shard 1.
        assert f"host {i}/2: {2 - i} shards" in err, err[-3000:]
        assert "{'data': 1, 'fsdp': 1, 'tensor': 2} mesh of 2 local device(s)" in err
    assert files(out) == files(reference)


@pytest.mark.parametrize("hosts", ["0", "-2"])
def test_a_host_count_below_one_is_named_as_num_hosts(setup, tmp_path, capsys, hosts):
    with pytest.raises(SystemExit) as exit_:
        run(setup, tmp_path / "out", "--num-hosts", hosts)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--num-hosts {hosts}: must be >= 1" in err and "--host-index" not in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_a_negative_checkpoint_step_is_refused_before_anything_is_written(setup, tmp_path,
                                                                         capsys):
    with pytest.raises(SystemExit) as exit_:
        run(setup, tmp_path / "out", "--checkpoint-step", "-5")
    assert exit_.value.code == 2
    assert "--checkpoint-step -5: must be >= 0" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
    rows = load_rows(str(setup[2]), require_feedback=False).rows
    with pytest.raises(relabel.ConfigError, match="checkpoint_step=-5: must be >= 0"):
        relabel.relabel(tiny_reward_model(2), rows, str(tmp_path / "api"),
                        relabel.ScoreConfig(), relabel.RelabelSettings(checkpoint_step=-5))
    assert not (tmp_path / "api").exists()


def test_more_than_one_critique_per_response_is_refused_before_any_sampling(setup, tmp_path,
                                                                           monkeypatch):
    """Stage 2 writes one critique per response: K samples would cost K times as much for the
    first alone, so num_samples other than 1 is refused before anything is sampled or written."""
    rows = load_rows(str(setup[2]), require_feedback=False).rows
    sampled = []
    monkeypatch.setattr(relabel, "score", lambda *a, **kw: sampled.append(a))
    with pytest.raises(relabel.ConfigError, match="num_samples=3: .*one critique"):
        relabel.relabel(tiny_reward_model(2), rows, str(tmp_path / "api"),
                        relabel.ScoreConfig(num_samples=3))
    assert not sampled and not (tmp_path / "api").exists()


def test_a_resume_with_another_recorded_tokenization_of_the_same_weights_is_refused(
        setup, reference, tmp_path, capsys):
    """The provenance records the critique-turn tokenization the critiques were sampled with
    (the model's layout_version), not null: a resume whose checkpoint records another one, the
    weights unchanged, is refused instead of mixing critiques of two layouts. A provenance of
    an earlier release (null there) still resumes."""
    import shutil

    provenance = json.loads((reference / "provenance.json").read_text())
    assert provenance["sampling"]["layout_version"] is not None
    assert provenance["sampling"]["classic"] is False
    root, ckpt, src = setup
    older = tmp_path / "older"
    older.mkdir()
    (older / "provenance.json").write_text(json.dumps(
        {**provenance, "sampling": {**provenance["sampling"], "layout_version": None,
                                    "classic": None}}))
    name = "critiques-00000-of-00003.jsonl"
    (older / name).write_bytes((reference / name).read_bytes())
    assert run(setup, older) == 0
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    config = json.loads((other / "config.json").read_text())
    version = provenance["sampling"]["layout_version"]
    (other / "config.json").write_text(json.dumps({**config, "layout_version": 1 if version != 1
                                                   else 3}))
    capsys.readouterr()
    assert run((root, other, src), reference) == 2
    assert "sampling.layout_version" in capsys.readouterr().err
