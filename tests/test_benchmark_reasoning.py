"""The built-in reasoning benchmark: exact texts, oracle working, splits, balance, files, CLI."""

import collections
import dataclasses
import hashlib
import json
import re

import pytest

from cloud_jax.data.synthetic.arithmetic import Problem, computation_keys, wrong_answers
from cloud_jax.cli.common import run_command
from cloud_jax.cli.make_benchmark import main
from cloud_jax.data.synthetic import reasoning
from cloud_jax.data.synthetic.reasoning import (ReasoningBenchmarkConfig, generate_rows,
                                                generate_split, length_stats,
                                                partial_check_accuracies, response_prior_accuracy,
                                                shortcut_accuracies, split_of, write_splits)
from cloud_jax.data.synthetic.reasoning_text import (critique_text, parse_prompt, prompt_text,
                                                     response_text, steps_of, verdict_of, verify)
from cloud_jax.data.schema import load_rows
from cloud_jax.errors import ConfigError

ALL_OPS = ("add", "sub", "mul", "claim", "compare")


def _cfg(**kw) -> ReasoningBenchmarkConfig:
    base = dict(num_train=300, num_eval=60, num_test=60)
    base.update(kw)
    return ReasoningBenchmarkConfig(**base)


@pytest.fixture(scope="module")
def big_default():
    """The default mix (2-digit add and sub) with plausible wrong answers only, as in eval and
    test, and large enough to measure shortcuts to about +-1%."""
    return generate_split(ReasoningBenchmarkConfig(num_train=4000, train_random_share=0.0),
                          "train")


# --- exact texts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("problem,answer,critique", [
    (Problem("add", (47, 38)), 85, "47+38: 7+8=15, 4+3+1=8, so 85; says 85: Correct"),
    (Problem("add", (47, 38)), 75, "47+38: 7+8=15, 4+3+1=8, so 85; says 75: Incorrect"),
    (Problem("add", (74, 52)), 126, "74+52: 4+2=6, 7+5=12, so 126; says 126: Correct"),
    (Problem("sub", (85, 38)), 57, "85-38: 15-8=7, 8-1-3=4, so 47; says 57: Incorrect"),
    (Problem("sub", (52, 47)), 5, "52-47: 12-7=5, 5-1-4=0, so 5; says 5: Correct"),
    (Problem("sub", (100, 1)), 99, "100-1: 10-1=9, 10-1-0=9, 1-1-0=0, so 99; says 99: Correct"),
    (Problem("mul", (47, 6)), 282, "47*6: 7*6=42, 4*6+4=28, so 282; says 282: Correct"),
    (Problem("claim", (47, 38, 84)), True,
     "47+38: 7+8=15, 4+3+1=8, so 85; claim 84: no; says yes: Incorrect"),
    (Problem("compare", (23, 45, 31, 39)), 1,
     "23+45: 3+5=8, 2+4=6, so 68; 31+39: 1+9=10, 3+3+1=7, so 70; 68<70: second; "
     "says second: Correct"),
])
def test_compact_critiques_hand_written(problem, answer, critique):
    assert critique_text(problem, answer, "compact") == critique


@pytest.mark.parametrize("problem,answer,critique", [
    (Problem("add", (47, 38)), 75, "47+38: 7+8=15 5 ok, 4+3+1=8 7 no: Incorrect"),
    (Problem("add", (74, 52)), 126, "74+52: 4+2=6 6 ok, 7+5=12 12 ok: Correct"),
    (Problem("sub", (52, 47)), 4, "52-47: 12-7=5 4 no, 5-1-4=0 0 ok: Incorrect"),
    (Problem("mul", (47, 6)), 292, "47*6: 7*6=42 2 ok, 4*6+4=28 29 no: Incorrect"),
    (Problem("claim", (47, 38, 84)), True,
     "47+38: 7+8=15 4 no, 4+3+1=8 8 ok; claim no; says yes: Incorrect"),
    (Problem("compare", (23, 45, 31, 39)), 1,  # no columns to check against: as compact
     "23+45: 3+5=8, 2+4=6, so 68; 31+39: 1+9=10, 3+3+1=7, so 70; 68<70: second; "
     "says second: Correct"),
])
def test_columns_critiques_hand_written(problem, answer, critique):
    assert critique_text(problem, answer, "columns") == critique
    assert prompt_text(problem, "columns") == prompt_text(problem, "compact")
    assert response_text(problem, answer, "columns") == response_text(problem, answer, "compact")


def test_compact_prompts_and_responses():
    assert prompt_text(Problem("add", (47, 38)), "compact") == "47+38=?"
    assert prompt_text(Problem("mul", (47, 6)), "compact") == "47*6=?"
    assert prompt_text(Problem("claim", (47, 38, 84)), "compact") == "Is 47+38=84?"
    assert prompt_text(Problem("compare", (23, 45, 31, 39)), "compact") == \
        "Larger: 23+45 or 31+39?"
    assert response_text(Problem("add", (47, 38)), 85, "compact") == "85"
    assert response_text(Problem("claim", (1, 2, 3)), False, "compact") == "no"
    assert response_text(Problem("compare", (1, 2, 3, 4)), 0, "compact") == "first"


def test_natural_texts_hand_written():
    p = Problem("add", (47, 38))
    assert prompt_text(p, "natural", 0) == "What is 47 + 38?"
    assert response_text(p, 84, "natural", 1) == "Sure! 47 + 38 = 84."
    assert critique_text(p, 84, "natural") == (
        "Let me check 47 + 38 column by column. Ones: 7 + 8 = 15, write 5 and carry 1. "
        "Tens: 4 + 3 + 1 = 8, write 8. So 47 + 38 = 85. The response says 84, which does not "
        "match, so the response is incorrect.")
    s = Problem("sub", (61, 46))
    assert critique_text(s, 15, "natural") == (
        "Let me check 61 - 46 column by column. Ones: 11 - 6 = 5 (borrowing 1), write 5. "
        "Tens: 6 - 1 - 4 = 1, write 1. So 61 - 46 = 15. The response says 15, which matches, so "
        "the response is correct.")


@pytest.mark.parametrize("problem,kind,expected", [
    # 39+48=87: the ones column carries into the tens, so forgetting it gives 77.
    (Problem("add", (39, 48)), "carry", [(1, 77)]),
    # 74+52=126: no carry into the tens (4+2<10) -> an invented one gives 136; into the hundreds
    # there is one (74+52>=100) -> 026 would lose a digit, so there is none for that column.
    (Problem("add", (74, 52)), "carry", [(1, 136)]),
    # 85-38=47: the ones borrow, so forgetting the borrow leaves the tens digit one higher.
    (Problem("sub", (85, 38)), "carry", [(1, 57)]),
    (Problem("add", (39, 48)), "digit", [(0, 88), (0, 86), (1, 97), (1, 77)]),
    (Problem("add", (39, 48)), "swap", [(0, 78)]),
    (Problem("add", (5, 5)), "swap", []),  # 10 -> 01 loses a digit
    (Problem("mul", (47, 6)), "carry", []),
    (Problem("sub", (12, 7)), "random", [(-1, w) for w in (0, 1, 2, 3, 4, 6, 7, 8, 9)]),
])
def test_wrong_answers_hand_computed(problem, kind, expected):
    assert wrong_answers(kind, problem) == expected


# --- oracle checker -------------------------------------------------------------------------------

def test_verify_and_verdict_of():
    assert verify("47+38=?", "85") and not verify("47+38=?", "84")
    assert not verify("47+38=?", "no number here")
    assert verify("Can you work out 61 - 46 for me?", "Sure! 61 - 46 = 15.")
    assert verify("What is 28 × 2?", "The answer is 56.")
    assert verify("Is 47+38=84?", "no") and not verify("Is 47+38=84?", "Yes.")
    assert verify("My friend says 47 + 38 = 85. Is that right?", "Yes, that is right.")
    assert verify("Larger: 23+45 or 31+39?", "second")
    assert not verify("Which is larger, 23 + 45 or 31 + 39?", "The first one is larger.")
    with pytest.raises(ValueError, match="not a reasoning-benchmark prompt"):
        verify("Tell me a joke.", "no")
    assert verdict_of("... says 85: Correct") is True
    assert verdict_of("... says 84: Incorrect") is False
    assert verdict_of("47+38: 7+8=15 5 ok, 4+3+1=8 7 no: Incorrect") is False
    assert verdict_of("so the response is incorrect.") is False
    assert verdict_of("so the response is CORRECT!\n") is True
    assert verdict_of("47+38: 7+8=15, 4+3+1=8, so 8") is None  # cut off
    assert verdict_of("Correct, but then 12") is None
    assert verdict_of("") is None


def test_verdict_of_reads_a_negated_verdict_as_its_negation():
    """A model's own critique may end "not correct": that judges the response wrong, and read as
    "correct" it would count as agreeing with the oracle where the model disagreed."""
    assert verdict_of("So 40 + 86 = 126, and 136 is not correct.") is False
    assert verdict_of("... so the response isn't correct.") is False
    assert verdict_of("... so the response is NOT correct!") is False
    assert verdict_of("... so the response is not incorrect.") is True
    # Only a negation right before the verdict word counts.
    assert verdict_of("Not a carry slip: the response is correct.") is True
    assert verdict_of("... says 85, knot: Correct") is True


# How critiques phrase a verdict, and what it says of the response: True (correct), False (not
# correct), None (no verdict, or one that does not say which).
VERDICTS = [
    ("... so the response is correct.", True),
    ("... so the response is incorrect.", False),
    ("... so the response is not correct.", False),
    ("... so the response isn't correct.", False),
    ("... so the response isn’t correct.", False),
    ("... so the response is not quite correct.", False),
    ("... so the response is not entirely correct.", False),
    ("... so the response is not fully correct.", False),
    ("... so the response is not really correct.", False),
    ("... so the response is not at all correct.", False),
    ("... so the response is not correct at all.", False),
    ("... so the response is far from correct.", False),
    ("... so the response is nowhere near correct.", False),
    ("... so the response is never correct.", False),
    ("... so the response cannot be correct.", False),
    ("... so the response can't be correct.", False),
    ("... so the response does not seem correct.", False),
    ("... so the response doesn't look correct.", False),
    ("... so the response is almost correct.", False),
    ("... so the response is nearly correct.", False),
    ("... so the response is partially correct.", False),
    ("... so the response is partly incorrect.", False),
    ("... so the response is entirely correct.", True),
    ("... so the response is completely correct.", True),
    ("... so the response seems correct.", True),
    ("... so the response is wrong.", False),
    ("... so the response is right!", True),
    ("... so the response is not right.", False),
    ("... so the response isn't quite right.", False),
    ("... so the response is not wrong.", True),
    ("... so the response is not incorrect.", True),
    ("... so the response is not at all incorrect.", True),
    # A hedge that leaves the verdict open: neither.
    ("... so the response is not entirely incorrect.", None),
    ("... so the response is not completely wrong.", None),
    # Only the words right before the verdict count.
    ("Not a carry slip: the response is correct.", True),
    ("... says 85, knot: Correct", True),
    ("Nothing is wrong: the response is correct.", True),
    ("It is not 84; the response is correct.", True),
    ("47+38: 7+8=15, 4+3+1=8, so 8", None),
    ("Correct, but then 12", None),
]


@pytest.mark.parametrize("critique,verdict", VERDICTS)
def test_verdict_of_reads_the_common_phrasings_of_a_verdict(critique, verdict):
    assert verdict_of(critique) is verdict


def _check_compact_working(critique: str, prompt: str) -> None:
    """Independent of the generator: every step is true arithmetic, on the right digits, with
    the carry/borrow of the step before, and the answer read off the steps is the true one."""
    p = parse_prompt(prompt)
    sums = [p.operands[:2]] if p.op != "compare" else [p.operands[:2], p.operands[2:]]
    op = "add" if p.op in ("claim", "compare") else p.op
    steps = steps_of(critique)
    for step in steps:
        left, right = step.split("=")
        assert eval(left) == int(right), step  # digits and + - * only (checked by steps_of)
    for a, b in sums:
        da, db = str(a)[::-1], str(b)[::-1]
        width = len(da) if op == "mul" else max(len(da), len(db))
        mine, steps = steps[:width], steps[width:]
        carry, digits = 0, []
        for col, step in enumerate(mine):
            x = int(da[col]) if col < len(da) else 0
            left, right = step.split("=")
            if op == "add":
                y = int(db[col]) if col < len(db) else 0
                assert left == f"{x}+{y}" + ("+1" if carry else ""), (critique, step)
                carry = int(right) // 10
            elif op == "sub":
                y = int(db[col]) if col < len(db) else 0
                borrow = int(x - carry < y)
                assert left == f"{'1' if borrow else ''}{x}" + ("-1" if carry else "") + f"-{y}"
                carry = borrow
            else:
                assert left == f"{x}*{b}" + (f"+{carry}" if carry else ""), (critique, step)
                carry = int(right) // 10
            digits.append(right if col == width - 1 else right[-1])
        result = int("".join(reversed(digits)))
        assert result == {"add": a + b, "sub": a - b, "mul": a * b}[op]
        assert f"so {result};" in critique
    assert not steps


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_every_critique_works_and_agrees_with_verify(digits):
    cfg = _cfg(ops=ALL_OPS, min_digits=digits, max_digits=digits, num_train=150,
               num_eval=20, num_test=20, style="compact")
    for rows in generate_rows(cfg).values():
        for r in rows:
            assert verify(r["prompt"], r["chosen"]) is True
            assert verify(r["prompt"], r["rejected"]) is False
            assert verdict_of(r["chosen_feedback"]) is True
            assert verdict_of(r["rejected_feedback"]) is False
            for fb in (r["chosen_feedback"], r["rejected_feedback"]):
                _check_compact_working(fb, r["prompt"])
            # The two critiques of a pair differ only in what the response says and the verdict.
            head = r["chosen_feedback"].rsplit("; says ", 1)[0]
            assert r["rejected_feedback"].rsplit("; says ", 1)[0] == head
            assert r["chosen_feedback"] == f"{head}; says {r['chosen']}: Correct"
            assert r["rejected_feedback"] == f"{head}; says {r['rejected']}: Incorrect"


def _check_columns_working(critique: str, prompt: str, response: str) -> None:
    """Independent of the generator: each column's digit of the checked number is the right one
    and ``ok`` says whether it equals the step's digit."""
    p = parse_prompt(prompt)
    if p.op == "compare":
        return
    checked = str(p.operands[2] if p.op == "claim" else int(response))[::-1]
    found = re.findall(r"(\d+(?:[-+*]\d+)+)=(\d+) (\d+) (ok|no)", critique)
    assert found, critique
    for col, (left, value, digit, mark) in enumerate(found):
        assert eval(left) == int(value)
        last = col == len(found) - 1
        assert digit == ((checked[col:][::-1] if last else checked[col:col + 1]) or "0")
        assert (mark == "ok") == (int(digit) == (int(value) if last else int(value) % 10))
    assert [f"{left}={value}" for left, value, _, _ in found] == steps_of(critique)


def test_columns_rows_check_every_column():
    cfg = _cfg(ops=ALL_OPS, style="columns", min_digits=1, max_digits=3)
    compact = generate_split(dataclasses.replace(cfg, style="compact"), "train")
    for r, c in zip(generate_split(cfg, "train"), compact):
        assert (r["prompt"], r["chosen"], r["rejected"]) == (c["prompt"], c["chosen"],
                                                             c["rejected"])
        assert verdict_of(r["chosen_feedback"]) is True
        assert verdict_of(r["rejected_feedback"]) is False
        _check_columns_working(r["chosen_feedback"], r["prompt"], r["chosen"])
        _check_columns_working(r["rejected_feedback"], r["prompt"], r["rejected"])


def test_natural_rows_agree_with_verify():
    rows = generate_split(_cfg(ops=ALL_OPS, style="natural"), "train")
    for r in rows:
        assert verify(r["prompt"], r["chosen"]) and not verify(r["prompt"], r["rejected"])
        assert verdict_of(r["chosen_feedback"]) is True
        assert verdict_of(r["rejected_feedback"]) is False
        for step in re.findall(r"(\d+(?: [-+×] \d+)+) = (\d+)", r["chosen_feedback"]):
            assert eval(step[0].replace("×", "*")) == int(step[1]), step


def test_natural_is_the_same_rows_in_other_words():
    short = generate_split(_cfg(ops=ALL_OPS), "eval")
    natural = generate_split(_cfg(ops=ALL_OPS, style="natural"), "eval")
    for c, n in zip(short, natural):
        assert parse_prompt(c["prompt"]) == parse_prompt(n["prompt"])
        assert c["subset"] == n["subset"]


# --- determinism and splits -----------------------------------------------------------------------

def test_deterministic_by_seed():
    cfg = _cfg(ops=ALL_OPS)
    assert generate_rows(cfg) == generate_rows(cfg)
    other = generate_rows(dataclasses.replace(cfg, seed=1))
    assert other["train"] != generate_rows(cfg)["train"]


def test_default_rows_are_the_documented_ones():
    """docs/REASONING_BENCHMARK.md shows these rows; changed draws show here first."""
    rows = generate_split(ReasoningBenchmarkConfig(), "train", 6)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["subset"]) for r in rows[4:]] == [
        ("40+86=?", "126", "136", "add-carry"), ("37+99=?", "136", "126", "add-carry")]
    assert rows[5]["chosen_feedback"] == "37+99: 7+9=16 6 ok, 3+9+1=13 13 ok: Correct"
    assert rows[4]["rejected_feedback"] == "40+86: 0+6=6 6 ok, 4+8=12 13 no: Incorrect"


def test_split_rows_depend_only_on_their_own_size():
    small = _cfg(num_train=100, num_eval=30)
    large = _cfg(num_train=500, num_eval=60)
    assert generate_split(small, "eval") == generate_split(large, "eval")[:30]
    assert generate_split(small, "test") == generate_split(large, "test")


def test_splits_are_disjoint_in_prompts_and_computations():
    cfg = _cfg(ops=ALL_OPS, num_train=1500, num_eval=300, num_test=300)
    rows = generate_rows(cfg)
    prompts = {s: {r["prompt"] for r in rs} for s, rs in rows.items()}
    keys = {s: {k for r in rs for k in computation_keys(parse_prompt(r["prompt"]))}
            for s, rs in rows.items()}
    for s, t in (("train", "eval"), ("train", "test"), ("eval", "test")):
        assert not prompts[s] & prompts[t]
        assert not keys[s] & keys[t]
    for s, rs in rows.items():
        assert len(prompts[s]) == len(rs)  # distinct prompts within a split
        assert all(split_of(parse_prompt(r["prompt"])) == s for r in rs)
    # a + b and b + a are one computation: they always share a split.
    assert split_of(Problem("add", (47, 38))) == split_of(Problem("add", (38, 47))) == \
        split_of(Problem("claim", (38, 47, 85)))


def test_a_product_and_its_commuted_twin_share_a_split():
    """3*4 and 4*3 ask the same product (with 1-digit first factors both are drawn): like a+b
    and b+a they are one computation, so neither can be trained on while the other is tested."""
    for a in range(1, 10):
        for b in range(2, 10):
            assert split_of(Problem("mul", (a, b))) == split_of(Problem("mul", (b, a))), (a, b)
    cfg = _cfg(ops=("mul",), min_digits=1, max_digits=2, num_train=300, num_eval=30,
               num_test=30)
    products = {s: {tuple(sorted(parse_prompt(r["prompt"]).operands)) for r in rs}
                for s, rs in generate_rows(cfg).items()}
    assert not products["train"] & (products["eval"] | products["test"])
    # The count that refuses a request at once is of the same keys.
    held = {s: sum(split_of(Problem("mul", (a, b))) == s for a in range(1, 100)
                   for b in range(2, 10)) for s in ("train", "eval", "test")}
    assert {s: reasoning.max_distinct_problems(cfg, s) for s in held} == held


def test_too_many_rows_for_the_space_is_a_clear_error():
    with pytest.raises(ValueError, match="ask for fewer rows"):
        generate_split(_cfg(ops=("mul",), min_digits=1, max_digits=1, num_eval=200), "eval")


@pytest.fixture
def draws(monkeypatch):
    """Counts the generator's draws; past 100,000 (seconds of 1-digit draws) a test fails rather
    than wait for a search that goes on."""
    count = [0]
    draw = reasoning._unit

    def counted(*args, **kwargs):
        count[0] += 1
        if count[0] > 100_000:
            raise AssertionError("still drawing after 100,000 draws")
        return draw(*args, **kwargs)

    monkeypatch.setattr(reasoning, "_unit", counted)
    return count


def test_more_rows_than_the_split_holds_are_refused_before_any_draw(tmp_path, draws):
    out = tmp_path / "bench"
    with pytest.raises(ConfigError) as err:
        main(["--out", str(out), "--digits", "1", "--ops", "add", "--train", "5000",
              "--eval", "0", "--test", "0", "--no-progress"])
    # Counted here one by one: the 1-digit sums a+b (and b+a) whose computation is in train.
    held = sum(split_of(Problem("add", (a, b))) == "train"
               for a in range(1, 10) for b in range(1, 10))
    message = str(err.value)
    assert draws[0] == 0 and "\n" not in message
    assert f"holds at most {held} distinct problems" in message
    assert f"ask for fewer rows (at most {held - held % 2}: num_train, make-benchmark --train)" \
        in message
    assert "--max-digits or --digits" in message and "(ops, --ops)" in message
    assert not out.exists()
    one_digit_add = _cfg(ops=("add",), min_digits=1, max_digits=1)
    assert reasoning.max_distinct_problems(one_digit_add, "train") == held


def test_a_used_up_split_stops_after_a_bounded_run_of_fruitless_draws(tmp_path, draws):
    # 1-digit claims: the bound (sums times the values a claim can name) is far above what the
    # pairs of the train split give, so the search itself has to notice.
    cfg = _cfg(ops=("claim",), min_digits=1, max_digits=1, num_train=6000)
    assert reasoning.max_distinct_problems(cfg, "train") >= 6000
    with pytest.raises(ConfigError) as err:
        main(["--out", str(tmp_path / "bench"), "--digits", "1", "--ops", "claim",
              "--train", "6000", "--eval", "0", "--test", "0", "--no-progress"])
    message = str(err.value)
    found = int(re.search(r"found only (\d+) of the 6000 distinct train rows", message)[1])
    assert f"{reasoning.MAX_IDLE_DRAWS} draws in a row found no new one" in message
    assert f"ask for fewer rows (at most {found}: num_train, make-benchmark --train)" in message
    assert draws[0] <= 100 * found + reasoning.MAX_IDLE_DRAWS + 1
    # The rows of a smaller split are a prefix of the larger one's: the count named is found.
    assert len(generate_split(cfg, "train", found)) == found


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def test_a_seed_gives_the_rows_it_always_gave():
    """Digests of rows from the search as it was before it paired the problems left near a full
    space, and before its caches: requests it filled must keep their exact bytes."""
    assert _digest(generate_rows(ReasoningBenchmarkConfig())) == \
        "a783ab02e2a63e5b4814b5197a595b1085bc28dbd093bfe3f808f82ad400b03d"
    assert _digest(generate_rows(ReasoningBenchmarkConfig(
        num_train=600, num_eval=100, num_test=100, ops=ALL_OPS, min_digits=1, max_digits=3,
        style="natural", seed=3))) == \
        "c24bff63b7f1f60e9a89aa58914a1199fd59f9ccad98931b2e9447a399940753"
    # (changed once on purpose: a * b and b * a became one computation, which moved some
    # products of two single-digit factors to their twin's split)
    # The most rows the search found before it gave up: 122 1-digit claims, 54 1-digit sums.
    claims = _cfg(ops=("claim",), min_digits=1, max_digits=1)
    assert _digest(generate_split(claims, "train", 122)) == \
        "a81e9919600d264d03ae0a157178f057045e1c8e8030641dd04f4bc9d278fe2d"
    sums = _cfg(ops=("add",), min_digits=1, max_digits=1)
    assert _digest(generate_split(sums, "train", 54)) == \
        "23a6e289faf19083fca08df2582986d26a2a64e1f1e0c48115b9dd2fb8c9b0e9"


def test_a_nearly_full_split_pairs_the_problems_left(monkeypatch):
    # 1-digit sums: the train share holds 62 problems; 20,000 fruitless draws came after 54 rows.
    cfg = _cfg(ops=("add",), min_digits=1, max_digits=1)
    assert reasoning.max_distinct_problems(cfg, "train") == 62
    rows = generate_split(cfg, "train", 60)
    assert _digest(rows[:54]) == "23a6e289faf19083fca08df2582986d26a2a64e1f1e0c48115b9dd2fb8c9b0e9"
    assert len({r["prompt"] for r in rows}) == 60
    assert all(split_of(parse_prompt(r["prompt"])) == "train" for r in rows)
    assert all(verify(r["prompt"], r["chosen"]) and not verify(r["prompt"], r["rejected"])
               for r in rows)
    # Still in swapped-role twos: every response chosen as often as rejected.
    balance = collections.Counter()
    for r in rows:
        balance[r["chosen"]] += 1
        balance[r["rejected"]] -= 1
    assert not any(balance.values())
    # The pairing depends on the draws alone: a smaller split is a prefix, the same seed the same.
    assert generate_split(cfg, "train", 56) == rows[:56]
    assert generate_split(cfg, "train", 60) == rows
    with pytest.raises(ConfigError) as err:
        generate_split(cfg, "train", 62)
    message = str(err.value)
    assert "found only 60 of the 62 distinct train rows" in message
    assert "no two of the problems left pair up" in message
    assert "ask for fewer rows (at most 60: num_train, make-benchmark --train)" in message
    # Too many problems left to pair: the search gives up where the draws stalled.
    monkeypatch.setattr(reasoning, "MAX_COMPLETION_PROBLEMS", 0)
    with pytest.raises(ConfigError, match=r"found only 54 of the 60 .*at most 54"):
        generate_split(cfg, "train", 60)


# --- balance: no shortcut beats chance ------------------------------------------------------------

def test_shortcut_predictors_score_chance(big_default):
    acc = shortcut_accuracies(big_default)
    for name, value in acc.items():
        if name == "digits shared with prompt":
            # Reads the prompt, so the swapped roles do not make it exact; 4000 pairs give a
            # standard error of 0.008 for a chance predictor.
            assert abs(value - 0.5) < 0.025, (name, value)
        else:
            # A function of the response alone: exactly chance, as every response is chosen as
            # often as it is rejected.
            assert value == 0.5, (name, value)
    held_out = generate_split(ReasoningBenchmarkConfig(num_test=400), "test")
    assert response_prior_accuracy(big_default, held_out) == 0.5
    with_random = generate_split(ReasoningBenchmarkConfig(num_train=1000), "train")
    assert response_prior_accuracy(with_random, held_out) == 0.5


def _role_counts(rows):
    counts = collections.Counter()
    for r in rows:
        counts[r["chosen"]] += 1
        counts[r["rejected"]] -= 1
    return counts


@pytest.mark.parametrize("ops,digits", [(("mul",), 3), (("claim",), 2), (("compare",), 2),
                                        (ALL_OPS, 1)])
def test_every_response_is_chosen_as_often_as_rejected(ops, digits):
    rows = generate_split(_cfg(ops=ops, num_train=600, min_digits=digits, max_digits=digits),
                          "train")
    assert set(_role_counts(rows).values()) == {0}
    for name, value in shortcut_accuracies(rows).items():
        assert value == 0.5 or name == "digits shared with prompt", (ops, name, value)
        assert abs(value - 0.5) < 0.05, (ops, name, value)


def test_answers_and_verdicts_are_balanced(big_default):
    assert all(len(r["chosen"]) == len(r["rejected"]) for r in big_default)
    assert set(_role_counts(big_default).values()) == {0}
    higher = sum(int(r["chosen"]) > int(r["rejected"]) for r in big_default) / len(big_default)
    assert higher == 0.5
    # The claim's own truth, which the critique states before the verdict, is balanced too.
    claims = generate_split(_cfg(ops=("claim",), num_train=1000), "train")
    claim_true = sum("yes; says" in r["chosen_feedback"] for r in claims) / len(claims)
    assert abs(claim_true - 0.5) < 0.05


def test_partial_checks_are_imperfect(big_default):
    """A reward model that checks only the ones digit, or every digit but not the carries, stays
    well short of 1 on the default mix: most wrong answers need the carries worked out."""
    acc = partial_check_accuracies(big_default)
    assert 0.6 < acc["ones digit"] < 0.72
    assert 0.6 < acc["columns without carries"] < 0.72


# --- knobs ----------------------------------------------------------------------------------------

def test_knobs_change_the_data_as_documented():
    three = generate_split(_cfg(min_digits=3, max_digits=3, num_train=100), "train")
    for r in three:
        p = parse_prompt(r["prompt"])
        assert all(100 <= x <= 999 for x in p.operands)
        assert len(steps_of(r["chosen_feedback"])) == 3
    mixed = generate_split(_cfg(min_digits=1, max_digits=3, num_train=100), "train")
    assert {len(str(x)) for r in mixed for x in parse_prompt(r["prompt"]).operands} == {1, 2, 3}
    mul = generate_split(_cfg(ops=("mul",), max_multiplier=3, num_train=100), "train")
    assert {parse_prompt(r["prompt"]).operands[1] for r in mul} == {2, 3}
    weighted = generate_split(_cfg(ops=("add", "sub"), op_weights=(3, 1)), "train")
    share_add = sum(r["subset"].startswith("add") for r in weighted) / len(weighted)
    assert 0.65 < share_add < 0.85
    swaps = generate_split(_cfg(error_kinds=("swap",), error_weights=(1,)), "eval")
    assert {r["subset"] for r in swaps} == {"add-swap", "sub-swap"}
    default = generate_split(_cfg(num_train=2000, train_random_share=0.0), "train")
    kinds = {k: sum(r["subset"].endswith(k) for r in default) / len(default)
             for k in ("carry", "digit", "swap")}
    # Weights 0.6/0.3/0.1 before pairs without a valid wrong answer are redrawn.
    assert kinds["carry"] > kinds["digit"] > kinds["swap"] > 0.03


def test_train_random_share_only_touches_train():
    cfg = _cfg(train_random_share=0.5, num_train=600)
    rows = generate_rows(cfg)
    share = sum(r["subset"].endswith("-random") for r in rows["train"]) / len(rows["train"])
    assert 0.4 < share < 0.6
    assert set(_role_counts(rows["train"]).values()) == {0}
    assert all(verify(r["prompt"], r["chosen"]) and not verify(r["prompt"], r["rejected"])
               for r in rows["train"])
    plausible = _cfg(train_random_share=0.0)
    assert rows["eval"] == generate_split(plausible, "eval")
    assert rows["test"] == generate_split(plausible, "test")
    assert not any(r["subset"].endswith("-random") for r in generate_split(plausible, "train"))
    default = generate_split(ReasoningBenchmarkConfig(num_train=1000), "train")
    assert 0.25 < sum(r["subset"].endswith("-random") for r in default) / 1000 < 0.35


@pytest.mark.parametrize("change,key", [
    (dict(ops=("add", "div")), "ops"),
    (dict(ops=()), "ops"),
    (dict(op_weights=(1.0,)), "op_weights"),
    (dict(max_digits=4), "max_digits"),
    (dict(min_digits=0), "min_digits"),
    (dict(style="verbose"), "style"),
    (dict(error_weights=(1.0, 1.0)), "error_weights"),
    (dict(ops=("mul",), error_kinds=("carry",), error_weights=(1.0,)), "error_kinds"),
    (dict(split_fractions=(0.5, 0.5, 0.5)), "split_fractions"),
    (dict(num_eval=-1), "num_eval"),
    (dict(num_train=301), "num_train"),
    # Not random.choices' "Total of weights must be finite" traceback, nor a search that fails.
    (dict(op_weights=(float("nan"), 1.0)), "op_weights"),
    (dict(error_weights=(float("inf"), 1.0, 1.0)), "error_weights"),
    (dict(split_fractions=(float("nan"), 0.5, 0.5)), "split_fractions"),
    (dict(train_random_share=1.0), "train_random_share"),
])
def test_bad_config_names_the_key(change, key):
    with pytest.raises(ConfigError, match=rf"\b{key}="):
        _cfg(**change).validate()


# --- files, lengths and the command line ----------------------------------------------------------

def test_write_splits_rows_validate(tmp_path):
    cfg = _cfg(ops=ALL_OPS, num_test=0)
    # A test split an earlier call wrote, under other settings, goes: benchmark.json has no test.
    (tmp_path / "test.jsonl").write_text("{}\n")
    paths = write_splits(str(tmp_path), cfg)
    assert set(paths) == {"train", "eval"}
    assert not (tmp_path / "test.jsonl").exists()
    for split, path in paths.items():
        loaded = load_rows(path, require_feedback=True)
        assert loaded.num_rejected == 0 and len(loaded.rows) == cfg.size(split)
    summary = json.loads((tmp_path / "benchmark.json").read_text())
    assert summary["config"]["ops"] == list(ALL_OPS)
    assert summary["splits"]["train"]["rows"] == 300
    assert set(summary["shortcut_accuracy"]) >= {"longer response", "larger number"}
    assert summary["measured_on"] == "eval"  # the held-out split, without random answers
    assert summary["shortcut_accuracy"]["longer response"] == 0.5
    natural = write_splits(str(tmp_path / "nl"), _cfg(style="natural"))
    assert load_rows(natural["test"], require_feedback=True).rows[0].prompt.endswith("?")


def test_a_write_stopped_midway_leaves_no_earlier_files_beside_its_own(tmp_path, monkeypatch):
    """A call with other settings into a directory of an earlier call, stopped after its train
    split: the earlier eval/test rows and the benchmark.json that describes them are gone, so
    nothing reads as a finished benchmark; benchmark.json, written last, marks one."""
    from cloud_jax.data.synthetic import reasoning

    write_splits(str(tmp_path), _cfg(num_train=40, num_eval=20, num_test=20))
    real_write, written = reasoning.write_jsonl_atomic, []

    def write_then_stop(path, rows):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, rows)

    monkeypatch.setattr(reasoning, "write_jsonl_atomic", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        write_splits(str(tmp_path), _cfg(num_train=40, num_eval=20, num_test=20, seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]
    assert all("-s1-" in row["id"] for row in map(json.loads, open(written[0])))


def test_default_critiques_are_short(big_default):
    stats = length_stats(big_default)
    assert stats["prompt"]["max"] == 7
    assert stats["chosen"]["max"] <= 3
    assert stats["rejected_feedback"]["max"] == 45
    assert 39 <= stats["chosen_feedback"]["mean"] <= 42
    compact = length_stats(generate_split(_cfg(style="compact", num_train=1000), "train"))
    assert compact["rejected_feedback"]["max"] <= 52


def test_cli(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--out", str(out), "--train", "40", "--eval", "10", "--test", "10",
                 "--ops", "add,mul", "--digits", "3", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "train" in printed and "shortcut predictors" in printed
    # Progress of the generation on stderr, lines in a log (no terminal here): one per split.
    assert "\r" not in captured.err
    for split, n in (("train", 40), ("eval", 10), ("test", 10)):
        assert f"make-benchmark {split}: {n}/{n} rows (100.0%), " in captured.err
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and rows[0]["id"].startswith("reasoning-s3-train-")
    assert all(len(str(parse_prompt(r["prompt"]).operands[0])) == 3 for r in rows)
    # The critique bytes printed are over both critiques of a row.
    critiques = [len(r[f].encode()) for r in rows for f in ("chosen_feedback",
                                                            "rejected_feedback")]
    assert (f"critique bytes: mean {sum(critiques) / len(critiques):.1f}, "
            f"max {max(critiques)})") in printed.splitlines()[0]
    assert run_command(main, ["--out", str(out), "--ops", "add,div"]) == 2
    assert "--ops 'add,div': expected" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--train", "0", "--eval", "0", "--test", "0"], "all 0: nothing to write"),
    (["--digits", "0"], "--digits 0: must be >= 1"),
    (["--train", "-1"], "--train must be >= 0"),
    # Rows come in twos whose responses swap roles: an odd count would write an unpaired row.
    (["--train", "1"], "--train 1: must be even"),
    # --digits sets both bounds: a bound given beside it would be dropped.
    (["--digits", "3", "--min-digits", "1"], "--digits 3 with --min-digits 1"),
    (["--max-digits", "3", "--digits", "2"], "--digits 2 with --max-digits 3")])
def test_make_benchmark_refuses_what_it_would_drop_or_crash_on(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "b"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("flag", ["--op-weights", "--error-weights", "--split-fractions"])
def test_make_benchmark_names_the_flag_of_a_list_that_is_not_numbers(tmp_path, capsys, flag):
    assert run_command(main, ["--out", str(tmp_path / "b"), flag, "0.5,x"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} '0.5,x'" in err and "comma-separated numbers" in err
    assert not (tmp_path / "b").exists()


def test_make_benchmark_weighs_error_kinds_of_ones_own_equally_unless_told(tmp_path, capsys):
    # The default weights are one per default kind: --error-kinds alone (it failed, naming
    # error_weights=(0.6, 0.3, 0.1)) weighs the kinds given equally; --error-weights still rules.
    for extra, weights in (([], [1.0, 1.0]), (["--error-weights", "3,1"], [3.0, 1.0]),
                           (["--error-kinds", "carry,digit,swap"], [0.6, 0.3, 0.1])):
        out = tmp_path / str(len(extra)) / str(len(weights))
        argv = ["--out", str(out), "--error-kinds", "carry,digit", "--train", "10", "--eval", "0",
                "--test", "0", "--no-progress", *extra]
        assert run_command(main, argv) == 0, capsys.readouterr().err
        config = json.loads((out / "benchmark.json").read_text())["config"]
        assert config["error_weights"] == weights



_LIMITS = "expected 1 <= --min-digits <= --max-digits <= 3"


@pytest.mark.parametrize("args,message", [
    (["--ops", "add,div"], "--ops 'add,div': expected a non-empty list of add, sub"),
    (["--ops", "add,add"], "--ops 'add,add': lists an operation twice"),
    (["--op-weights", "1,2,3"], "--op-weights '1,2,3': expected one finite non-negative weight"),
    (["--digits", "4"], f"--digits 4: {_LIMITS}"),
    (["--min-digits", "4"], f"--min-digits 4: {_LIMITS}"),
    (["--min-digits", "0"], f"--min-digits 0: {_LIMITS}"),
    (["--max-digits", "4"], f"--max-digits 4: {_LIMITS}"),
    (["--min-digits", "3"], f"--max-digits 2 (its default): {_LIMITS}"),
    (["--max-multiplier", "10"], "--max-multiplier 10: expected 2..9"),
    (["--error-kinds", "foo"], "--error-kinds 'foo': expected a non-empty list of carry"),
    (["--error-weights", "1,2,3,4"], "--error-weights '1,2,3,4': expected one finite"),
    (["--error-kinds", "carry", "--ops", "mul"], "--error-kinds 'carry': op 'mul' has none"),
    (["--train-random-share", "1"], "--train-random-share 1.0: expected a share in [0, 1)"),
    (["--split-fractions", "0.5,0.5"], "--split-fractions '0.5,0.5': expected three positive")])
def test_make_benchmark_names_the_flag_of_a_bad_setting(tmp_path, capsys, args, message):
    """The benchmark's settings are checked by their config names (ops=..., min_digits); the
    command says the flags the user typed, with what was typed."""
    assert run_command(main, ["--out", str(tmp_path / "b"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not re.search(r"(?<![-\w])(ops|op_weights|min_digits|max_digits|max_multiplier|"
                         r"error_kinds|error_weights|train_random_share|split_fractions)\b", err)
    assert not (tmp_path / "b").exists()
