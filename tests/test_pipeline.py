"""The end-to-end pipeline (cloud_jax/experiments/cloud_vs_classic/) at a tiny size: every stage runs, results.json
and report.md hold what the docs say, a rerun skips finished stages, a changed config is refused.
Whether CLoud beats classic at the demo's real size is measured by `make demo` (docs/RESULTS.md),
not here: a few steps teach nothing."""

import json
import os
from unittest import mock

import pytest

from cloud_jax.errors import ConfigError
from cloud_jax.experiments.cloud_vs_classic.config import load_pipeline_config
from cloud_jax.experiments.cloud_vs_classic.diagnostics import (exact_match, pairs_judged_right,
                                                                verdict_agreement)
from cloud_jax.experiments.cloud_vs_classic.report import markdown_report, summary_table
from cloud_jax.experiments.cloud_vs_classic.run import run_pipeline, stage_times
from cloud_jax.scoring import rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_cpu.yaml")
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
        "model.num_heads=2", "model.num_kv_heads=2",
        "benchmark.num_train=48", "benchmark.num_eval=12", "data.batch_pairs=8",
        "stages.lm_pretrain.total_steps=3", "stages.critique_sft.total_steps=3",
        "stages.cloud.total_steps=2", "self_critique.batch_size=96",
        "self_critique.max_critique_tokens=8", "evaluation.max_critique_tokens=8",
        "evaluation.batch_size=24", "evaluation.num_samples=[1,2]", "evaluation.num_examples=2",
        "self_critique.num_rows=20", "train.progress_bar=false",
        "self_critique.decode_phases=1", "evaluation.decode_phases=2"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    cfg = load_pipeline_config(DEMO, TINY + [f"output_dir={out}"])
    real = rewards.sample

    def spy(*args, **kwargs):  # what each sampling call was asked for
        PHASES_ASKED.append(kwargs["decode_phases"])
        return real(*args, **kwargs)

    with mock.patch.object(rewards, "sample", spy):
        return cfg, run_pipeline(cfg)


PHASES_ASKED: list = []


def test_every_stage_runs_and_results_json_holds_the_comparison(pipeline_run):
    cfg, results = pipeline_run
    out = cfg.output_dir
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["classic"]["accuracy"] == results["classic"]["accuracy"]
    for acc in [saved["classic"]["accuracy"], saved["cloud"]["accuracy"],
                *saved["cloud"]["self_consistency"].values(),
                saved["diagnostics"]["cloud_accuracy_with_oracle_critiques"]]:
        assert 0.0 <= acc <= 1.0
    assert set(saved["cloud"]["self_consistency"]) == {"1", "2"}
    assert saved["cloud_minus_classic"] == pytest.approx(
        saved["cloud"]["accuracy"] - saved["classic"]["accuracy"])
    assert saved["num_eval_rows"] == 12
    steps = {name: s["steps"] for name, s in saved["stages"].items()}
    # classic trains as many steps as cloud: equal data and steps.
    assert steps == {"lm_pretrain": 3, "critique_sft": 3, "cloud": 2, "classic": 2}
    for name in ("critiques_greedy", "critiques_sampled", "sft_self_critique_train"):
        assert "agreement" in saved["diagnostics"][name]
    assert saved["diagnostics"]["critiques_sampled"]["critiques"] in (0, 2 * 12 * 2)
    for arm in ("classic", "cloud_greedy", "cloud_sampled"):
        assert os.path.exists(os.path.join(out, "eval", arm, "report.json"))
        assert os.path.exists(os.path.join(out, "eval", arm, "critiques.jsonl"))
    # self_critique.num_rows=20: both arms train on the first 20 of the 48 train rows, written
    # as read; the SFT model rewrote just those.
    assert saved["num_train_rows"] == 48 and saved["num_arm_train_rows"] == 20
    with open(os.path.join(out, "data", "train.jsonl")) as f:
        first = [json.loads(line) for line in f][:20]
    with open(os.path.join(out, "arm_train.jsonl")) as f:
        assert [json.loads(line) for line in f] == first
    shards = [f for f in os.listdir(os.path.join(out, "self_critique")) if f.endswith(".jsonl")]
    rewritten = []
    for name in shards:
        with open(os.path.join(out, "self_critique", name)) as f:
            rewritten += [json.loads(line)["id"] for line in f]
    assert rewritten == [row["id"] for row in first]
    # The provenance names the SFT model the critiques came from: its export and its step.
    with open(os.path.join(out, "self_critique", "provenance.json")) as f:
        provenance = json.load(f)
    assert provenance["checkpoint"] == os.path.join(out, "critique_sft", "final")
    assert provenance["checkpoint_step"] == steps["critique_sft"] == 3
    for arm in ("cloud", "classic"):
        assert saved["stages"][arm]["data"]["train"]["rows"] == 20, saved["stages"][arm]["data"]
    assert saved["stages"]["critique_sft"]["data"]["train"]["rows"] == 48
    report = open(os.path.join(out, "report.md")).read()
    assert "| classic reward model |" in report and "## Sample critiques" in report
    # At this tiny size some self-critiques are empty: the cloud arm trains on fewer pairs than
    # the classic one, and the report says how many each.
    pairs = {arm: saved["stages"][arm]["data"]["train"]["pairs"] for arm in ("cloud", "classic")}
    assert pairs["classic"] == 20 and pairs["cloud"] <= 20
    trained = (f"; trained on: cloud {pairs['cloud']}, classic 20 (rows whose self-critique is "
               "unusable are left out of cloud)" if pairs["cloud"] < 20 else "")
    assert f"Train pairs: 48 (cloud and classic: 20{trained}). Held-out pairs: 12." in report
    assert report.count("  - oracle: ") == 2 * 2
    # The sections' decode_phases reach the decodes: the self-critique's, then the evaluation's.
    first_eval = PHASES_ASKED.index(2)
    assert set(PHASES_ASKED[:first_eval]) == {1} and set(PHASES_ASKED[first_eval:]) == {2}


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(pipeline_run, caplog):
    cfg, first = pipeline_run
    with caplog.at_level("INFO", logger="cloud_jax.experiments.cloud_vs_classic.run"):
        again = run_pipeline(cfg)
    skipped = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert len(skipped) == 4
    assert again["classic"] == first["classic"] and again["cloud"] == first["cloud"]
    # Reused stages report the time they took when they ran, not the ~0 s of the skip.
    assert again["reused_stages"] == ["lm_pretrain", "critique_sft", "cloud", "classic"]
    with open(os.path.join(cfg.output_dir, "cloud", "stage_summary.json")) as f:
        assert again["seconds"]["cloud"] == json.load(f)["seconds"] > 0
    with open(os.path.join(cfg.output_dir, "report.md")) as f:
        assert "reused from an earlier run" in f.read()
    # This run's total and the total across runs are both said, and add up.
    timing = again["timing"]
    assert timing["total_this_run"] == again["seconds"]["total"]
    assert {n: t["ran"] for n, t in timing["stages"].items() if t["ran"] == "earlier_run"} == {
        n: "earlier_run" for n in again["reused_stages"]}
    assert timing["total_across_runs"] == pytest.approx(timing["total_this_run"] + sum(
        again["seconds"][n] for n in again["reused_stages"]))
    # stages.keep_checkpoints=false, which a rerun may change: each finished stage's checkpoint
    # directory goes, its final/ export stays, and the numbers are the same.
    stages = ("lm_pretrain", "critique_sft", "cloud", "classic")
    checkpoints = [os.path.join(cfg.output_dir, name, "checkpoints") for name in stages]
    assert all(os.path.isdir(path) for path in checkpoints)
    lean = load_pipeline_config(DEMO, TINY + [f"output_dir={cfg.output_dir}",
                                              "stages.keep_checkpoints=false"])
    again = run_pipeline(lean)
    assert not any(os.path.exists(path) for path in checkpoints)
    for name in stages:
        assert os.path.isfile(os.path.join(cfg.output_dir, name, "final", "config.json"))
    assert again["classic"] == first["classic"] and again["cloud"] == first["cloud"]
    changed = load_pipeline_config(DEMO, TINY + [f"output_dir={cfg.output_dir}",
                                                 "stages.cloud.total_steps=3"])
    with pytest.raises(ConfigError, match="stages"):
        run_pipeline(changed)


def _results_timed(this_run, summaries, total):
    return {"classic": {"accuracy": 0.5},
            "cloud": {"accuracy": 0.75, "self_consistency": {"1": 0.75}, "temperature": 0.7},
            "diagnostics": {"cloud_accuracy_with_oracle_critiques": 1.0,
                            "critiques_greedy": {"agreement": 0.8}},
            "cloud_minus_classic": 0.25, "num_train_rows": 4, "num_eval_rows": 2,
            **stage_times(this_run, summaries, total)}


def test_a_resumed_run_s_times_say_which_stages_ran_now_and_add_up():
    # The rerun skipped lm_pretrain and critique_sft (0.1 s each this run; 100 s and 200 s when
    # they ran) and ran cloud (30 s): 50 s this run, 350 s across runs.
    this_run = {"data": 1.0, "lm_pretrain": 0.1, "critique_sft": 0.1, "cloud": 30.0}
    summaries = {"lm_pretrain": {"seconds": 100.0, "reused": True},
                 "critique_sft": {"seconds": 200.0, "reused": True}, "cloud": {"seconds": 30.0}}
    results = _results_timed(this_run, summaries, 50.0)
    # The keys earlier releases wrote keep their meaning.
    assert results["seconds"] == {"data": 1.0, "lm_pretrain": 100.0, "critique_sft": 200.0,
                                  "cloud": 30.0, "total": 50.0}
    assert results["reused_stages"] == ["lm_pretrain", "critique_sft"]
    timing = results["timing"]
    assert timing["stages"] == {"data": {"seconds": 1.0, "ran": "this_run"},
                                "lm_pretrain": {"seconds": 100.0, "ran": "earlier_run"},
                                "critique_sft": {"seconds": 200.0, "ran": "earlier_run"},
                                "cloud": {"seconds": 30.0, "ran": "this_run"}}
    assert timing["total_this_run"] == 50.0 and timing["total_across_runs"] == 350.0
    assert json.loads(json.dumps(results))["timing"] == timing
    line = summary_table(results).splitlines()[-1]
    assert line.endswith("total 50 s this run, 350 s across runs (with the reused stages)"), line
    report = markdown_report(results, [], [], 0)
    assert ("Stage times (s): data 1, lm_pretrain 100 (reused from an earlier run: its time "
            "then), critique_sft 200 (reused from an earlier run: its time then), cloud 30; "
            "total 50 this run, 350 across runs (with the reused stages)") in report
    # A run that reused nothing: one total, which is both.
    fresh = _results_timed(this_run, {"cloud": {"seconds": 30.0}}, 50.0)
    assert fresh["timing"]["total_across_runs"] == 50.0 and fresh["reused_stages"] == []
    assert summary_table(fresh).splitlines()[-1].endswith("; total 50 s")
    # A reused stage whose summary holds no time (an earlier release's): said unknown, not the
    # skip's 0.1 s, and the total across runs is unknown rather than short.
    old = _results_timed(this_run, {"lm_pretrain": {"reused": True}}, 50.0)
    assert old["timing"]["stages"]["lm_pretrain"] == {"seconds": None, "ran": "earlier_run"}
    assert old["timing"]["total_across_runs"] is None
    assert "lm_pretrain unknown (reused from an earlier run" in markdown_report(old, [], [], 0)
    assert summary_table(old).endswith("total 50 s this run, unknown s across runs "
                                       "(with the reused stages)")


def test_a_rerun_may_change_how_it_reports_but_not_what_its_stages_were_trained_with(tmp_path):
    from cloud_jax.experiments.cloud_vs_classic.run import _check_same_config
    from cloud_jax.training.config import save_config

    def config(*extra):
        return load_pipeline_config(DEMO, TINY + [f"output_dir={tmp_path}", *extra])

    saved = str(tmp_path / "pipeline_config.yaml")
    # Finished stages without the record of their settings: not reused blindly.
    (tmp_path / "cloud").mkdir()
    (tmp_path / "cloud" / "stage_summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds finished stages \(cloud\) but no "
                                          r"pipeline_config.yaml"):
        _check_same_config(config(), saved)
    save_config(config(), saved)
    for override in ("train.progress_bar=true", "train.log_every=3",
                     "self_critique.batch_size=7", "evaluation.num_examples=1",
                     "train.metrics_upload_every_s=5"):
        _check_same_config(config(override), saved)
    with pytest.raises(ConfigError, match=r"stages.cloud.total_steps differ\): the stages in "
                                          r".* rerun with the recorded settings"):
        _check_same_config(config("stages.cloud.total_steps=5"), saved)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="data.columns / data.split"):
        load_pipeline_config(DEMO, ["data.columns.prompt=question"])
    with pytest.raises(ConfigError, match="train_path and data.eval_path go together"):
        load_pipeline_config(DEMO, ["data.train_path=x.jsonl"])
    with pytest.raises(ConfigError, match="needs sampled critiques"):
        load_pipeline_config(DEMO, ["evaluation.temperature=0"])
    with pytest.raises(ConfigError, match="stages.cloud.total_steps"):
        load_pipeline_config(DEMO, ["stages.cloud.total_steps=0"])
    # No train rows was a KeyError traceback once the benchmark was written.
    with pytest.raises(ConfigError, match="benchmark.num_train must be >= 1"):
        load_pipeline_config(DEMO, ["benchmark.num_train=0"])
    # The pipeline writes no test split: a test size was ignored without a word.
    with pytest.raises(ConfigError, match=r"benchmark\.num_test=100: the pipeline writes no "
                                          "test split"):
        load_pipeline_config(DEMO, ["benchmark.num_test=100"])
    assert load_pipeline_config(DEMO, ["benchmark.num_test=0"]).benchmark.num_test == 0
    with pytest.raises(ConfigError, match="nonsense"):
        load_pipeline_config(DEMO, ["stages.cloud.nonsense=1"])
    with pytest.raises(ConfigError, match="every stage would share"):
        load_pipeline_config(DEMO, [f"train.checkpoint_dir={tmp_path}"])
    # As docs/TRAINING.md ("Storage") says: the one output that is local only.
    with pytest.raises(ConfigError, match=r"output_dir='gs://b/run': the pipeline experiment "
                                          "writes its report and plots with local file calls"):
        load_pipeline_config(DEMO, ["output_dir=gs://b/run"])
    for section in ("self_critique", "evaluation"):
        with pytest.raises(ConfigError, match=f"{section}.decode_phases=0 must be a whole number"):
            load_pipeline_config(DEMO, [f"{section}.decode_phases=0"])


def test_keys_the_pipeline_sets_for_every_stage_are_refused_not_ignored():
    # Each stage replaced them with its own value: train.total_steps=5 trained 2500 steps.
    for override, hint in (("train.total_steps=5", "stages.<name>.total_steps"),
                           ("train.stage=cloud", "each stage has its own"),
                           ("train.stop_at_step=3", "every stage runs to its end"),
                           ("data.tfds_dir=/elsewhere", "<output_dir>/tfds")):
        with pytest.raises(ConfigError) as err:
            load_pipeline_config(DEMO, [override])
        assert str(err.value).startswith(override.split("=")[0]) and hint in str(err.value)


def test_keys_the_pipeline_sets_are_refused_in_a_stage_s_overrides():
    # stages.classic.overrides=[train.stage=cloud] turned the classic baseline into a CLoud run.
    for stage, item, key in (("classic", "train.stage=cloud", "train.stage"),
                             ("cloud", "init_from=other", "init_from"),
                             ("cloud", "train.total_steps=3", "train.total_steps"),
                             ("critique_sft", "data.train_path=x.jsonl", "data.train_path"),
                             ("classic", "output_dir=elsewhere", "output_dir"),
                             ("classic", "train={stage: cloud}", "train.stage")):
        with pytest.raises(ConfigError) as err:
            load_pipeline_config(DEMO, [f"stages.{stage}.overrides=[{item!r}]"])
        assert str(err.value).startswith(f"stages.{stage}.overrides: ")
        assert f"sets {key}," in str(err.value)
    # Other keys stay per-stage settings.
    cfg = load_pipeline_config(DEMO, ["stages.classic.overrides=[loss.lm_coef=0.0]"])
    assert cfg.stages.classic.overrides == ("loss.lm_coef=0.0",)


def test_sampling_settings_are_checked_when_the_config_loads():
    # They were first read by the stage that samples: a bad evaluation setting was a ValueError
    # traceback after every stage had trained.
    for override, needle in (("evaluation.top_p=1.5", "evaluation.top_p=1.5"),
                             ("evaluation.top_p=0", "evaluation.top_p=0"),
                             ("evaluation.batch_size=0", "evaluation.batch_size=0"),
                             ("evaluation.seed=-1", "evaluation.seed=-1"),
                             ("self_critique.temperature=-1", "self_critique.temperature=-1"),
                             ("self_critique.batch_size=0", "self_critique.batch_size=0")):
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_pipeline_config(DEMO, [override])


def test_every_stage_config_is_checked_before_the_first_stage_runs(tmp_path, monkeypatch):
    from cloud_jax.training import loop

    def no_training(cfg):
        raise AssertionError("a stage ran before the classic stage's overrides were checked")

    monkeypatch.setattr(loop, "run", no_training)
    out = tmp_path / "out"
    cfg = load_pipeline_config(DEMO, TINY + [f"output_dir={out}",
                                             "stages.classic.overrides=[loss.lm_cof=1.0]"])
    with pytest.raises(ConfigError, match=r"stages\.classic .*lm_cof"):
        run_pipeline(cfg)
    assert not out.exists()


def test_a_vocabulary_smaller_than_the_tokenizer_is_named_before_any_data_is_made(tmp_path):
    # It was found by the first stage's training, after the benchmark's data was written.
    out = tmp_path / "out"
    cfg = load_pipeline_config(DEMO, TINY + [f"output_dir={out}", "model.vocab_size=200"])
    with pytest.raises(ConfigError, match=r"tokenizer 'byte' has 262 tokens but "
                                          r"model\.vocab_size=200; raise model\.vocab_size"):
        run_pipeline(cfg)
    assert not out.exists()


def test_diagnostics_by_hand():
    chosen = [["12+3: 2+3=5 5 ok, 1=1 1 ok: Correct"], ["x: Incorrect"]]
    rejected = [["12+3: 2+3=5 6 no, 1=1 1 ok: Incorrect"], ["cut off befo"]]
    oracle = [True, True, False, False]
    d = verdict_agreement(chosen + rejected, oracle)
    # Verdicts: Correct (agrees), Incorrect (disagrees), Incorrect (agrees), none.
    assert d == {"agreement": 0.5, "no_verdict": 0.25, "critiques": 4}
    assert pairs_judged_right(chosen, rejected) == 0.5
    assert exact_match([["a "], ["b"]], ["a", "c"]) == 0.5
    assert verdict_agreement([["Correct"]], [None])["agreement"] is None


def test_a_preempted_stage_exits_like_a_preempted_train(tmp_path, monkeypatch, capsys):
    from cloud_jax.__main__ import main
    from cloud_jax.errors import PREEMPTED_EXIT_CODE
    from cloud_jax.training import loop

    monkeypatch.setattr(loop, "run", lambda cfg: {"preempted": True, "step": 3})
    code = main(["pipeline", "--config", DEMO, *TINY, f"output_dir={tmp_path}"])
    assert code == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert "lm_pretrain was stopped by SIGTERM after saving step 3" in err
    assert "run the same command again" in err and "Traceback" not in err


def test_cli_record_holds_results_json_and_the_host(pipeline_run, tmp_path, capsys):
    """`pipeline --record PATH` (docs/measurements/): the rerun over the finished stages only
    evaluates again, and the record holds what results.json holds plus the host's fields."""
    from cloud_jax.cli import pipeline as cli

    cfg, _ = pipeline_run
    record = tmp_path / "measurements" / "pipeline.json"
    argv = ["--config", DEMO, *TINY, f"output_dir={cfg.output_dir}", "--record", str(record)]
    assert cli.main(argv) == 0
    assert f"record: {record}" in capsys.readouterr().out
    saved = json.loads(record.read_text())
    assert saved["command"] == "python -m cloud_jax pipeline " + " ".join(argv)
    assert saved["machine"].startswith("cpu (cpu); host ")
    with open(os.path.join(cfg.output_dir, "results.json")) as f:
        results = json.load(f)
    result = saved["result"]
    assert {k: result[k] for k in results} == results
    assert result["backend"] == "cpu" and result["cpu_count"] >= 1
    assert "agreement" in result["diagnostics"]["critiques_greedy"]


def test_a_stage_summary_cut_short_runs_the_stage_again(tmp_path, monkeypatch):
    """A kill while a stage's summary was written in place left a cut file: the rerun failed
    with a JSONDecodeError traceback on every try."""
    from cloud_jax.experiments.cloud_vs_classic.run import _train
    from cloud_jax.training import loop

    cfg = load_pipeline_config(DEMO, TINY + [f"output_dir={tmp_path}"])
    calls = []

    def fake_run(stage_cfg):
        calls.append(stage_cfg.output_dir)
        return {"step": 3, "train": {"loss": 1.0}, "eval": {}, "final_dir": "f", "data": {}}

    monkeypatch.setattr(loop, "run", fake_run)
    paths = dict(train_path="t.jsonl", eval_path="e.jsonl", init_from="")
    (tmp_path / "lm_pretrain").mkdir()  # the run makes it
    first = _train(cfg, "lm_pretrain", **paths)
    summary = tmp_path / "lm_pretrain" / "stage_summary.json"
    assert json.loads(summary.read_text())["step"] == 3 and len(calls) == 1
    assert [p.name for p in summary.parent.iterdir()] == ["stage_summary.json"]
    assert _train(cfg, "lm_pretrain", **paths)["reused"] and len(calls) == 1
    summary.write_text(summary.read_text()[:20])
    again = _train(cfg, "lm_pretrain", **paths)
    assert len(calls) == 2 and again["step"] == first["step"] and "reused" not in again
    assert json.loads(summary.read_text())["step"] == 3


def test_scoring_holds_data_max_length_to_the_positions_without_a_warning(tmp_path, caplog):
    """The demo's lengths: 128 positions leave 63 prefill tokens after a 64-token critique and its
    end-of-turn token, fewer than data.max_length=80. data.max_length is the training rows'
    length, not a scoring choice the user made: self-critique and every evaluation scorer hold
    it to the positions, as scoring would, with no "more than the model's positions allow"
    warning (it was given on every run of the demo)."""
    import dataclasses

    from model_helpers import TINY, tiny_reward_model

    import numpy as np

    from cloud_jax.data.schema import load_rows
    from cloud_jax.experiments.cloud_vs_classic import run
    from cloud_jax.scoring.rewards import ScoreConfig, score

    cfg = load_pipeline_config(DEMO, [f"output_dir={tmp_path}", "self_critique.batch_size=4",
                                      "evaluation.batch_size=4", "evaluation.num_samples=[1]",
                                      "evaluation.num_examples=1", "train.progress_bar=false"])
    assert (cfg.model.max_position_embeddings, cfg.data.max_length,
            cfg.self_critique.max_critique_tokens, cfg.evaluation.max_critique_tokens) == (
        128, 80, 64, 64)
    rm = tiny_reward_model(5, dataclasses.replace(TINY, max_position_embeddings=128))
    model = str(rm.save_pretrained(tmp_path / "model"))
    path = tmp_path / "rows.jsonl"
    # A prompt long enough to be cut to the positions' 63 tokens, and one that is not.
    path.write_text("".join(json.dumps({
        "id": f"r{i}", "prompt": prompt, "chosen": "Yes.", "rejected": "No.",
        "chosen_feedback": "Right.", "rejected_feedback": "Wrong.", "subset": "s"}) + "\n"
        for i, prompt in enumerate(("Why? " * 20, "Why?"))))
    rows = load_rows(str(path), require_feedback=True).rows
    rewards._warn_once.cache_clear()  # warned once per process: this test may not be first
    with caplog.at_level("WARNING", logger="cloud_jax.scoring.rewards"):
        critiqued = run._self_critique(cfg, model, str(path))
        results = run._evaluate(cfg, rows, model, model, run._Timer())
    assert "positions allow" not in caplog.text
    # The same critiques as scoring at data.max_length: the prompts are cut as before.
    with caplog.at_level("WARNING", logger="cloud_jax.scoring.rewards"):
        want = score(rm, [r.prompt for r in rows for _ in range(2)],
                     [t for r in rows for t in (r.chosen, r.rejected)],
                     ScoreConfig(max_critique_tokens=64, max_length=80, critique_prefix="",
                                 batch_size=4))
    assert "max_length=80 is more than the model's positions allow" in caplog.text
    got = load_rows(critiqued, require_feedback=True).rows
    assert [t for r in got for t in (r.chosen_feedback, r.rejected_feedback)] == \
        [c[0] for c in want.critiques]
    # The evaluation reads both sides of a pair after one prompt: the larger of their cuts.
    sides = ([r.prompt for r in rows for _ in range(2)],
             [t for r in rows for t in (r.chosen, r.rejected)])
    settings = dict(max_critique_tokens=64, max_length=63, critique_prefix="", batch_size=4)
    cuts = rm.prompt_tokens_cut(*sides, **settings)
    paired = rm.score(*sides, min_prompt_cuts=np.repeat(cuts.reshape(-1, 2).max(axis=1), 2),
                      **settings)
    assert [c for rec in results["_records"] for c in (rec["chosen_critiques"][0],
                                                       rec["rejected_critiques"][0])] == \
        [c[0] for c in paired.critiques]


def test_oracle_critique_pairs_are_rewarded_after_one_prompt():
    """The oracle-critique accuracy compares chosen and rejected after the same prompt tokens,
    as the evaluation's pairs: a prompt too long for max_length loses the larger of the two
    sides' cuts on both (each side lost only its own, so the two rewards read different
    prompts)."""
    import dataclasses

    import numpy as np
    from model_helpers import TINY, tiny_reward_model

    from cloud_jax.data.schema import PreferenceRow
    from cloud_jax.experiments.cloud_vs_classic import run
    from cloud_jax.scoring.rewards import ScoreConfig, prompt_tokens_cut, teacher_forced_rewards

    rm = tiny_reward_model(5, dataclasses.replace(TINY, max_position_embeddings=128))
    row = PreferenceRow(id="r0", prompt="Why? " * 30, chosen="Yes.",
                        rejected="No, that is not right at all.", chosen_feedback="Right.",
                        rejected_feedback="Wrong: the sum is off by one.", subset="s",
                        source="rows.jsonl:1")
    short = dataclasses.replace(row, id="r1", prompt="Why?")
    cfg = ScoreConfig(batch_size=4, max_length=80, critique_prefix="")
    sides = ([row.prompt] * 2, [row.chosen, row.rejected],
             [row.chosen_feedback, row.rejected_feedback])
    cuts = prompt_tokens_cut(rm, *sides[:2], cfg, critiques=sides[2])
    assert 0 < cuts[0] < cuts[1]  # each side alone would lose a different part of the prompt
    got = run._oracle_rewards(rm, [row, short], cfg)
    cut = int(cuts[1])
    want = teacher_forced_rewards(rm, [row.prompt[cut:]] * 2, *sides[1:], cfg)
    np.testing.assert_allclose(got[0], want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[1], teacher_forced_rewards(
        rm, [short.prompt] * 2, *sides[1:], cfg), atol=1e-6, rtol=0)


def test_a_base_model_s_recorded_critique_prefix_reaches_every_stage(tmp_path, caplog):
    """init_from an export that records a critique prefix, the pipeline's data.critique_prefix at
    its default: the training stages take the recorded prefix (follow_init_from), and so must the
    stages the pipeline runs itself. Self-critique and the evaluation sampled after the default
    prefix, so the cloud stage trained after "Judge: " on critiques written after another text,
    and was evaluated after that other text."""
    import dataclasses

    import cloud_jax
    from cloud_jax.data.config import CRITIQUE_PREFIX

    cfg = load_pipeline_config(DEMO, TINY + [f"output_dir={tmp_path / 'run'}"])
    init = tmp_path / "sft_export"
    cloud_jax.from_config(cfg.model, seed=1).save_pretrained(str(init))
    config = json.loads((init / "config.json").read_text())
    config.update(critique_prefix="Judge: ", layout_version=2)
    (init / "config.json").write_text(json.dumps(config))
    cfg = dataclasses.replace(cfg, init_from=str(init), data=dataclasses.replace(
        cfg.data, critique_prefix=CRITIQUE_PREFIX))
    rewards._warn_once.cache_clear()
    with caplog.at_level("WARNING"):
        run_pipeline(cfg)
    out = tmp_path / "run"
    assert "but the model was trained with" not in caplog.text, caplog.text
    for stage in ("critique_sft", "cloud"):
        exported = json.loads((out / stage / "final" / "config.json").read_text())
        assert (exported["critique_prefix"], exported["layout_version"]) == ("Judge: ", 2)
    provenance = json.loads((out / "self_critique" / "provenance.json").read_text())
    assert provenance["sampling"]["critique_prefix"] == "Judge: "
