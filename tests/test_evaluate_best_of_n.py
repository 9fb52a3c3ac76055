"""Best-of-N: picks, win rates and intervals on a hand-computed example; file errors."""

import json

import numpy as np
import pytest
from test_evaluate_helpers import HAND, FakeScorer, bon_row, write_jsonl

from cloud_jax.data.schema import RowError
from cloud_jax.evaluation import (EvalConfig, best_of_n_metrics, bootstrap_ci, load_best_of_n,
                                  run_evaluation, wilson_ci)
from cloud_jax.evaluation.best_of_n import baseline_picks
from cloud_jax.evaluation.run import evaluate_best_of_n


def test_wilson_interval_matches_published_values():
    # 95% Wilson score intervals: 8/10 -> [0.4902, 0.9433], 2/4 -> [0.1500, 0.8500].
    np.testing.assert_allclose(wilson_ci(8, 10), [0.4902, 0.9433], atol=1e-4)
    np.testing.assert_allclose(wilson_ci(2, 4), [0.1500, 0.8500], atol=1e-4)
    assert wilson_ci(0, 5)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_ci(5, 5)[1] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        wilson_ci(3, 2)


def test_bootstrap_interval():
    assert bootstrap_ci(np.ones(7), seed=0) == (1.0, 1.0)
    values = np.array([1.0] * 200 + [0.0] * 200)
    lo, hi = bootstrap_ci(values, seed=3, num_resamples=20000)
    # Normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 400).
    assert lo == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert hi == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)
    # Seeded: the same seed gives the same interval, another seed (almost surely) another one.
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_equals_resampling_items_in_distribution():
    values = np.array([0.0, 0.5, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0])
    rng = np.random.default_rng(0)
    naive = values[rng.integers(0, values.size, size=(40000, values.size))].mean(axis=1)
    lo, hi = bootstrap_ci(values, seed=1, num_resamples=40000, level=0.9)
    np.testing.assert_allclose([lo, hi], np.quantile(naive, [0.05, 0.95]), atol=0.02)


def test_hand_computed_win_rates(tmp_path):
    items = load_best_of_n(write_jsonl(tmp_path / "bon.jsonl", HAND))
    section, records = evaluate_best_of_n(items, FakeScorer(), EvalConfig(seed=7))
    m = section["by_k"]["1"]
    b = m["against_baseline"]
    assert (b["wins"], b["ties"], b["losses"]) == (2, 1, 1)
    assert b["win_rate"] == pytest.approx(2.5 / 4)
    assert b["ci"] == list(bootstrap_ci(np.array([1.0, 0.0, 0.5, 1.0]), seed=7))
    assert b["ci"][0] <= 0.625 <= b["ci"][1]
    o = m["against_oracle"]
    assert o["matches"] == 2 and o["match_rate"] == 0.5
    np.testing.assert_allclose(o["ci"], [0.1500, 0.8500], atol=1e-4)
    assert o["mean_regret"] == pytest.approx((0 + 1 + 0.5 + 0) / 4)
    assert m["mean_quality"] == {"model": pytest.approx(3.5 / 4),
                                 "baseline": pytest.approx(1.5 / 4),
                                 "oracle": pytest.approx(5 / 4),
                                 "all_candidates": pytest.approx((1 / 3 + 0.5 + 2 / 3 + 1) / 4)}
    assert [r["model_pick"] for r in records] == [1, 1, 0, 1]
    assert records[2]["oracle_picks"] == [2]
    assert records[0]["critiques"][1] == ["critique 0 of candidate 1 R:0.9"]


def test_random_baseline_is_seeded_per_prompt_in_file_order():
    sizes = [3, 2, 5, 4]
    rng = np.random.default_rng(11)
    assert baseline_picks(sizes, "random", 11).tolist() == [rng.integers(n) for n in sizes]
    assert baseline_picks(sizes, "first", 11).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="baseline"):
        baseline_picks(sizes, "best", 0)


def test_random_baseline_metrics():
    qualities = [np.array([0.0, 1.0]), np.array([1.0, 0.0, 0.0])]
    rewards = [np.array([0.0, 1.0]), np.array([1.0, 0.0, 0.0])]
    base = baseline_picks([2, 3], "random", 2)
    m = best_of_n_metrics(qualities, rewards, base, seed=2)
    expected = np.mean([1.0 if q[b] < q.max() else 0.5 for q, b in zip(qualities, base)])
    assert m["against_baseline"]["win_rate"] == pytest.approx(expected)
    assert m["against_oracle"]["match_rate"] == 1.0


def test_k_sweep_changes_the_picks(tmp_path):
    # K=1: candidate 0 (reward 1 vs 0); K=2: candidate 1 (mean 0.5 vs 2).
    rows = [bon_row("q", [0, 1], ["1,0", "0,4"])]
    items = load_best_of_n(write_jsonl(tmp_path / "bon.jsonl", rows))
    section, records = evaluate_best_of_n(items, FakeScorer(),
                                          EvalConfig(num_samples=(1, 2), temperature=1.0))
    assert section["by_k"]["1"]["against_oracle"]["match_rate"] == 0.0
    assert section["by_k"]["2"]["against_oracle"]["match_rate"] == 1.0
    assert records[0]["model_pick"] == 1 and records[0]["sample_rewards"] == [[1, 0], [0, 4]]


@pytest.mark.parametrize("line, field, reason", [
    ({"id": "x", "prompt": "p", "candidates": ["a", "b"]}, "scores", "missing"),
    ({"id": "x", "prompt": "p", "candidates": ["a", "b"], "scores": [1]}, "scores",
     "expected a list of 2 numbers"),
    ({"id": "x", "prompt": "p", "candidates": ["a", "b"], "scores": [1, "good"]}, "scores[1]",
     "finite number"),
    ({"id": "x", "prompt": "p", "candidates": ["a", "b"], "scores": [1, float("nan")]},
     "scores[1]", "finite number"),
    # An integer too large for a float (JSON allows any number of digits).
    ({"id": "x", "prompt": "p", "candidates": ["a", "b"], "scores": [1, 10 ** 400]},
     "scores[1]", "expected a finite number, got 10000000000000000000..."),
    # A finite score too large for the report's means and regrets (they overflowed to inf, and
    # writing report.json failed once every candidate had been scored).
    ({"id": "x", "prompt": "p", "candidates": ["a", "b"], "scores": [1.7e308, -1e101]},
     "scores[0]", "expected a number of magnitude at most 1e+100, got 1.7e+308"),
    ({"id": "x", "prompt": "p", "candidates": ["a"], "scores": [1]}, "candidates",
     "at least 2"),
    ({"id": "x", "prompt": "p", "candidates": ["a", ""], "scores": [1, 0]}, "candidates[1]",
     "non-empty string"),
    ({"id": "x", "prompt": 3, "candidates": ["a", "b"], "scores": [1, 0]}, "prompt",
     "non-empty string"),
    # A JSON \ud800 escape: refused here, not a tokenizer TypeError once the model has loaded.
    ({"id": "x", "prompt": "p", "candidates": ["a", "b\ud800"], "scores": [1, 0]},
     "candidates[1]", "contains a lone surrogate (\\ud800) at offset 1"),
    ({"id": "p1", "prompt": "p", "candidates": ["a", "b"], "scores": [1, 0]}, "id",
     "duplicate id 'p1'"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, line, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [HAND[0], "", json.dumps(line)])
    with pytest.raises(RowError) as err:
        load_best_of_n(path)
    assert err.value.line == 3 and err.value.field == field
    assert str(err.value).startswith(f"{path}:3: field '{field}': ")
    assert reason in str(err.value)


def test_an_empty_subset_is_no_subset_as_in_preference_rows(tmp_path):
    # A table export writes "" (or spaces) for a missing subset: no subset, as load_rows reads
    # it, not an error; a subset that is not a string is still refused.
    row = {"id": "x", "prompt": "p", "candidates": ["a", "b"], "scores": [1, 0]}
    items = load_best_of_n(write_jsonl(tmp_path / "a.jsonl", [{**row, "subset": ""},
                                                               {**row, "id": "y", "subset": "s"},
                                                               {**row, "id": "z", "subset": "  "}]))
    assert [item.subset for item in items] == [None, "s", None]
    with pytest.raises(RowError, match="field 'subset'"):
        load_best_of_n(write_jsonl(tmp_path / "b.jsonl", [{**row, "subset": 3}]))


def test_the_largest_scores_read_give_a_finite_report(tmp_path):
    rows = [bon_row("a", [1e100, 1e100, -1e100], [0, 1, 2]),
            bon_row("b", [-1e100, 1e100], [0, 1])]
    items = load_best_of_n(write_jsonl(tmp_path / "bon.jsonl", rows))
    report = run_evaluation(FakeScorer(), EvalConfig(), str(tmp_path / "out"),
                            best_of_n_items=items)
    with open(report["files"]["json"]) as f:
        m = json.load(f)["best_of_n"]["by_k"]["1"]
    assert m["against_oracle"]["mean_regret"] == pytest.approx(1e100)  # (2e100 + 0) / 2: picks -1e100, then 1e100
    assert m["mean_quality"]["oracle"] == pytest.approx(1e100)


def test_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [HAND[0], "{not json"])
    with pytest.raises(RowError, match=r"bad.jsonl:2: row: invalid JSON"):
        load_best_of_n(path)


def test_a_negative_seed_is_refused_before_any_scoring(tmp_path):
    items = load_best_of_n(write_jsonl(tmp_path / "bon.jsonl", HAND))
    scorer = FakeScorer()
    with pytest.raises(ValueError, match="seed=-1: must be >= 0 for Best-of-N"):
        run_evaluation(scorer, EvalConfig(seed=-1, baseline="random"), str(tmp_path / "o"),
                       best_of_n_items=items)
    assert scorer.calls == []


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("make, expected", [
    # Sources --input reads but Best-of-N does not: a clear refusal before any line is parsed,
    # not a JSON error about the first bytes of a binary file, a directory's OS error or a
    # network error (a traceback) for a hub id.
    (lambda d: _parquet(d / "bon.parquet", HAND), "a Parquet file"),
    (lambda d: (d / "ds").mkdir() or str(d / "ds"), "a directory"),
    (lambda d: "hf://owner/name", "a Hugging Face hub id"),
    # JSON that is not one object per line: said so, with the way to fix it.
    (lambda d: write_jsonl(d / "bon.json", [json.dumps(HAND)]), "a JSON array"),
    (lambda d: write_jsonl(d / "bon.json", [json.dumps(HAND[0], indent=2)]),
     "one whole JSON object per line"),
], ids=["parquet", "directory", "hub-id", "json-array", "pretty-printed-json"])
def test_a_source_that_is_not_jsonl_is_refused_with_what_to_do(tmp_path, make, expected):
    from cloud_jax.cli.common import user_error_types

    path = make(tmp_path)
    with pytest.raises(ValueError) as err:
        load_best_of_n(path)
    assert isinstance(err.value, user_error_types())
    message = str(err.value)
    assert path in message and expected in message
    assert "JSONL" in message


def test_rewards_given_in_float64_are_compared_as_given():
    # best_of_n_metrics on rewards from another scorer (Python floats, float64): two rewards that
    # differ were rounded to float32 first, became a tie and the lower index was picked, not the
    # higher reward; a finite reward beyond float32's range became inf and was refused as such.
    qualities = [np.array([0.0, 1.0]), np.array([1.0, 0.0])]
    rewards = [[1000.0, 1000.00001], [1e39, -1e39]]
    m = best_of_n_metrics(qualities, rewards, baseline_picks([2, 2], "first", 0), seed=0)
    assert m["against_oracle"]["matches"] == 2
    assert m["mean_quality"]["model"] == 1.0
    with pytest.raises(ValueError, match="finite"):
        best_of_n_metrics(qualities, [[0.0, float("nan")], [1.0, 0.0]], np.zeros(2, int), seed=0)
