"""Every command's user errors: one ``error:`` line naming the offending thing, exit status 2, and
no traceback (``--debug`` brings the traceback back)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cloud_jax
from cloud_jax.__main__ import main
from cloud_jax.data.tokenizer import byte_tokenizer
from cloud_jax.model import param_shapes
from cloud_jax.model.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny_cpu_classic.yaml")
CFG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=2)


@pytest.fixture(autouse=True)
def _root_log_handlers():
    # Commands point the root logger at the stderr of their time, which capsys closes afterwards.
    handlers = list(logging.root.handlers)
    yield
    logging.root.handlers[:] = handlers


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                          param_shapes(CFG))
    ckpt = cloud_jax.RewardModel(CFG, params, byte_tokenizer()).save_pretrained(root / "ckpt")
    alien = shutil.copytree(ckpt, root / "alien")
    config = json.loads((ckpt / "config.json").read_text())
    config["base_model_config"]["model_type"] = "mamba"
    (alien / "config.json").write_text(json.dumps(config))
    (root / "empty").mkdir()
    good = {"id": "r0", "prompt": "p", "chosen": "c", "rejected": "r", "chosen_feedback": "f",
            "rejected_feedback": "f"}
    rows = root / "rows.jsonl"
    rows.write_text(json.dumps(good) + "\n")
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": 7}) + "\n")
    return {"root": root, "ckpt": str(ckpt), "alien": str(alien), "empty": str(root / "empty"),
            "rows": str(rows), "bad": str(bad), "missing": str(root / "missing.jsonl")}


def user_error(capsys, argv, *named):
    """Runs ``python -m cloud_jax ARGV`` in process; returns its one error line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for thing in named:
        assert thing in lines[0], err
    return lines[0]


def test_train(capsys, files, tmp_path):
    from cloud_jax.cli.common import run_command
    from cloud_jax.cli.train import main as train

    def train_error(argv, *named):
        capsys.readouterr()
        assert run_command(train, argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        for thing in named:
            assert thing in lines[0], err

    out = f"output_dir={tmp_path / 'out'}"
    train_error(["--config", str(tmp_path / "nope.yaml")], "nope.yaml")
    train_error(["--config", TINY_YAML, "train.nonsense=1", out], "nonsense")
    train_error(["--config", TINY_YAML, "train.total_steps=many", out], "total_steps")
    train_error(["--config", TINY_YAML, f"data.train_path={files['missing']}",
                 "data.eval_path=\"\"", f"data.tfds_dir={tmp_path / 'tfds'}", "init_from=\"\"",
                 out], "missing.jsonl")
    # A tokenizer that does not load (a directory not made yet, e.g. before `make smollm2`)
    # names the key, not a transformers traceback.
    train_error(["--config", TINY_YAML, f"data.train_path={files['rows']}", "data.eval_path=\"\"",
                 f"data.tfds_dir={tmp_path / 'tfds'}", f"data.tokenizer={tmp_path / 'no_tok'}",
                 "init_from=\"\"", out], "data.tokenizer=", "no_tok")
    # A config without train rows (configs/tiny_cpu.yaml is a model config) names the key.
    train_error(["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), out],
                "data.train_path")


def test_a_missing_tokenizer_directory_is_named_as_one(capsys, files, tmp_path, monkeypatch):
    # A tokenizer path not made yet (`.cache/smollm2-135m-instruct` before `make smollm2`, the
    # smollm2 configs' data.tokenizer) says there is no such directory, as init_from does, not
    # what the hub client says of it as a repository name ("Repo id must use alphanumeric ...").
    from cloud_jax.cli.common import run_command
    from cloud_jax.cli.train import main as train

    monkeypatch.chdir(tmp_path)
    for tok in (".cache/smollm2-135m-instruct", str(tmp_path / "tok" / "missing")):
        capsys.readouterr()
        assert run_command(train, ["--config", TINY_YAML, f"data.train_path={files['rows']}",
                                   "data.eval_path=\"\"", f"data.tfds_dir={tmp_path / 'tfds'}",
                                   f"data.tokenizer={tok}", "init_from=\"\"",
                                   f"output_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "data.tokenizer=" in lines[0] and "no such directory" in lines[0], err
        assert "Repo id" not in lines[0] and "repo_type" not in lines[0], err
        capsys.readouterr()
        assert main(["score", "--checkpoint", files["ckpt"], "--tokenizer", tok, "--input",
                     files["rows"], "--output", str(tmp_path / "s.jsonl")]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "--tokenizer" in lines[0], err
        assert "no such directory" in lines[0] and "Repo id" not in lines[0], err


def test_a_missing_local_init_from_is_named_before_the_data_is_prepared(capsys, files, tmp_path):
    # A typo in init_from (a local path: not a hub id's owner/name form) is one error line naming
    # the key, before the rows are tokenized: that can take hours on a real dataset.
    from cloud_jax.cli.common import run_command
    from cloud_jax.cli.train import main as train

    for init in (tmp_path / "stage1" / "final", "./final", "stage1/final/"):
        capsys.readouterr()
        assert run_command(train, ["--config", TINY_YAML, f"data.train_path={files['rows']}",
                                   "data.eval_path=\"\"", f"data.tfds_dir={tmp_path / 'tfds'}",
                                   f"init_from={init}", f"output_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "init_from" in lines[0] and str(init) in lines[0], err
        assert not (tmp_path / "tfds").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["score", "critique", "evaluate", "serve"])
def test_a_bad_sampling_flag_is_named_as_the_flag(capsys, files, tmp_path, command):
    # The checks are the Python API's (top_k=0, "give top_k or top_p"): a command line names
    # its flags (it said top_k=0; serve said "--top-k: top_k: top_k=0").
    out = (["--output-dir", str(tmp_path / "o")] if command == "evaluate" else [] if
           command == "serve" else ["--output", str(tmp_path / "o.jsonl")])
    src = [] if command == "serve" else ["--input", files["rows"]]
    base = [command, "--checkpoint", files["ckpt"], *src, *out, "--temperature", "1"]
    for flags, named in ((["--top-k", "0"], "--top-k 0: must be >= 1"),
                         (["--top-k", "5", "--top-p", "0.5"], "give --top-k or --top-p, not both"),
                         (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            code = main(base + flags)
            raise SystemExit(code)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and named in err and "top_k" not in err \
            and "repetition_penalty" not in err, err


def test_a_row_file_of_an_unknown_type_is_one_error_line_not_a_traceback(capsys, files,
                                                                           tmp_path):
    # A .csv (or a README a glob picked up) in data.train_path / --input is the user's to fix:
    # one line naming the file and the types read, status 2 (it was a ValueError traceback, 1).
    from cloud_jax.cli.common import run_command
    from cloud_jax.cli.train import main as train

    rows = tmp_path / "rows.csv"
    rows.write_text("id,prompt,chosen,rejected\n")
    capsys.readouterr()
    assert run_command(train, ["--config", TINY_YAML, f"data.train_path={rows}",
                               "data.eval_path=\"\"", f"data.tfds_dir={tmp_path / 'tfds'}",
                               "init_from=\"\"", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "rows.csv" in lines[0] and "'.csv'" in lines[0] and ".jsonl" in lines[0], err
    user_error(capsys, ["score", "--checkpoint", files["ckpt"], "--input", str(rows), "--output",
                        str(tmp_path / "o.jsonl")], "rows.csv", "'.csv'")


def test_score(capsys, files, tmp_path):
    out = str(tmp_path / "o.jsonl")

    def score(checkpoint, src):
        return ["score", "--checkpoint", checkpoint, "--input", src, "--output", out]

    user_error(capsys, score(files["ckpt"], files["missing"]), "missing.jsonl")
    user_error(capsys, score(str(tmp_path / "no_ckpt"), files["rows"]), "no_ckpt")
    user_error(capsys, score(files["empty"], files["rows"]), files["empty"])
    user_error(capsys, score(files["alien"], files["rows"]), "mamba")
    user_error(capsys, score(files["ckpt"], files["bad"]), "bad.jsonl:2", "chosen")
    user_error(capsys, score(files["ckpt"], files["rows"]) + ["--tokenizer",
                                                              str(tmp_path / "no_tok")],
               "--tokenizer", "no_tok")
    # An existing directory as --output is refused before any scoring (it used to fail at the
    # very end, naming a temporary file and leaving it behind).
    user_error(capsys, ["score", "--checkpoint", files["ckpt"], "--input", files["rows"],
                        "--output", files["empty"]], files["empty"], "is a directory")
    assert not [n for n in os.listdir(os.path.dirname(files["empty"]))
                if n.startswith(os.path.basename(files["empty"]) + ".tmp")]
    # K > 1 from a classic model is refused, not silently scored with K = 1 (as evaluate does).
    with pytest.raises(SystemExit) as exit_:
        main(score(files["ckpt"], files["rows"]) + ["--classic", "--num-samples", "2"])
    assert exit_.value.code == 2 and "--num-samples" in capsys.readouterr().err
    vanilla = shutil.copytree(files["ckpt"], tmp_path / "vanilla")
    config = json.loads((vanilla / "config.json").read_text())
    (vanilla / "config.json").write_text(json.dumps({**config, "feedback_method": "vanilla"}))
    user_error(capsys, score(str(vanilla), files["rows"]) + ["--num-samples", "2"],
               "classic reward model", "--no-classic")
    assert not os.path.exists(out)


def test_score_refuses_a_directory_for_its_output_before_scoring(capsys, files, tmp_path,
                                                                  monkeypatch):
    from cloud_jax.cli import score

    def no_model(_):
        raise AssertionError("the model was loaded: the output is checked after the work")

    monkeypatch.setattr(score, "load_model", no_model)
    (tmp_path / "existing").mkdir()
    for output in (str(tmp_path / "existing"), str(tmp_path / "new") + "/"):
        user_error(capsys, ["score", "--checkpoint", files["ckpt"], "--input", files["rows"],
                            "--output", output], output, "is a directory")
    assert sorted(os.listdir(tmp_path)) == ["existing"]  # no temporary file left behind


def test_serve(capsys, files, tmp_path):
    def serve(checkpoint, *flags):
        return ["serve", "--checkpoint", checkpoint, "--port", "0", *flags]

    user_error(capsys, serve(str(tmp_path / "no_ckpt")), "no_ckpt")
    # A port in use is an error at once, before the model loads (it used to load, compile, log
    # "ready" and then fail in uvicorn with exit status 3).
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        user_error(capsys, ["serve", "--checkpoint", str(tmp_path / "no_ckpt"), "--port", port],
                   f"--port {port}", "cannot listen")
    user_error(capsys, serve(files["empty"]), files["empty"])
    user_error(capsys, serve(files["alien"]), "mamba")
    with pytest.raises(SystemExit) as exit_:
        main(serve(files["ckpt"], "--num-samples", "0"))
    assert exit_.value.code == 2 and "--num-samples" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(serve(files["ckpt"], "--temperature", "-1"))
    assert exit_.value.code == 2 and "--temperature" in capsys.readouterr().err
    # A bad sampling flag is named before the model loads (a missing checkpoint is not reached).
    with pytest.raises(SystemExit) as exit_:
        main(serve(str(tmp_path / "no_ckpt"), "--temperature", "0.7", "--top-p", "1.5"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--top-p" in err and "no_ckpt" not in err


def test_critique(capsys, files, tmp_path):
    def critique(checkpoint, src):
        return ["critique", "--checkpoint", checkpoint, "--input", src, "--output",
                str(tmp_path / "out")]

    user_error(capsys, critique(files["ckpt"], files["missing"]), "missing.jsonl")
    user_error(capsys, critique(str(tmp_path / "no_ckpt"), files["rows"]), "no_ckpt")
    user_error(capsys, critique(files["alien"], files["rows"]), "mamba")
    user_error(capsys, critique(files["ckpt"], files["bad"]), "bad.jsonl:2", "chosen")


def test_evaluate(capsys, files, tmp_path):
    def evaluate(checkpoint, src):
        return ["evaluate", "--checkpoint", checkpoint, "--input", src, "--output-dir",
                str(tmp_path / "out")]

    user_error(capsys, evaluate(files["ckpt"], files["missing"]), "missing.jsonl")
    user_error(capsys, evaluate(files["ckpt"], files["bad"]), "bad.jsonl:2", "chosen")
    user_error(capsys, evaluate(files["empty"], files["rows"]), files["empty"])


def test_export_refuses_a_base_model_name_it_would_not_record(capsys, files, tmp_path):
    """--base-model-name that is no hub id (a local path, which an export never records) is a
    usage error, not silently replaced by base_config."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["export-hf", "--checkpoint", files["ckpt"], "--out", str(out),
              "--base-model-name", "/models/llama3-8b"])
    assert exit_.value.code == 2
    assert "--base-model-name '/models/llama3-8b' is not a hub id" in capsys.readouterr().err
    assert not out.exists()
    assert main(["export-hf", "--checkpoint", files["ckpt"], "--out", str(out),
                 "--base-model-name", "owner/base"]) == 0
    assert json.loads((out / "config.json").read_text())["base_model_name_or_path"] == "owner/base"


def test_export_convert_make_benchmark_pipeline(capsys, files, tmp_path):
    out = str(tmp_path / "out")
    user_error(capsys, ["export-hf", "--checkpoint", str(tmp_path / "no_ckpt"), "--out", out],
               "no_ckpt")
    user_error(capsys, ["export-hf", "--checkpoint", files["alien"], "--out", out], "mamba")
    user_error(capsys, ["convert-gguf", "--gguf", str(tmp_path / "m.gguf"), "--out", out],
               "m.gguf")
    user_error(capsys, ["make-benchmark", "--out", out, "--ops", "add,div"], "ops")
    user_error(capsys, ["make-benchmark", "--out", out, "--op-weights", "1,x"], "1,x")
    user_error(capsys, ["pipeline", "--config", os.path.join(ROOT, "configs", "demo_cpu.yaml"),
                        "stages.cloud.nonsense=1", f"output_dir={out}"], "nonsense")
    user_error(capsys, ["pipeline", "--config", str(tmp_path / "nope.yaml")], "nope.yaml")


def test_aot_bench_and_usage_errors(capsys, tmp_path):
    pytest.importorskip("libtpu")
    user_error(capsys, ["aot", "--config", TINY_YAML, "--topology", "v9z-3"], "--topology")
    user_error(capsys, ["aot", "--config", TINY_YAML, "train.nonsense=1", "--topology", "v5e-4"],
               "nonsense")


def test_bench_and_usage_errors_keep_argparse_status(capsys):
    user_error(capsys, ["bench", "nonsense"], "nonsense")
    user_error(capsys, ["no-such-command"], "no-such-command")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "train", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_the_real_exit_status_and_debug(files, tmp_path):
    argv = [sys.executable, "-m", "cloud_jax", "export-hf", "--checkpoint",
            str(tmp_path / "no_ckpt"), "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2, plain.stderr
    assert "no_ckpt" in plain.stderr and "Traceback" not in plain.stderr
    debug = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True,
                           env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr


# `python -m cloud_jax ARGV`, with `score`'s scoring touching argv[1] (a marker) and then waiting
# there for a signal.
PAUSED_SCORE = """
import os, sys, time
from cloud_jax.cli import score

def pausing_score(*args, **kwargs):
    open(sys.argv[1], "w").close()
    time.sleep(600)

score.score = pausing_score
from cloud_jax.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_outside_training_exits_75_with_one_line(capsys, files, tmp_path):
    """Preemption during `score` (as during `critique`, `evaluate` or a trainer's set-up): status
    75 and one `preempted:` line, as a training run stopped in its step loop; nothing is written,
    and the same command then writes the whole output."""
    import time

    from cloud_jax.errors import PREEMPTED_EXIT_CODE

    marker, out = str(tmp_path / "scoring"), str(tmp_path / "scored.jsonl")
    argv = ["score", "--checkpoint", files["ckpt"], "--input", files["rows"], "--output", out,
            "--max-critique-tokens", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_SCORE, marker, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("preempted: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "run the same command again" in lines[0]
    assert not os.path.exists(out)
    assert main(argv) == 0
    assert len(open(out).readlines()) == 1


def test_export_and_convert_write_into_a_non_empty_out_only_when_told(capsys, files, tmp_path):
    """Another model's files of other names (a chat template, base_config/) would stay beside the
    new model's and be loaded with it: a non-empty --out is a usage error without --overwrite."""
    from test_gguf import write_tiny_llama_gguf

    write_tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "other_model"
    out.mkdir()
    (out / "chat_template.jinja").write_text("another model's chat template")
    convert = ["convert-gguf", "--gguf", str(tmp_path / "m.gguf"), "--out", str(out)]
    for argv in (["export-hf", "--checkpoint", files["ckpt"], "--out", str(out)], convert):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert f"error: --out {out} is not empty; pass --overwrite" in capsys.readouterr().err
        assert (out / "chat_template.jinja").is_file()
        assert main([*argv, "--overwrite"]) == 0
        assert (out / "config.json").is_file()
    # The same file converted there already: nothing to write over, so no flag needed.
    assert main(convert) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_convert_from_a_url_refuses_a_non_empty_local_out_before_the_download(
        capsys, tmp_path, monkeypatch):
    """--gguf gs://... is copied to a local file first: a local --out that holds other files (no
    conversion of a file of that name) is refused before that download, not after it; one that
    holds a conversion of a file of that name still needs the file to tell, so it is copied."""
    from test_gguf import write_tiny_llama_gguf

    from cloud_jax import storage

    write_tiny_llama_gguf(tmp_path / "m.gguf")
    copies = []

    def copy_file(src, dst):
        copies.append(src)
        shutil.copyfile(tmp_path / storage.basename(src), dst)

    monkeypatch.setattr(storage, "check_path", lambda path, what: None)
    monkeypatch.setattr(storage, "isfile", lambda path: True)
    monkeypatch.setattr(storage, "copy_file", copy_file)
    out = tmp_path / "other_model"
    out.mkdir()
    (out / "notes.txt").write_text("not a model")
    argv = ["convert-gguf", "--gguf", "gs://bucket/m.gguf", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"error: --out {out} is not empty; pass --overwrite" in capsys.readouterr().err
    assert copies == []
    assert main([*argv, "--overwrite"]) == 0 and copies == ["gs://bucket/m.gguf"]
    # The same file's conversion there: the object is read to compare, and nothing written.
    assert main(argv) == 0 and len(copies) == 2
    assert "nothing to do" in capsys.readouterr().out


def test_an_export_over_an_earlier_one_never_keeps_its_chat_template(files, tmp_path):
    """A tokenizer without a chat template writes no chat_template.jinja: an earlier export's,
    left in --out, was read back as the new model's template. It is removed; the export loads
    with the tokenizer's own (none: cloud_jax's default)."""
    from transformers import AutoTokenizer

    from cloud_jax.data.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer

    plain = byte_tokenizer()
    plain.chat_template = None
    source = cloud_jax.load(files["ckpt"])
    source = cloud_jax.RewardModel(source.config, source.params, plain).save_pretrained(
        tmp_path / "no_template")
    for fmt in ("cloud", "backbone"):
        out = tmp_path / f"out_{fmt}"
        out.mkdir()
        (out / "chat_template.jinja").write_text("{{ 'an earlier model' }}")
        assert main(["export-hf", "--checkpoint", str(source), "--out", str(out),
                     "--format", fmt, "--overwrite"]) == 0
        assert not (out / "chat_template.jinja").exists(), fmt
        assert AutoTokenizer.from_pretrained(str(out)).chat_template is None, fmt
        assert load_tokenizer(str(out)).chat_template == DEFAULT_CHAT_TEMPLATE, fmt


def test_serve_takes_an_ipv6_host_with_or_without_brackets(capsys, tmp_path):
    """--host [::1], as a URL writes it, was handed to bind() with its brackets: 'cannot listen
    there'. Both spellings bind; the missing checkpoint is then the one error."""
    import socket
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    for host in ("::1", "[::1]"):
        line = user_error(capsys, ["serve", "--checkpoint", str(tmp_path / "no_ckpt"),
                                   "--port", "0", "--host", host], "no_ckpt")
        assert "cannot listen" not in line


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_refuses_a_port_out_of_range(capsys, tmp_path, port):
    """A usage error before the model loads, not an OverflowError traceback from bind()."""
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--checkpoint", str(tmp_path / "never_loaded"), "--port", port])
    assert exit_.value.code == 2
    assert f"error: --port {port}: must lie in [0, 65535]" in capsys.readouterr().err


def test_export_refuses_a_base_model_name_a_backbone_export_would_drop(capsys, files, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["export-hf", "--checkpoint", files["ckpt"], "--out", str(tmp_path / "bb"),
              "--format", "backbone", "--base-model-name", "owner/base"])
    assert exit_.value.code == 2
    assert "--base-model-name is recorded by a CLoud export" in capsys.readouterr().err
    assert not (tmp_path / "bb").exists()


def test_ctrl_c_exits_130_with_one_line_and_the_rerun_writes_the_output(files, tmp_path):
    """Ctrl-C (SIGINT) during `score` (as during `critique` or `evaluate`): status 130 and one
    `interrupted:` line saying how to resume, not a traceback of wherever the signal landed;
    nothing is written, and the same command then writes the whole output."""
    import signal
    import time

    from cloud_jax.errors import INTERRUPTED_EXIT_CODE

    marker, out = str(tmp_path / "scoring"), str(tmp_path / "scored.jsonl")
    argv = ["score", "--checkpoint", files["ckpt"], "--input", files["rows"], "--output", out,
            "--max-critique-tokens", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    # Python's own Ctrl-C handler, even where the tests run with SIGINT ignored (a background job
    # of a shell script passes that on to its children).
    script = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    proc = subprocess.Popen([sys.executable, "-c", script + PAUSED_SCORE, marker, *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "run the same command again" in lines[0]
    assert not os.path.exists(out)
    assert main(argv) == 0
    assert len(open(out).readlines()) == 1


def test_an_output_directory_that_is_a_file_is_named_as_the_flag_before_any_work(capsys, files,
                                                                              tmp_path,
                                                                              monkeypatch):
    """--out / --output / --output-dir naming an existing file: one error line naming the flag,
    before the model loads (was os.makedirs' "File exists", after loading it)."""
    taken = tmp_path / "taken"
    taken.write_text("x")
    monkeypatch.setattr(cloud_jax, "load", lambda *a, **k: pytest.fail("model loaded"))
    for argv, flag in (
            (["critique", "--checkpoint", files["ckpt"], "--input", files["rows"], "--output",
              str(taken)], "--output"),
            (["evaluate", "--checkpoint", files["ckpt"], "--input", files["rows"],
              "--output-dir", str(taken)], "--output-dir"),
            (["export-hf", "--checkpoint", files["ckpt"], "--out", str(taken)], "--out"),
            (["make-benchmark", "--out", str(taken), "--train", "2", "--eval", "2", "--test",
              "2", "--no-progress"], "--out")):
        line = user_error(capsys, argv, f"{flag}={str(taken)!r}", "is a file")
        assert "File exists" not in line
    assert taken.read_text() == "x"


def test_the_training_commands_help_names_debug(capsys):
    """--debug is taken before argparse sees the arguments; the help says it exists."""
    from cloud_jax.cli import train as train_cli
    with pytest.raises(SystemExit):
        train_cli.parse_args(["-h"])
    assert "--debug" in capsys.readouterr().out
