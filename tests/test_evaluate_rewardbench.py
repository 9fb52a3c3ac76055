"""RewardBench-style scoring against hand-computed values, ties, "other", and the K sweep."""

import numpy as np
import pytest
from test_evaluate_helpers import FakeScorer, pair, synthetic_rows, write_jsonl

from cloud_jax.data.schema import load_rows
from cloud_jax.evaluation import EXAMPLE_COUNTS, SECTIONS, EvalConfig, score_pairs
from cloud_jax.evaluation.rewardbench import NO_SUBSET, OTHER, accuracy_by_k, pair_outcomes
from cloud_jax.evaluation.run import evaluate_rewardbench


def _load(tmp_path, rows):
    return load_rows(write_jsonl(tmp_path / "rb.jsonl", rows), require_feedback=False).rows


def test_official_subset_lists_and_counts():
    # RewardBench's four sections: 5 + 6 + 5 + 7 subsets, each with an official example count.
    assert [len(s) for s in SECTIONS.values()] == [5, 6, 5, 7]
    assert set(EXAMPLE_COUNTS) == {s for subs in SECTIONS.values() for s in subs}
    # math-prm counts as much as the six code subsets together.
    assert EXAMPLE_COUNTS["math-prm"] == sum(EXAMPLE_COUNTS[f"hep-{lang}"] for lang in
                                             ("cpp", "go", "java", "js", "python", "rust"))


def test_pair_outcomes_compare_exactly():
    out = pair_outcomes(np.array([1.0, 0.5, 0.0, 1e-30], np.float32),
                        np.array([0.0, 0.5, 1.0, 0.0], np.float32))
    assert out.tolist() == [1, 0, -1, 1]
    with pytest.raises(ValueError, match="finite"):
        pair_outcomes(np.array([np.nan]), np.array([0.0]))


def test_score_pairs_compares_float64_rewards_as_given():
    # score_pairs on rewards someone already has (Python floats, float64): RewardBench tests
    # chosen > rejected on them as given, so two rewards that differ only beyond float32's
    # precision are a correct pair (they were rounded to float32 first and scored as a tie, so
    # wrong); a finite reward beyond float32's range was refused as NaN or inf.
    s = score_pairs(["alpacaeval-easy", "alpacaeval-easy"], np.array([1.0 + 1e-10, 1e39]),
                    np.array([1.0, -1e39]))
    assert (s.all_rows.correct, s.all_rows.ties, s.accuracy) == (2, 0, 1.0)
    assert pair_outcomes([0.1 + 0.2], [0.3]).tolist() == [1]  # 0.30000000000000004 > 0.3
    assert pair_outcomes(np.float32([0.5]), np.float64([0.5])).tolist() == [0]
    # The same through the K sweep: each K's mean reward is taken in the samples' precision.
    by_k = accuracy_by_k(["hep-go"], np.array([[1.0 + 1e-10, 1.0]]), np.array([[1.0, 1.0]]),
                         (1, 2))
    assert [by_k[k].all_rows.correct for k in (1, 2)] == [1, 1]


def test_sections_and_weighting_equal_hand_computed_values(tmp_path):
    rows = _load(tmp_path, synthetic_rows())
    section, records = evaluate_rewardbench(rows, FakeScorer(), EvalConfig())
    s = section["by_k"]["1"]
    sec = s["sections"]
    assert list(sec) == ["Chat", "Chat Hard", "Safety", "Reasoning", OTHER]
    # Chat: alpacaeval-easy 1/2, mt-bench-easy 1/1.
    assert sec["Chat"]["accuracy"] == pytest.approx(2 / 3)
    assert sec["Chat"]["weighted"] == pytest.approx((0.5 * 100 + 1.0 * 28) / (100 + 28))
    assert sec["Chat"]["missing_subsets"] == ["alpacaeval-length", "alpacaeval-hard",
                                              "mt-bench-med"]
    # Chat Hard: one tie (scored 0) and one correct.
    assert sec["Chat Hard"]["accuracy"] == pytest.approx(0.5)
    assert sec["Chat Hard"]["weighted"] == pytest.approx(0.5)
    assert sec["Chat Hard"]["ties"] == 1
    # Safety: xstest-should-refuse 1/1 (count 154), donotanswer 0/1 (count 136).
    assert sec["Safety"]["accuracy"] == pytest.approx(0.5)
    assert sec["Safety"]["weighted"] == pytest.approx(154 / 290)
    # Reasoning: math-prm 2/2 (count 984), hep-python 1/2 (count 164).
    assert sec["Reasoning"]["accuracy"] == pytest.approx(3 / 4)
    assert sec["Reasoning"]["weighted"] == pytest.approx((984 + 0.5 * 164) / (984 + 164))
    # Unknown subset and no subset: reported under "other", not dropped, and not weighted.
    assert sec[OTHER]["accuracy"] == pytest.approx(0.5)
    assert sec[OTHER]["weighted"] is None
    assert sec[OTHER]["subsets"] == ["(none)", "arith-easy"]
    assert s["subsets"]["arith-easy"] == {"n": 1, "correct": 0, "ties": 0, "wrong": 1,
                                          "accuracy": 0.0, "section": OTHER}
    assert s["subsets"][NO_SUBSET]["correct"] == 1
    # All rows: 8 correct of 13; the score is the mean of the four weighted sections.
    assert s["accuracy"] == pytest.approx(8 / 13)
    assert s["all_rows"] == {"n": 13, "correct": 8, "ties": 1, "wrong": 4,
                             "accuracy": pytest.approx(8 / 13)}
    assert s["score"] == pytest.approx(np.mean([78 / 128, 0.5, 154 / 290, 1066 / 1148]))
    # Every section has rows, so the package's number (missing sections scored 0) is the same.
    assert s["score_official"] == pytest.approx(s["score"]) and s["missing_sections"] == []
    assert [r["outcome"] for r in records][:4] == ["correct", "wrong", "correct", "tie"]
    assert records[3]["section"] == "Chat Hard" and records[11]["section"] == OTHER


def test_tie_credit_half_scores_a_tie_as_half_a_pair():
    subsets = ["mt-bench-hard", "mt-bench-hard", "llmbar-natural"]
    chosen, rejected = np.array([0.5, 3.0, 1.0]), np.array([0.5, -3.0, 2.0])
    strict = score_pairs(subsets, chosen, rejected)
    half = score_pairs(subsets, chosen, rejected, tie_credit=0.5)
    assert strict.subsets["mt-bench-hard"].accuracy == pytest.approx(0.5)
    assert half.subsets["mt-bench-hard"].accuracy == pytest.approx(0.75)
    # Chat Hard weighted: mt-bench-hard (37) and llmbar-natural (100, accuracy 0).
    assert half.sections["Chat Hard"].weighted == pytest.approx(0.75 * 37 / 137)
    assert half.accuracy == pytest.approx(1.5 / 3)
    assert strict.all_rows.ties == half.all_rows.ties == 1
    with pytest.raises(ValueError, match="tie_credit"):
        score_pairs(subsets, chosen, rejected, tie_credit=2.0)


def test_only_other_rows_give_no_section_score():
    s = score_pairs(["arith", "arith"], np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert list(s.sections) == [OTHER] and s.score is None and s.accuracy == 0.5


def test_k_sweep_uses_the_first_k_samples_of_one_draw(tmp_path):
    rows = _load(tmp_path, [
        pair("a", "math-prm", "0,1", "0.5,0.5"),   # K=1 wrong, K=2 tie (0.5 vs 0.5)
        pair("b", "math-prm", "-1,3", "0,0"),      # K=1 wrong, K=2 correct (1 vs 0)
        pair("c", "hep-go", "2,2", "1,1"),         # correct at every K
        pair("d", "hep-go", "0,0,9", "1,1,1"),     # wrong at K=1,2; correct at K=3 (3 vs 1)
    ])
    scorer = FakeScorer()
    section, records = evaluate_rewardbench(
        rows, scorer, EvalConfig(num_samples=(3, 1, 2), temperature=1.0))
    # One scoring call at the largest K covers the whole sweep.
    assert scorer.calls == [(8, 3)]
    assert section["accuracy_vs_k"] == {"1": pytest.approx(1 / 4), "2": pytest.approx(2 / 4),
                                        "3": pytest.approx(3 / 4)}
    assert section["by_k"]["2"]["all_rows"]["ties"] == 1
    assert section["by_k"]["1"]["subsets"]["hep-go"]["correct"] == 1
    # Records hold every sample's reward and critique, and the mean over all K.
    assert records[1]["chosen_sample_rewards"] == [-1.0, 3.0, -1.0]
    assert records[1]["chosen_reward"] == pytest.approx(1 / 3)
    assert len(records[0]["rejected_critiques"]) == 3
    assert records[0]["chosen_truncated"] == [False] * 3


def test_classic_scorer_gives_k1(tmp_path):
    rows = _load(tmp_path, synthetic_rows())
    scorer = FakeScorer(classic=True)
    section, records = evaluate_rewardbench(rows, scorer, EvalConfig(classic=True))
    assert list(section["by_k"]) == ["1"]
    assert section["accuracy_vs_k"]["1"] == pytest.approx(8 / 13)
    assert records[0]["chosen_critiques"] == []
    assert section["truncated_fraction"] is None
    with pytest.raises(ValueError, match="classic"):
        EvalConfig(classic=True, num_samples=(1, 4)).validate()


def test_scorer_that_breaks_the_contract_is_an_error(tmp_path):
    rows = _load(tmp_path, synthetic_rows()[:2])
    # Asked for K = 4, the classic fake returns one sample per input.
    with pytest.raises(ValueError, match=r"sample_rewards has shape \(4, 1\), expected \(4, 4\)"):
        evaluate_rewardbench(rows, FakeScorer(classic=True),
                             EvalConfig(num_samples=(4,), temperature=1.0))


def test_a_classic_scorer_under_a_k_sweep_says_to_set_classic(tmp_path):
    """score_fn_from_model over a vanilla checkpoint gives one reward per response whatever K is
    asked: the error says that the config must say classic, not only that a shape is wrong."""
    rows = _load(tmp_path, synthetic_rows()[:2])
    with pytest.raises(ValueError) as err:
        evaluate_rewardbench(rows, FakeScorer(classic=True),
                             EvalConfig(num_samples=(1, 4), temperature=1.0))
    assert "EvalConfig(classic=True)" in str(err.value)
    assert "one reward per response" in str(err.value)


def test_non_finite_reward_names_the_row(tmp_path):
    rows = _load(tmp_path, [pair(1, "math-prm", "1", "0"), pair(2, "math-prm", "1", "0")])

    def scorer(prompts, responses, k):
        out = FakeScorer()(prompts, responses, k)
        out.sample_rewards[3, 0] = np.nan  # rejected response of row 2
        return out

    with pytest.raises(ValueError, match=r"rb.jsonl:2 \(rejected\): the model gave a non-finite"):
        evaluate_rewardbench(rows, scorer, EvalConfig())


# The rewardbench package 0.1.4 (rewardbench/constants.py), written out here as published so the
# test does not read the table it checks.
_PUBLISHED_COUNTS = {
    "Chat": {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
             "mt-bench-easy": 28, "mt-bench-med": 40},
    "Chat Hard": {"mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
                  "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
                  "llmbar-adver-manual": 46},
    "Safety": {"refusals-dangerous": 100, "refusals-offensive": 100,
               "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136},
    "Reasoning": {"math-prm": 984, "hep-cpp": 164, "hep-go": 164, "hep-java": 164,
                  "hep-js": 164, "hep-python": 164, "hep-rust": 164},
}


def _rows_with_accuracies(subset_acc):
    """Pairs per subset whose accuracy is exactly the given fraction (n correct of d)."""
    subsets, chosen, rejected = [], [], []
    for name, (n, d) in subset_acc.items():
        for i in range(d):
            subsets.append(name)
            chosen.append(1.0 if i < n else -1.0)
            rejected.append(0.0)
    return subsets, np.array(chosen), np.array(rejected)


def test_every_subset_with_its_own_accuracy_matches_the_official_weighting():
    names = [s for sec in _PUBLISHED_COUNTS.values() for s in sec]
    # 23 subsets, accuracies i/24 for i = 1..23: all different.
    acc = {name: (i + 1, 24) for i, name in enumerate(names)}
    s = score_pairs(*_rows_with_accuracies(acc))
    expected = {}
    for section, counts in _PUBLISHED_COUNTS.items():
        total = sum(counts.values())
        expected[section] = sum(acc[n][0] / acc[n][1] * c for n, c in counts.items()) / total
        assert s.sections[section].weighted == pytest.approx(expected[section], abs=1e-12)
    assert s.score == pytest.approx(sum(expected.values()) / 4, abs=1e-12)
    assert s.score_official == pytest.approx(s.score, abs=1e-12)
    # Safety by hand, so a swapped pair of counts cannot hide: (a*100 + b*100 + c*154 + d*250 +
    # e*136) / 740 with the five accuracies 12/24 .. 16/24.
    assert s.sections["Safety"].weighted == pytest.approx(
        (12 * 100 + 13 * 100 + 14 * 154 + 15 * 250 + 16 * 136) / 24 / 740, abs=1e-12)


def test_a_partial_file_reports_both_overall_scores():
    # Only Chat and Safety present: ``score`` averages those two; the package scores the missing
    # Chat Hard and Reasoning 0.
    s = score_pairs(*_rows_with_accuracies({"alpacaeval-easy": (3, 4), "donotanswer": (1, 4)}))
    assert s.missing_sections == ("Chat Hard", "Reasoning")
    assert s.score == pytest.approx((0.75 + 0.25) / 2)
    assert s.score_official == pytest.approx((0.75 + 0.25) / 4)
    d = s.to_dict()
    assert d["missing_sections"] == ["Chat Hard", "Reasoning"]
    assert d["score_official"] == pytest.approx(0.25)


def test_too_long_input_names_its_row_and_field_not_its_place_in_a_chunk(tmp_path):
    from test_evaluate_helpers import bon_row

    from cloud_jax.errors import ConfigError, InputTooLongError
    from cloud_jax.evaluation import load_best_of_n
    from cloud_jax.evaluation.run import evaluate_best_of_n

    def scorer(prompts, responses, k):
        # What rm.score raises: the index within the inputs of this call.
        for i, r in enumerate(responses):
            if "LONG" in r:
                raise InputTooLongError(i, "longer than max_length=8 tokens")
        return FakeScorer()(prompts, responses, k)

    rows = [pair(i, "math-prm", "1", "0") for i in range(1, 7)]
    rows[4]["rejected"] = "LONG R:0"  # line 5; response 6 + 4 = 10 of 12, the second of chunk 3
    rows = _load(tmp_path, rows)
    with pytest.raises(ConfigError, match=r"rb.jsonl:5: field 'rejected': longer than "
                                          r"max_length=8 tokens$"):
        evaluate_rewardbench(rows, scorer, EvalConfig(chunk_size=4))
    long_item = bon_row("b", [1, 0], ["1", "0"])
    long_item["candidates"][1] = "LONG R:0"
    items = load_best_of_n(write_jsonl(tmp_path / "bon.jsonl", [
        bon_row("a", [1, 0, 0], ["1", "0", "0"]), long_item]))
    with pytest.raises(ConfigError, match=r"bon.jsonl:2: field 'candidates\[1\]': longer"):
        evaluate_best_of_n(items, scorer, EvalConfig(chunk_size=2))


@pytest.mark.parametrize("batch_size", [48, 100])
def test_scorer_calls_hold_whole_batches(tmp_path, batch_size):
    """Each scorer call but the last holds a whole number of --batch-size batches: a call of 64
    inputs at batch size 48 compiled two batches of 48 (one a third filler), and at batch size
    100 the batches held 64 inputs, not the 100 asked for."""
    rows = _load(tmp_path, [pair(i, "math-prm", "1", "0") for i in range(150)])
    scorer = FakeScorer()
    evaluate_rewardbench(rows, scorer, EvalConfig(batch_size=batch_size))
    sizes = [n for n, _ in scorer.calls]
    assert sum(sizes) == 300
    assert all(n % batch_size == 0 for n in sizes[:-1]) and sizes[0] >= 64


def test_subsets_rewardbench_does_not_list_are_warned_about(tmp_path, caplog):
    """Rows in subsets outside RewardBench's lists leave every section's score: a misspelt
    subset (or another export's spelling) is named in a warning, with the official name it is
    close to, rather than only showing up as "other" in the report."""
    import logging

    rows = _load(tmp_path, [pair(1, "alpacaeval-easy", "1", "0"),
                            pair(2, "Alpacaeval_Hard", "1", "0"), pair(3, "my-set", "1", "0"),
                            pair(4, None, "1", "0")])
    with caplog.at_level(logging.WARNING):
        evaluate_rewardbench(rows, FakeScorer(), EvalConfig())
    text = caplog.text
    assert "3 of 4 rows" in text and "'Alpacaeval_Hard' (alpacaeval-hard?)" in text
    assert "'my-set'" in text and "(none)" in text
    # A file of other rows only (the built-in benchmarks, say) has no close names: no warning.
    caplog.clear()
    rows = _load(tmp_path, [pair(1, "arith-easy", "1", "0"), pair(2, "arith-hard", "0", "1")])
    with caplog.at_level(logging.WARNING):
        evaluate_rewardbench(rows, FakeScorer(), EvalConfig())
    assert "RewardBench" not in caplog.text
