"""Report files, the command line, and one run on a tiny real model."""

import json
import os

import numpy as np
import pytest
from test_evaluate_helpers import HAND, FakeScorer, pair, synthetic_rows, write_jsonl

import cloud_jax
from cloud_jax.data.schema import load_rows
from cloud_jax.evaluation import (SECTIONS, EvalConfig, load_best_of_n, run_evaluation,
                                  score_fn_from_model)
from cloud_jax.cli import evaluate
from cloud_jax.cli.common import run_command
from cloud_jax.errors import INTERRUPTED_EXIT_CODE, ConfigError


def main(argv):
    return run_command(evaluate.main, argv)


def _assert_png(path):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def _inputs(tmp_path):
    rows_path = write_jsonl(tmp_path / "rb.jsonl", synthetic_rows())
    bon_path = write_jsonl(tmp_path / "bon.jsonl", HAND)
    return rows_path, bon_path


def test_report_files(tmp_path):
    rows_path, bon_path = _inputs(tmp_path)
    out = tmp_path / "out"
    report = run_evaluation(FakeScorer(), EvalConfig(num_samples=(1, 2), temperature=1.0),
                            str(out), rows=load_rows(rows_path, require_feedback=False).rows,
                            best_of_n_items=load_best_of_n(bon_path), settings={"checkpoint": "c"})
    files = report.pop("files")
    assert sorted(os.path.basename(p) for p in files.values()) == sorted([
        "report.json", "report.md", "accuracy_by_section.png", "accuracy_vs_k.png",
        "critiques.jsonl", "best_of_n_critiques.jsonl"])
    with open(out / "report.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    assert report["settings"]["num_samples"] == [1, 2] and report["settings"]["checkpoint"] == "c"
    assert report["rewardbench"]["accuracy_vs_k"]["2"] == pytest.approx(8 / 13)
    md = (out / "report.md").read_text()
    # Section table: Chat row with 3 pairs, 66.7% per prompt, 60.9% weighted (78/128), no ties.
    assert "| Chat | 3 | 66.7 | 60.9 | 0 |" in md
    assert "| other | 2 | 50.0 | – | 0 |" in md
    assert "### Accuracy against K" in md and "## Best-of-N" in md
    assert "| 1 | 62.5 [" in md  # Best-of-N win rate at K = 1
    for name in ("accuracy_by_section.png", "accuracy_vs_k.png"):
        _assert_png(out / name)
    with open(out / "critiques.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["id"] for r in records] == [str(i) for i in range(1, 14)]
    assert set(records[0]) >= {"id", "subset", "chosen_reward", "rejected_reward",
                               "chosen_sample_rewards", "rejected_sample_rewards",
                               "chosen_critiques", "rejected_critiques", "outcome"}
    assert records[0]["chosen_critiques"] == ["critique 0 of chosen 1 R:1",
                                              "critique 1 of chosen 1 R:1"]
    with open(out / "best_of_n_critiques.jsonl") as f:
        assert [json.loads(line)["id"] for line in f] == ["p1", "p2", "p3", "p4"]


def test_report_md_names_the_subsets_a_weighted_section_leaves_out(tmp_path):
    # A section's weighted number is over the subsets the file holds: report.md says which it
    # lacks, as report.json does (missing_subsets), so a Chat number read from the markdown is
    # not taken for the whole of Chat; sections with every subset are not listed.
    rows = [pair(1, "alpacaeval-easy", "1", "0"), pair(2, "hep-go", "0", "1"),
            pair(3, "math-prm", "1", "0")]
    rows += [pair(10 + i, s, "1", "0") for i, s in enumerate(SECTIONS["Safety"])]
    run_evaluation(FakeScorer(), EvalConfig(), str(tmp_path / "o"),
                   rows=load_rows(write_jsonl(tmp_path / "rb.jsonl", rows),
                                  require_feedback=False).rows)
    md = (tmp_path / "o" / "report.md").read_text()
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    sections = report["rewardbench"]["by_k"]["1"]["sections"]
    assert sections["Chat"]["missing_subsets"] == ["alpacaeval-length", "alpacaeval-hard",
                                                   "mt-bench-easy", "mt-bench-med"]
    assert ("Chat: alpacaeval-length, alpacaeval-hard, mt-bench-easy, mt-bench-med" in md)
    assert "Reasoning: hep-cpp, hep-java, hep-js, hep-python, hep-rust" in md
    assert "Safety:" not in md


def test_best_of_n_only_writes_no_section_plot(tmp_path):
    _, bon_path = _inputs(tmp_path)
    report = run_evaluation(FakeScorer(), EvalConfig(), str(tmp_path / "o"),
                            best_of_n_items=load_best_of_n(bon_path))
    assert "rewardbench" not in report and "accuracy_by_section" not in report["files"]
    _assert_png(report["files"]["accuracy_vs_k"])
    # From Python, with no checkpoint in the settings, report.md names none (it said `None`).
    head = (tmp_path / "o" / "report.md").read_text().splitlines()[2]
    assert "checkpoint" not in head and head.startswith("Critiques: K = 1"), head


def test_without_matplotlib_the_numbers_are_written_and_the_plots_skipped(tmp_path, monkeypatch,
                                                                         caplog):
    import sys

    rows_path, bon_path = _inputs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with caplog.at_level("WARNING"):
        report = run_evaluation(FakeScorer(), EvalConfig(num_samples=(1, 2)), str(tmp_path / "o"),
                                rows=load_rows(rows_path, require_feedback=False).rows,
                                best_of_n_items=load_best_of_n(bon_path))
    assert not list((tmp_path / "o").glob("*.png"))
    assert "accuracy_vs_k" not in report["files"] and "accuracy_by_section" not in report["files"]
    assert (tmp_path / "o" / "report.md").read_text().count("## Best-of-N") == 1
    assert "matplotlib is not installed" in caplog.text and "PNG plots skipped" in caplog.text


class FakeModel:
    """Stands in for cloud_jax.RewardModel: records the settings ``score`` is called with."""

    tokenizer = "tok"

    def __init__(self):
        self.settings = []
        self._scorer = FakeScorer()
        self._classic = FakeScorer(classic=True)  # as rm.score(classic=True): no critiques

    def score(self, prompts, responses, *, num_samples, **settings):
        self.settings.append(dict(settings, num_samples=num_samples))
        if settings.get("classic"):
            return self._classic(prompts, responses, num_samples)
        return self._scorer(prompts, responses, num_samples)


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    rows_path, bon_path = _inputs(tmp_path)
    model = FakeModel()
    loads = []
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: loads.append((path, kw)) or model)
    out = tmp_path / "out"
    rc = main(["--checkpoint", "ckpt", "--input", rows_path, "--best-of-n", bon_path,
               "--output-dir", str(out), "--num-samples", "1,4", "--temperature", "0.7",
               "--max-critique-tokens", "32", "--seed", "3", "--top-p", "0.9",
               "--critique-prefix", "Check: ", "--param-dtype", "bfloat16", "--no-progress"])
    assert rc == 0
    [(path, kw)] = loads
    assert path == "ckpt" and kw["param_dtype"] == "bfloat16" and "dtype" not in kw
    assert model.settings[0] == {"num_samples": 4, "temperature": 0.7, "max_critique_tokens": 32,
                                 "seed": 3, "batch_size": 8, "classic": False, "top_p": 0.9,
                                 "critique_prefix": "Check: "}
    report = json.loads((out / "report.json").read_text())
    assert list(report["rewardbench"]["by_k"]) == ["1", "4"]
    assert report["settings"]["top_p"] == 0.9 and report["settings"]["checkpoint"] == "ckpt"
    printed = capsys.readouterr().out
    assert "K=4: pairwise accuracy 61.5%" in printed and "report.md" in printed


def test_cli_progress_in_a_log_is_lines_without_carriage_returns(tmp_path, monkeypatch, capsys):
    rows_path, bon_path = _inputs(tmp_path)
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: FakeModel())
    assert main(["--checkpoint", "c", "--input", rows_path, "--best-of-n", bon_path,
                 "--output-dir", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    n = 2 * len(synthetic_rows())
    assert f"pairs (chosen + rejected): {n}/{n} responses (100.0%), " in err
    assert "Best-of-N candidates: " in err


def test_cli_classic(tmp_path, monkeypatch):
    rows_path, _ = _inputs(tmp_path)
    model = FakeModel()
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: model)
    assert main(["--checkpoint", "c", "--input", rows_path, "--output-dir", str(tmp_path / "o"),
                 "--classic", "--no-progress"]) == 0
    assert model.settings[0]["classic"] is True and model.settings[0]["num_samples"] == 1


def test_a_classic_run_takes_a_repeated_k_of_one(tmp_path, monkeypatch):
    # --num-samples 1,1 is the sweep {1} (Ks are deduplicated): with --classic, or for a vanilla
    # checkpoint, it was refused as a K other than 1.
    rows_path, _ = _inputs(tmp_path)
    model = FakeModel()
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: model)
    common = ["--checkpoint", "c", "--input", rows_path, "--num-samples", "1,1", "--no-progress"]
    assert main(common + ["--output-dir", str(tmp_path / "a"), "--classic"]) == 0
    model.feedback_method = "vanilla"
    assert main(common + ["--output-dir", str(tmp_path / "b")]) == 0
    for out in ("a", "b"):
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert report["settings"]["classic"] is True
        assert list(report["rewardbench"]["by_k"]) == ["1"]
    assert all(s["classic"] is True and s["num_samples"] == 1 for s in model.settings)


def test_classic_with_several_ks_names_what_to_change(tmp_path, capsys):
    # The command said "drop --num-samples or classic" (no such flag); the Python message told
    # to "drop classic", which is a setting to turn off, not to leave out.
    rows_path, _ = _inputs(tmp_path)
    with pytest.raises(SystemExit):
        main(["--checkpoint", "c", "--input", rows_path, "--output-dir", str(tmp_path / "o"),
              "--num-samples", "1,4", "--classic"])
    err = capsys.readouterr().err
    assert "--num-samples 1,4: a classic reward model writes no critiques, so K is 1" in err
    assert "drop --num-samples or --classic" in err, err
    with pytest.raises(ValueError, match=r"num_samples=\(1, 4\): .*so K is 1; set num_samples="
                                         r"\(1,\) or classic=False$"):
        EvalConfig(num_samples=(1, 4), classic=True).validate()


def test_a_rerun_into_the_same_directory_leaves_no_earlier_outputs(tmp_path, monkeypatch):
    """A Best-of-N-only rerun into the directory of a full run with --lenient rejects: the
    earlier critiques, section plot and rejects go (they would sit beside a report that does not
    describe them); files evaluate does not write stay."""
    rows_path, bon_path = _inputs(tmp_path)
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: FakeModel())
    out = tmp_path / "o"
    assert main(["--checkpoint", "c", "--input", rows_path, "--best-of-n", bon_path,
                 "--output-dir", str(out), "--no-progress"]) == 0
    (out / "rejects.jsonl").write_text('{"line": 3}\n')  # as an earlier --lenient run left it
    (out / "notes.txt").write_text("mine")
    assert (out / "critiques.jsonl").exists()
    assert main(["--checkpoint", "c", "--best-of-n", bon_path, "--output-dir", str(out),
                 "--no-progress"]) == 0
    names = set(os.listdir(out))
    assert not names & {"critiques.jsonl", "rejects.jsonl", "accuracy_by_section.png"}, names
    assert {"report.json", "best_of_n_critiques.jsonl", "notes.txt"} <= names
    assert "rewardbench" not in json.loads((out / "report.json").read_text())


def _no_model(path, **kw):
    raise AssertionError("the model must not load when the inputs are bad")


def test_cli_bad_row_names_file_line_and_field_before_loading_the_model(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(cloud_jax, "load", _no_model)
    bad = pair(2, "math-prm", "1", "0")
    del bad["chosen"]
    path = write_jsonl(tmp_path / "rb.jsonl", [pair(1, "math-prm", "1", "0"), bad])
    assert main(["--checkpoint", "c", "--input", path, "--output-dir", str(tmp_path)]) == 2
    assert f"{path}:2: field 'chosen': missing" in capsys.readouterr().err

    bon = write_jsonl(tmp_path / "bon.jsonl", [{"id": 1, "prompt": "p", "candidates": ["a", "b"],
                                                "scores": [1, True]}])
    assert main(["--checkpoint", "c", "--best-of-n", bon, "--output-dir", str(tmp_path)]) == 2
    assert f"{bon}:1: field 'scores[1]': expected a finite number" in capsys.readouterr().err

    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert main(["--checkpoint", "c", "--input", empty, "--output-dir", str(tmp_path)]) == 2
    assert "no usable preference rows" in capsys.readouterr().err

    assert main(["--checkpoint", "c", "--input", str(tmp_path / "nope.jsonl"),
                 "--output-dir", str(tmp_path)]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


class NaNModel(FakeModel):
    """A model whose weights went non-finite: every reward it gives is NaN."""

    def score(self, prompts, responses, **kw):
        out = super().score(prompts, responses, **kw)
        out.sample_rewards[:] = np.nan
        return out


def test_cli_a_non_finite_reward_is_one_error_line_saying_what_to_do(tmp_path, monkeypatch,
                                                                     capsys):
    """A model that gives NaN is something the user fixes (the checkpoint, the dtype): one
    `error:` line naming the row, the field and what to try, exit status 2, no traceback."""
    rows_path, bon_path = _inputs(tmp_path)
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: NaNModel())
    for flag, path, where in (("--input", rows_path, f"{rows_path}:1 (chosen)"),
                              ("--best-of-n", bon_path, f"{bon_path}:1 (candidates[0])")):
        assert main(["--checkpoint", "c", flag, path, "--output-dir", str(tmp_path / "o"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert where in err and "non-finite reward" in err
        assert "--dtype float32" in err and "checkpoint" in err
        assert not (tmp_path / "o" / "report.json").exists()


@pytest.mark.parametrize("args, message", [
    ([], "give --input"),
    (["--input", "x.jsonl", "--num-samples", "1,x"], "positive integers"),
    (["--input", "x.jsonl", "--num-samples", "0"], "every K must be >= 1"),
    (["--input", "x.jsonl", "--classic", "--num-samples", "1,4"], "classic"),
    (["--input", "x.jsonl", "--tie-credit", "0.3"], "invalid choice"),
    (["--input", "x.jsonl", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"],
     "give --top-k or --top-p, not both"),
    (["--input", "x.jsonl", "--repetition-penalty", "0"], "--repetition-penalty 0.0: must be a finite number > 0"),
    (["--best-of-n", "x.jsonl", "--seed", "-1"], "--seed -1: must be >= 0 for Best-of-N"),
    (["--input", "x.jsonl", "--seed", str(2**32 + 1)], "--seed 4294967297: must be a whole number"),
])
def test_cli_usage_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(cloud_jax, "load", _no_model)
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", "c", "--output-dir", str(tmp_path)] + args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_rm():
    from cloud_jax.model.config import ModelConfig
    from cloud_jax.data.tokenizer import byte_tokenizer

    cfg = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    return cloud_jax.from_config(cfg, seed=1, tokenizer=byte_tokenizer())


def _tiny_inputs(tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "rb.jsonl", [
        {"id": 1, "prompt": "2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm"},
        {"id": 2, "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.",
         "subset": "alpacaeval-easy"},
    ]), require_feedback=False).rows
    items = load_best_of_n(write_jsonl(tmp_path / "bon.jsonl", [
        {"id": "q", "prompt": "3*3?", "candidates": ["9", "6", "33", "8"],
         "scores": [1, 0, 0, 0]}]))
    return rows, items


def _correct_at(records, k):
    return sum(np.mean(r["chosen_sample_rewards"][:k], dtype=np.float32)
               > np.mean(r["rejected_sample_rewards"][:k], dtype=np.float32) for r in records)


def test_tiny_real_model_classic(tmp_path, tiny_rm):
    rows, items = _tiny_inputs(tmp_path)
    score_fn = score_fn_from_model(tiny_rm, batch_size=4, classic=True)
    report = run_evaluation(score_fn, EvalConfig(classic=True, batch_size=4),
                            str(tmp_path / "out"), rows=rows, best_of_n_items=items)
    with open(report["files"]["critiques"]) as f:
        records = [json.loads(line) for line in f]
    # The classic reward is one forward over [prompt][response]: the same as rm.score's.
    direct = tiny_rm.score(["2+2?", "Hi", "2+2?", "Hi"], ["4", "Hello!", "5", "Go away."],
                           classic=True, batch_size=4).rewards
    np.testing.assert_allclose([[r["chosen_reward"], r["rejected_reward"]] for r in records],
                               direct.reshape(2, 2).T, rtol=1e-6)
    assert report["rewardbench"]["by_k"]["1"]["all_rows"]["correct"] == _correct_at(records, 1)
    assert records[0]["chosen_critiques"] == []


def test_a_vanilla_checkpoint_is_scored_classic_by_default(tiny_rm):
    """score_fn_from_model takes the model's kind, as rm.score does: a classic (vanilla)
    checkpoint gets no critiques sampled from it unless classic=False is asked for."""
    import dataclasses

    vanilla = dataclasses.replace(tiny_rm, feedback_method="vanilla")
    out = score_fn_from_model(vanilla, batch_size=4)(["2+2?"], ["4"], 1)
    assert out.critiques == [[]]
    direct = vanilla.score(["2+2?"], ["4"], classic=True, batch_size=4).rewards
    np.testing.assert_allclose(out.rewards, direct, rtol=1e-6)
    assert score_fn_from_model(vanilla, batch_size=4, classic=False, max_critique_tokens=2)(
        ["2+2?"], ["4"], 1).critiques != [[]]


def test_tiny_real_model_critiques(tmp_path, tiny_rm):
    rows, items = _tiny_inputs(tmp_path)
    cfg = EvalConfig(num_samples=(1, 2), temperature=1.0, max_critique_tokens=4, batch_size=4,
                     chunk_size=4)
    score_fn = score_fn_from_model(tiny_rm, temperature=1.0, max_critique_tokens=4, seed=0,
                                   batch_size=4)
    report = run_evaluation(score_fn, cfg, str(tmp_path / "out"), rows=rows,
                            best_of_n_items=items)
    with open(report["files"]["critiques"]) as f:
        records = [json.loads(line) for line in f]
    # The report's numbers follow from the model's own sample rewards.
    for k in (1, 2):
        assert report["rewardbench"]["by_k"][str(k)]["all_rows"]["correct"] == _correct_at(
            records, k)
    assert all(len(r["chosen_critiques"]) == 2 for r in records)
    assert 0.0 <= report["rewardbench"]["truncated_fraction"] <= 1.0
    assert report["best_of_n"]["by_k"]["2"]["num_prompts"] == 1


def test_greedy_k_sweep_warns_once(tmp_path, tiny_rm, caplog):
    # K > 1 at temperature 0: one warning (rm.score's, given before scoring), not a second one
    # of the evaluation's own.
    from cloud_jax.scoring import rewards

    rewards._warn_once.cache_clear()  # once per process: this test may not be first
    rows, _ = _tiny_inputs(tmp_path)
    score_fn = score_fn_from_model(tiny_rm, temperature=0.0, max_critique_tokens=2, batch_size=4)
    with caplog.at_level("WARNING"):
        run_evaluation(score_fn, EvalConfig(num_samples=(1, 2), temperature=0.0,
                                            max_critique_tokens=2, batch_size=4),
                       str(tmp_path / "out"), rows=rows)
    greedy = [r.getMessage() for r in caplog.records if "temperature 0" in r.getMessage()]
    assert len(greedy) == 1, greedy
    assert greedy[0].startswith("num_samples=2 at temperature 0: greedy decoding writes the same")


def test_cli_lenient_report_counts_the_rejected_rows(tmp_path, monkeypatch, tiny_rm, capsys):
    """Rows --lenient skipped are counted in report.json (rejected_rows, rejects_path: the keys
    the training data stats use), in report.md and in the printed summary, so the report alone
    tells that the accuracy is over fewer rows than the input holds."""
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: tiny_rm)
    no_chosen = {"id": 3, "prompt": "p", "rejected": "r", "subset": "math-prm"}
    path = write_jsonl(tmp_path / "rb.jsonl", [
        {"id": 1, "prompt": "2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm"},
        no_chosen, "{not json",
        {"id": 2, "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.",
         "subset": "alpacaeval-easy"}])
    out = tmp_path / "out"
    common = ["--checkpoint", "c", "--classic", "--batch-size", "4", "--no-progress",
              "--output-dir", str(out)]
    assert main([*common, "--input", path, "--lenient"]) == 0
    rejects = str(out / "rejects.jsonl")
    report = json.loads((out / "report.json").read_text())
    rb = report["rewardbench"]
    assert (rb["num_rows"], rb["rejected_rows"], rb["rejects_path"]) == (2, 2, rejects)
    assert [json.loads(line)["line"] for line in open(rejects)] == [2, 3]
    md = (out / "report.md").read_text()
    assert f"2 input rows were bad and skipped (`--lenient`), listed in `{rejects}`; the " \
           "numbers below leave them out." in md
    printed = capsys.readouterr().out
    assert f"2 input rows skipped (--lenient), listed in {rejects}" in printed

    # No bad row: 0 and the (empty) rejects file; without --lenient no rejects file at all.
    good = write_jsonl(tmp_path / "good.jsonl", [
        {"id": 1, "prompt": "2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm"}])
    assert main([*common, "--input", good, "--lenient"]) == 0
    rb = json.loads((out / "report.json").read_text())["rewardbench"]
    assert (rb["rejected_rows"], rb["rejects_path"]) == (0, rejects)
    assert "No input row was skipped (`--lenient`)." in (out / "report.md").read_text()
    assert "0 input rows skipped (--lenient)\n" in capsys.readouterr().out
    assert main([*common, "--input", good]) == 0
    rb = json.loads((out / "report.json").read_text())["rewardbench"]
    assert (rb["rejected_rows"], rb["rejects_path"]) == (0, None)
    assert "skipped" not in (out / "report.md").read_text()
    assert "skipped" not in capsys.readouterr().out
    assert not os.path.exists(rejects)


def test_cli_a_too_long_row_is_named_with_the_flag_to_change(tmp_path, monkeypatch, tiny_rm,
                                                              capsys):
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: tiny_rm)
    path = write_jsonl(tmp_path / "rb.jsonl", [
        {"id": 1, "prompt": "2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm"},
        {"id": 2, "prompt": "Hi", "chosen": "Hello!", "rejected": "x" * 300,
         "subset": "alpacaeval-easy"}])
    assert main(["--checkpoint", "c", "--classic", "--input", path, "--max-length", "100",
                 "--no-progress", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {path}:2: field 'rejected': longer than --max-length 100 ")
    assert "; raise --max-length or shorten the response" in err
    # From Python, the same error in the settings' names.
    with pytest.raises(ConfigError, match=r"rb.jsonl:2: field 'rejected': longer than "
                                          r"max_length=100 .*; raise max_length or"):
        run_evaluation(score_fn_from_model(tiny_rm, classic=True, max_length=100),
                       EvalConfig(classic=True), str(tmp_path / "api"),
                       rows=load_rows(path, require_feedback=False).rows)


def _lenient_run(tmp_path, monkeypatch, out, bad_rows, load=None):
    """--lenient over the synthetic rows plus ``bad_rows`` unreadable lines."""
    rows = synthetic_rows() + ["{not json"] * bad_rows
    path = write_jsonl(tmp_path / f"rb{bad_rows}.jsonl", rows)
    monkeypatch.setattr(cloud_jax, "load", load or (lambda path, **kw: FakeModel()))
    return main(["--checkpoint", "c", "--input", path, "--output-dir", str(out), "--lenient",
                 "--no-progress"])


def _refuse_load(path, **kw):
    raise OSError("checkpoint unreadable")


def test_a_rerun_that_stops_early_never_leaves_the_earlier_report_beside_new_rejects(
        tmp_path, monkeypatch, caplog):
    """report.json marks a finished run: it goes first, before this run's rejects are written,
    and is written last. A rerun stopped while it scores leaves no report, never the earlier
    run's report beside this run's rejects; a rerun whose input is bad stops before it touches
    the directory, so the earlier run stays whole."""
    out = tmp_path / "o"
    assert _lenient_run(tmp_path, monkeypatch, out, bad_rows=2) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert json.loads(before["report.json"])["rewardbench"]["rejected_rows"] == 2
    # The warning names the rejects file where the user finds it (not the staging copy).
    assert f"(details in {out / 'rejects.jsonl'})" in caplog.text

    bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json"])
    monkeypatch.setattr(cloud_jax, "load", _no_model)
    assert main(["--checkpoint", "c", "--input", bad, "--output-dir", str(out)]) == 2
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before

    # A rerun stopped once the model has loaded, while it scores: the earlier run's files are
    # gone, this run's rejects are there, and there is no report.json.
    class Stopped(FakeModel):
        def score(self, *args, **kwargs):
            raise KeyboardInterrupt

    assert _lenient_run(tmp_path, monkeypatch, out, bad_rows=1,
                        load=lambda path, **kw: Stopped()) == INTERRUPTED_EXIT_CODE
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 1
    assert not (out / "report.json").exists(), sorted(os.listdir(out))


def _snapshot(out):
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}


def test_a_rerun_that_fails_on_its_input_or_checkpoint_leaves_the_earlier_run_whole(
        tmp_path, monkeypatch, capsys):
    """Every check that can fail on what the user gave comes before the output directory is
    touched: a rerun naming a missing --input (with or without --lenient) or --best-of-n, a
    checkpoint that does not load or does not fit the flags, stops with an error naming what is
    wrong and leaves the earlier run's report.json, rejects and critiques as they were."""
    out = tmp_path / "o"
    assert _lenient_run(tmp_path, monkeypatch, out, bad_rows=2) == 0
    before = _snapshot(out)
    assert {"report.json", "rejects.jsonl", "critiques.jsonl"} <= set(before)
    good = write_jsonl(tmp_path / "good.jsonl", synthetic_rows())
    missing = str(tmp_path / "typo.jsonl")
    common = ["--output-dir", str(out), "--no-progress"]
    monkeypatch.setattr(cloud_jax, "load", _no_model)
    for extra in ([], ["--lenient"]):
        assert main(["--checkpoint", "c", "--input", missing, *common, *extra]) == 2
        assert missing in capsys.readouterr().err
        assert _snapshot(out) == before, extra
    assert main(["--checkpoint", "c", "--best-of-n", missing, *common]) == 2
    assert missing in capsys.readouterr().err
    assert _snapshot(out) == before

    no_checkpoint = str(tmp_path / "no_such_checkpoint")
    monkeypatch.undo()
    for extra in ([], ["--lenient"]):
        assert main(["--checkpoint", no_checkpoint, "--input", good, *common, *extra]) == 2
        assert no_checkpoint in capsys.readouterr().err
        assert _snapshot(out) == before, extra

    vanilla = FakeModel()
    vanilla.feedback_method = "vanilla"
    monkeypatch.setattr(cloud_jax, "load", lambda path, **kw: vanilla)
    assert main(["--checkpoint", "c", "--input", good, "--num-samples", "1,2",
                 "--temperature", "0.7", "--lenient", *common]) == 2
    assert "--num-samples" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_run_evaluation_checks_its_settings_before_it_clears_the_directory(tmp_path):
    rows_path, _ = _inputs(tmp_path)
    rows = load_rows(rows_path, require_feedback=False).rows
    out = tmp_path / "o"
    run_evaluation(FakeScorer(), EvalConfig(), str(out), rows=rows)
    before = _snapshot(out)
    with pytest.raises(ValueError, match="temperature=-1"):
        run_evaluation(FakeScorer(), EvalConfig(temperature=-1.0), str(out), rows=rows)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_evaluation(FakeScorer(), EvalConfig(), str(out), rows=[])
    assert _snapshot(out) == before


def test_report_json_is_written_last(tmp_path, monkeypatch):
    """A run stopped while its plots are drawn leaves no report.json: it is written after
    report.md and the plots."""
    from cloud_jax.evaluation import report as report_mod

    rows_path, _ = _inputs(tmp_path)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod, "plot_accuracy_vs_k", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(FakeScorer(), EvalConfig(), str(tmp_path / "o"),
                       rows=load_rows(rows_path, require_feedback=False).rows)
    assert "report.json" not in os.listdir(tmp_path / "o")


def test_help_describes_every_option_with_its_default():
    """Every option of `evaluate --help` says what it does; those with a default say it (the
    defaults docs/EVALUATION.md gives)."""
    parser = evaluate.build_parser()
    undescribed = [a.option_strings[0] for a in parser._actions
                   if a.option_strings and not a.help]
    assert undescribed == []
    text = " ".join(parser.format_help().split())
    for default in ("(default 0; in [0, 2**32)", "(default 2000)", "(default 0.95)",
                    "(default 256;", "(default 8)", "(default 1)", "(default first)"):
        assert default in text


class _CuttingScorer(FakeScorer):
    """FakeScorer whose critiques of each item's first candidate reached the token budget."""

    def __call__(self, prompts, responses, num_samples):
        out = super().__call__(prompts, responses, num_samples)
        out.truncated[[r.startswith("candidate 0 ") for r in responses]] = True
        return out


def test_a_best_of_n_evaluation_reports_the_critiques_cut_at_the_budget(tmp_path, capsys):
    """docs/COMPATIBILITY.md: how many critiques hit the budget is reported by evaluate, in its
    summary line and its report, so a budget that is too small shows: for Best-of-N rows as for
    pairs (it was only in report.json there)."""
    _, bon_path = _inputs(tmp_path)
    items = load_best_of_n(bon_path)
    report = run_evaluation(_CuttingScorer(), EvalConfig(), str(tmp_path / "o"),
                            best_of_n_items=items)
    fraction = report["best_of_n"]["truncated_fraction"]
    n = sum(len(item.candidates) for item in items)
    assert fraction == pytest.approx(len(items) / n)
    line = f"{100 * fraction:.1f}%"
    md = (tmp_path / "o" / "report.md").read_text()
    assert f"Critiques cut at the token budget: {line}" in md.split("## Best-of-N")[1]
    evaluate._print_summary(report)
    assert f"critiques cut at the token budget: {line}" in capsys.readouterr().out
    # A classic model writes no critiques: nothing to report.
    classic = run_evaluation(FakeScorer(classic=True), EvalConfig(classic=True),
                             str(tmp_path / "c"), best_of_n_items=items)
    assert classic["best_of_n"]["truncated_fraction"] is None
    assert "token budget" not in (tmp_path / "c" / "report.md").read_text()


def test_score_fn_from_model_checks_its_settings_when_made(tiny_rm):
    """A misspelt or bad setting, or num_samples (which the evaluation gives per call), is an
    error when the score_fn is made, before any scoring, not at its first call."""
    with pytest.raises(TypeError, match=r"score_fn_from_model: unknown setting 'top_kk' "
                                        r"\(did you mean 'top_k'\?\)"):
        score_fn_from_model(tiny_rm, top_kk=3)
    with pytest.raises(TypeError, match=r"score_fn_from_model: num_samples .* per call"):
        score_fn_from_model(tiny_rm, num_samples=4)
    with pytest.raises(ValueError, match="top_p=2.0"):
        score_fn_from_model(tiny_rm, temperature=1.0, top_p=2.0)
    with pytest.raises(ValueError, match="batch_size"):
        score_fn_from_model(tiny_rm, batch_size=0)


def test_a_classic_evaluation_refuses_a_scorer_that_writes_critiques(tmp_path):
    """EvalConfig(classic=True) reports a classic reward model ("no critiques"): a score_fn that
    samples critiques (score_fn_from_model over a CLoud model, whose kind it takes by default) is
    refused at its first call, not reported as classic beside the critiques it wrote."""
    rows_path, bon_path = _inputs(tmp_path)
    rows = load_rows(rows_path, require_feedback=False).rows
    for inputs in ({"rows": rows}, {"best_of_n_items": load_best_of_n(bon_path)}):
        scorer = FakeScorer()
        with pytest.raises(ValueError, match=r"EvalConfig\(classic=True\).*wrote critiques.*"
                                             r"score_fn_from_model\(rm, classic=True\)"):
            run_evaluation(scorer, EvalConfig(classic=True, chunk_size=8), str(tmp_path / "o"),
                           **inputs)
        assert len(scorer.calls) == 1
        assert not (tmp_path / "o" / "report.json").exists()


def test_an_evaluation_whose_scorer_wrote_no_critiques_is_reported_classic(tmp_path):
    """EvalConfig() (K = 1) over a scorer that writes no critiques (score_fn_from_model over a
    vanilla checkpoint) is reported as the command reports that checkpoint: a classic reward
    model. Its report said "Critiques: K = 1, temperature 0, at most 256 tokens" beside the empty
    critiques. A scorer that writes critiques is reported with them, as before."""
    rows_path, bon_path = _inputs(tmp_path)
    inputs = dict(rows=load_rows(rows_path, require_feedback=False).rows,
                  best_of_n_items=load_best_of_n(bon_path))
    given = run_evaluation(FakeScorer(classic=True), EvalConfig(), str(tmp_path / "g"), **inputs)
    asked = run_evaluation(FakeScorer(classic=True), EvalConfig(classic=True),
                           str(tmp_path / "a"), **inputs)
    assert given["settings"]["classic"] is True
    assert (tmp_path / "g" / "report.md").read_text() == (tmp_path / "a" / "report.md").read_text()
    for report in (given, asked):
        del report["files"], report["wall_seconds"]
    assert given == asked
    assert (tmp_path / "g" / "report.md").read_text().splitlines()[2] == \
        "Classic reward model (no critiques)"
    with_critiques = run_evaluation(FakeScorer(), EvalConfig(), str(tmp_path / "c"), **inputs)
    assert with_critiques["settings"]["classic"] is False
    assert (tmp_path / "c" / "report.md").read_text().splitlines()[2].startswith(
        "Critiques: K = 1, temperature 0")


@pytest.mark.parametrize("classic", [True, False])
def test_both_sides_of_a_pair_are_rewarded_after_one_prompt(tmp_path, tiny_rm, classic):
    """A pair whose prompt must be cut to fit max_length: chosen and rejected lose the same
    prompt tokens, the larger cut (the longer response's), so the two rewards compare the
    responses after one prompt. Each side lost only what it needed: the shorter response read
    more of the prompt. The pair's rewards are those of the pair with its prompt cut by hand,
    whatever other rows are scored with it."""
    from cloud_jax.data.layout import encode_critique_prefix, encode_example
    from cloud_jax.scoring.rewards import resolve_critique_prefix, ScoreConfig

    prompt = "".join(chr(97 + i % 26) for i in range(300))
    chosen, rejected = "short", "a much longer response " * 3
    settings = dict(classic=True) if classic else dict(temperature=0.0, max_critique_tokens=4)
    tok, limit = tiny_rm.tokenizer, 200
    if classic:
        whole = len(encode_example(tok, prompt, rejected, None, "classic",
                                   max_length=1 << 30).input_ids)
    else:
        prefix = resolve_critique_prefix(tiny_rm, ScoreConfig())
        whole = len(encode_critique_prefix(tok, prompt, rejected, prefix))
    cut = whole - limit  # the byte tokenizer: one token per character
    assert cut > 0
    expected = tiny_rm.score([prompt[cut:]] * 2, [chosen, rejected], max_length=limit,
                             batch_size=2, **settings).rewards
    cfg = EvalConfig(classic=classic, batch_size=2, chunk_size=2,
                     max_critique_tokens=settings.get("max_critique_tokens", 256))
    rows = [{"id": 1, "prompt": prompt, "chosen": chosen, "rejected": rejected,
             "subset": "math-prm"},
            {"id": 2, "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.",
             "subset": "alpacaeval-easy"}]
    for name, given in (("alone", rows[:1]), ("with_another", rows)):
        report = run_evaluation(
            score_fn_from_model(tiny_rm, batch_size=2, max_length=limit, **settings), cfg,
            str(tmp_path / name), rows=load_rows(write_jsonl(tmp_path / f"{name}.jsonl", given),
                                                 require_feedback=False).rows)
        with open(report["files"]["critiques"]) as f:
            record = json.loads(f.readline())
        np.testing.assert_allclose([record["chosen_reward"], record["rejected_reward"]],
                                   expected, rtol=1e-5, err_msg=name)


def test_the_candidates_of_a_best_of_n_prompt_are_rewarded_after_one_prompt(tmp_path, tiny_rm):
    """Best-of-N compares the rewards of one prompt's candidates: where the prompt must be cut
    to fit, every candidate loses the same prompt tokens (the largest cut among them), as the
    two sides of a pair do; a shorter candidate read more of the prompt than a longer one."""
    from cloud_jax.data.layout import encode_example

    prompt = "".join(chr(97 + i % 26) for i in range(300))
    candidates = ["short", "a much longer response " * 3, "middling answer"]
    tok, limit = tiny_rm.tokenizer, 200
    cut = max(len(encode_example(tok, prompt, c, None, "classic", max_length=1 << 30).input_ids)
              for c in candidates) - limit  # the byte tokenizer: one token per character
    assert cut > 0
    expected = tiny_rm.score([prompt[cut:]] * 3, candidates, max_length=limit, batch_size=2,
                             classic=True).rewards
    items = load_best_of_n(write_jsonl(tmp_path / "bon.jsonl", [
        {"id": "q", "prompt": prompt, "candidates": candidates, "scores": [1, 0, 0]}]))
    report = run_evaluation(score_fn_from_model(tiny_rm, batch_size=2, max_length=limit,
                                                classic=True),
                            EvalConfig(classic=True, batch_size=2), str(tmp_path / "out"),
                            best_of_n_items=items)
    with open(report["files"]["best_of_n_critiques"]) as f:
        record = json.loads(f.readline())
    np.testing.assert_allclose(record["rewards"], expected, rtol=1e-5)
