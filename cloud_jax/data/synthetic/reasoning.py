"""A built-in, verifiable reasoning benchmark: arithmetic preference rows with oracle critiques.

    python -m cloud_jax.data.synthetic.reasoning --out data/reasoning --train 4000 --eval 500

writes ``train.jsonl``, ``eval.jsonl``, ``test.jsonl`` (the project's row format: ``id, prompt,
chosen, rejected, chosen_feedback, rejected_feedback, subset``) and ``benchmark.json`` (the config,
byte lengths, and the accuracy of simple shortcut predictors on the result). Each prompt is an
arithmetic problem, ``chosen`` answers it correctly, ``rejected`` gives a plausible wrong answer
(a carry the wrong way, a digit off by one, two digits swapped; see ``arithmetic``), and each
feedback is the oracle critique that checks the answer column by column and ends in a verdict
(see ``reasoning_text``). ``subset`` is ``<op>-<error kind>``, so a per-subset report says which
errors a reward model misses.

Why no shortcut works: rows come in twos whose two responses swap roles (a problem with answer t
and wrong answer w, and one with answer w for which t is the same kind of mistake), so every
response is chosen exactly as often as it is rejected and every function of the response alone
scores exactly 50%; both answers of a row have the same number of digits and the same wording.
docs/REASONING_BENCHMARK.md has the measured numbers. ``train_random_share`` of the train pairs
get a random same-length wrong answer instead, which keeps a small model from learning to copy
the response into its working (the doc's Learnability section).

Splits are held out by computation: a problem's split is a hash of the sums/differences/products it
asks for (a + b and b + a, and a claim or comparison using a + b, all land in the same split, as
do a * b and b * a), independent of the seed and of the sizes asked for, so no prompt, nor any
computation, of the test split is ever trained on. The rows of a split depend only on the config's seed and that split's
size, and a smaller split is a prefix of a larger one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import statistics
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from cloud_jax import storage
from cloud_jax.data.jsonl import write_jsonl_atomic
from cloud_jax.data.synthetic.arithmetic import (BASE_OP, ERROR_KINDS, KINDS_OF_OP, NUMERIC_OPS,
                                             OPS, RANDOM, OperandRange, Problem, columns,
                                             computation_keys, mul_key, problems_with_answer,
                                             sample_problem, true_answer, wrong_answers)
from cloud_jax.data.synthetic.reasoning_text import (STYLES, critique_text, num_variants, parse_prompt,
                                                 prompt_text, response_text, verdict_of, verify)
from cloud_jax.errors import ConfigError

__all__ = ["ReasoningBenchmarkConfig", "SPLITS", "generate_rows", "generate_split",
           "length_stats", "max_distinct_problems", "partial_check_accuracies",
           "response_prior_accuracy", "shortcut_accuracies", "split_of", "verdict_of", "verify",
           "write_splits"]

SPLITS = ("train", "eval", "test")


def _finite(numbers: Sequence[float]) -> bool:
    return all(math.isfinite(x) for x in numbers)


class BenchmarkSettingError(ConfigError):
    """A bad setting of :class:`ReasoningBenchmarkConfig`: ``key`` (its field), ``value`` and
    ``why`` (what is wrong, the other fields by their names), for a command to tell in its flags."""

    def __init__(self, key: str, value, why: str):
        super().__init__(f"reasoning benchmark: {key}={value!r}: {why}")
        self.key, self.value, self.why = key, value, why


@dataclasses.dataclass(frozen=True)
class ReasoningBenchmarkConfig:
    """What the generator makes. Difficulty: ``min_digits``/``max_digits`` (operand digits, which
    is also the number of column steps), ``ops`` and ``op_weights`` (the mix), ``error_kinds`` and
    ``error_weights`` (``carry`` errors need the carry worked out to be caught, ``digit`` errors in
    the ones column only the ones digits, ``swap`` errors mostly a rough size)."""

    num_train: int = 4000
    num_eval: int = 500
    num_test: int = 500
    seed: int = 0
    # columns: short regular text for byte-level models trained from scratch, whose critiques
    # check the response column by column; compact: the same prompts and responses, with
    # critiques that compare whole numbers at the end (harder for a small model to learn to
    # judge); natural: chat-like wording for pretrained models. All three draw the same problems
    # and answers for the same seed.
    style: str = "columns"
    # Any of add, sub, mul, claim ("is a+b=c?"), compare ("which is larger, a+b or c+d?").
    ops: Tuple[str, ...] = ("add", "sub")
    # Relative frequency of each op; empty means equal.
    op_weights: Tuple[float, ...] = ()
    min_digits: int = 2
    max_digits: int = 2
    # mul: the second factor is 2..max_multiplier.
    max_multiplier: int = 9
    error_kinds: Tuple[str, ...] = ERROR_KINDS
    error_weights: Tuple[float, ...] = (0.6, 0.3, 0.1)
    # Share of the train split's pairs whose wrong answer is any other number of the same length
    # (error kind "random") instead of a plausible one. Such answers break the pull to copy the
    # response's digits into the critique's working, which matches the working on every digit
    # but one when all wrong answers are plausible. eval and test never have them.
    train_random_share: float = 0.3
    # Shares of the problem space held by train / eval / test (by hash of the computation).
    split_fractions: Tuple[float, ...] = (0.8, 0.1, 0.1)

    def validate(self) -> "ReasoningBenchmarkConfig":
        def bad(key: str, why: str) -> ConfigError:
            return BenchmarkSettingError(key, getattr(self, key), why)

        for key in ("num_train", "num_eval", "num_test"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
            if getattr(self, key) % 2:
                raise bad(key, "must be even: rows come in twos whose responses swap roles, and "
                               "an unpaired row would make a response-only shortcut score above "
                               "chance")
        if self.style not in STYLES:
            raise bad("style", f"expected one of {', '.join(STYLES)}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise bad("ops", f"expected a non-empty list of {', '.join(OPS)}")
        if len(set(self.ops)) != len(self.ops):
            raise bad("ops", "lists an operation twice")
        if self.op_weights and (len(self.op_weights) != len(self.ops)
                                or not _finite(self.op_weights)
                                or min(self.op_weights) < 0 or sum(self.op_weights) <= 0):
            raise bad("op_weights", f"expected one finite non-negative weight per op "
                                    f"({len(self.ops)}), not all zero, or empty for equal weights")
        if not 1 <= self.min_digits <= self.max_digits <= 3:
            raise bad("min_digits" if not 1 <= self.min_digits <= 3 else "max_digits",
                      "expected 1 <= min_digits <= max_digits <= 3 (the generator enumerates the "
                      "problems with a given answer, which grows with 10**digits)")
        if not 2 <= self.max_multiplier <= 9:
            raise bad("max_multiplier", "expected 2..9 (mul multiplies by a single digit)")
        if not self.error_kinds or any(k not in ERROR_KINDS for k in self.error_kinds):
            raise bad("error_kinds", f"expected a non-empty list of {', '.join(ERROR_KINDS)}")
        if (len(self.error_weights) != len(self.error_kinds) or not _finite(self.error_weights)
                or min(self.error_weights) < 0 or sum(self.error_weights) <= 0):
            raise bad("error_weights", f"expected one finite non-negative weight per error kind "
                                       f"({len(self.error_kinds)}), not all zero")
        for op in self.ops:
            usable = [k for k, w in zip(self.error_kinds, self.error_weights)
                      if w > 0 and k in KINDS_OF_OP[op]]
            if not usable:
                raise bad("error_kinds", f"op {op!r} has none of its error kinds "
                                         f"({', '.join(KINDS_OF_OP[op])}) with a positive weight")
        if not 0 <= self.train_random_share < 1:
            raise bad("train_random_share", "expected a share in [0, 1)")
        if (len(self.split_fractions) != 3 or not _finite(self.split_fractions)
                or min(self.split_fractions) <= 0
                or abs(sum(self.split_fractions) - 1) > 1e-6):
            raise bad("split_fractions", "expected three positive shares (train, eval, test) "
                                         "summing to 1")
        return self

    @property
    def operand_range(self) -> OperandRange:
        return OperandRange(self.min_digits, self.max_digits, self.max_multiplier)

    def size(self, split: str) -> int:
        return {"train": self.num_train, "eval": self.num_eval, "test": self.num_test}[split]


# --- splits -------------------------------------------------------------------------------------

def _unit_hash(key: str) -> float:
    digest = hashlib.sha256(f"cloud_jax.reasoning:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _split_of_key(key: str, fractions: Sequence[float]) -> str:
    u, edge = _unit_hash(key), 0.0
    for split, share in zip(SPLITS, fractions):
        edge += share
        if u < edge:
            return split
    return SPLITS[-1]


def split_of(p: Problem, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> Optional[str]:
    """The split a problem belongs to, or None when its computations hash to different splits (a
    comparison whose two sums do; the generator skips those)."""
    found = {_split_of_key(key, fractions) for key in computation_keys(p)}
    return found.pop() if len(found) == 1 else None


# --- the size of the problem space ----------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _problems_per_split(op: str, rng: OperandRange, fractions: Tuple[float, ...]
                        ) -> Dict[str, int]:
    """split -> the number of distinct ``op`` problems (add/sub/mul) in it, counted one by one."""
    counts = dict.fromkeys(SPLITS, 0)
    lo, hi = rng.lo, rng.hi
    if op == "add":  # a + b and b + a: one computation (one hash), two problems
        for a in range(lo, hi + 1):
            for b in range(a, hi + 1):
                counts[_split_of_key(f"add:{a},{b}", fractions)] += 1 if a == b else 2
    elif op == "sub":  # a - b with a >= b
        for b in range(lo, hi + 1):
            for a in range(b, hi + 1):
                counts[_split_of_key(f"sub:{a},{b}", fractions)] += 1
    else:  # mul: a * b, b a single digit 2..max_multiplier (a * b and b * a: one key)
        for a in range(lo, hi + 1):
            for b in range(2, rng.max_multiplier + 1):
                counts[_split_of_key(mul_key(a, b), fractions)] += 1
    return counts


def _problem_bound(op: str, cfg: ReasoningBenchmarkConfig, split: str, base: int) -> int:
    """At most how many distinct ``op`` problems rows of ``split`` can ask, given ``base``: the
    number of distinct problems of ``BASE_OP[op]`` there (or, unsplit, in the whole space)."""
    if op in NUMERIC_OPS:
        return base
    if op == "claim":
        # a + b = c with c the sum or one of its wrong answers, which keep the sum's length L:
        # at most 2L digit, L-1 carry and L-1 swap errors, or any other L-digit number (random).
        length = cfg.max_digits + 1
        random_too = split == "train" and cfg.train_random_share > 0
        return base * (10 ** length if random_too else 4 * length + 1)
    return base * base  # compare: two sums of the split


def max_distinct_problems(cfg: ReasoningBenchmarkConfig, split: str) -> int:
    """An upper bound on the rows ``split`` can have (each row asks a distinct problem): exact
    for add, sub and mul (the problems whose computation hashes to ``split``), and for claim and
    compare the sums of the split times the values a claim can name, or squared. Ops of weight 0
    are never drawn and add nothing. Counting hashes every computation of the space (a second
    for each 400,000, as many as 3-digit add has)."""
    cfg.validate()
    weights = cfg.op_weights or (1.0,) * len(cfg.ops)
    rng, fractions = cfg.operand_range, tuple(cfg.split_fractions)
    return sum(_problem_bound(op, cfg, split,
                              _problems_per_split(BASE_OP[op], rng, fractions)[split])
               for op, w in zip(cfg.ops, weights) if w > 0)


def _unsplit_problems(cfg: ReasoningBenchmarkConfig, op: str) -> int:
    """The distinct problems of ``op`` (add/sub/mul) in the whole space: no hashing."""
    n = cfg.operand_range.hi - cfg.operand_range.lo + 1
    return {"add": n * n, "sub": n * (n + 1) // 2, "mul": n * (cfg.max_multiplier - 1)}[op]


def _space_words(cfg: ReasoningBenchmarkConfig) -> str:
    digits = (f"{cfg.min_digits}-digit" if cfg.min_digits == cfg.max_digits
              else f"{cfg.min_digits}-{cfg.max_digits} digit")
    return f"{digits} operands, ops {','.join(cfg.ops)}"


def _remedies(cfg: ReasoningBenchmarkConfig, split: str, largest: str) -> str:
    """What to change, as config keys and make-benchmark flags (``largest``: the rows there are,
    in words)."""
    key = {"train": "num_train", "eval": "num_eval", "test": "num_test"}[split]
    out = [f"ask for fewer rows ({largest}: {key}, make-benchmark --{split})"]
    if cfg.max_digits < 3:
        out.append("allow more digits (max_digits, --max-digits or --digits)")
    if len(cfg.ops) < len(OPS):
        out.append("add operations (ops, --ops)")
    if "mul" in cfg.ops and cfg.max_multiplier < 9:
        out.append("raise max_multiplier (--max-multiplier)")
    return ", ".join(out[:-1]) + " or " + out[-1] if len(out) > 1 else out[0]


def _check_space(cfg: ReasoningBenchmarkConfig, split: str, n: int) -> None:
    """Refuses at once ``n`` rows more than ``split`` can hold (``max_distinct_problems``). The
    count hashes every computation of the space, so in a space of over 50,000 (a quarter of a
    second or more) it is skipped where the split's expected share of it, which needs no count,
    is 4 times ``n`` or more."""
    weights = cfg.op_weights or (1.0,) * len(cfg.ops)
    drawn = {BASE_OP[op] for op, w in zip(cfg.ops, weights) if w > 0}
    share = cfg.split_fractions[SPLITS.index(split)]
    expected = share * sum(_problem_bound(op, cfg, split, _unsplit_problems(cfg, BASE_OP[op]))
                           for op, w in zip(cfg.ops, weights) if w > 0)
    if sum(_unsplit_problems(cfg, op) for op in drawn) > 50_000 and 4 * n <= expected:
        return
    largest = max_distinct_problems(cfg, split)
    if n > largest:
        raise ConfigError(
            f"reasoning benchmark: {n} {split} rows asked for, but the {split} share of the "
            f"problem space ({_space_words(cfg)}) holds at most {largest} distinct problems, "
            f"one a row: {_remedies(cfg, split, f'at most {largest - largest % 2}')}")


# --- generation ---------------------------------------------------------------------------------

_Row = Tuple[Problem, object, object, str]  # problem, chosen answer, rejected answer, error kind

# Draws in a row that add no row (a problem of another split, or one already drawn) after which
# generate_split stops drawing: a split whose share of the space is nearly used up. With add, sub
# and mul alone it then pairs the problems left directly (``_completion``); otherwise, or when
# none pair, it gives up. A split whose rows are merely rare draws one every few hundred.
MAX_IDLE_DRAWS = 20_000
# The most problems left unasked that ``_completion`` pairs (each problem's partners are looked up
# among them); beyond, the search gives up as with claim and compare.
MAX_COMPLETION_PROBLEMS = 5_000


class _OtherNumbers:
    """``wrong_answers(RANDOM, p)`` without the list: every number of ``t``'s length but ``t`` (as
    (column -1, number) pairs, in the same order), which is all ``rand.choice`` reads."""

    def __init__(self, t: int):
        length = len(str(t))
        self.lo, self.t = (0 if length == 1 else 10 ** (length - 1)), t
        self.size = 10 ** length - self.lo - 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Tuple[int, int]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        w = self.lo + i
        return -1, (w if w < self.t else w + 1)


class _Tables:
    """What ``_pair`` and ``_fresh`` compute from the problems alone, kept for one operand range,
    split fractions and split: a search near a full space makes millions of draws. The random
    calls, which fix the rows a seed gives, are the same with or without them."""

    _LIMIT = 1 << 17  # entries a dict keeps before it starts over (3-digit spaces are large)

    def __init__(self, rng: OperandRange, fractions: Tuple[float, ...], split: str):
        self.rng, self.fractions, self.split = rng, fractions, split
        self._in_split: Dict[Problem, bool] = {}
        self._wrong: Dict[Tuple[str, Problem], Tuple[Tuple[int, int], ...]] = {}
        self._side: Dict[tuple, tuple] = {}

    @staticmethod
    def _put(table: dict, key, value):
        if len(table) >= _Tables._LIMIT:
            table.clear()
        table[key] = value
        return value

    def in_split(self, p: Problem) -> bool:
        got = self._in_split.get(p)
        if got is None:
            got = self._put(self._in_split, p, split_of(p, self.fractions) == self.split)
        return got

    def wrong(self, kind: str, p: Problem) -> Tuple[Tuple[int, int], ...]:
        got = self._wrong.get((kind, p))
        if got is None:
            got = self._put(self._wrong, (kind, p), tuple(wrong_answers(kind, p)))
        return got

    def with_answer(self, op: str, value: int) -> Tuple[Problem, ...]:
        """The ``op`` problems of the split whose answer is ``value``, in
        ``problems_with_answer``'s order."""
        got = self._side.get((op, value))
        if got is None:
            got = self._put(self._side, (op, value), tuple(
                q for q in problems_with_answer(op, value, self.rng) if self.in_split(q)))
        return got

    def carry_side(self, op: str, col: int, wrong: int, truth: int
                   ) -> Tuple[Tuple[Problem, ...], List[float]]:
        """Those of ``with_answer(op, wrong)`` for which ``truth`` is a carry error in column
        ``col`` (the carry into it the other way round), and the weights to draw one with: like
        the forward draw, which picks one of p's candidates uniformly (for the other kinds their
        number depends on the answer alone, so the weights would be equal)."""
        key = (op, wrong, col, truth)
        got = self._side.get(key)
        if got is None:
            side = tuple(q for q in self.with_answer(op, wrong)
                         if (col, truth) in self.wrong("carry", q))
            got = self._put(self._side, key,
                            (side, [1.0 / len(self.wrong("carry", q)) for q in side]))
        return got


@functools.lru_cache(maxsize=8)
def _tables(rng: OperandRange, fractions: Tuple[float, ...], split: str) -> _Tables:
    return _Tables(rng, fractions, split)


def _pair(rand: random.Random, cfg: ReasoningBenchmarkConfig, op: str, split: str):
    """Two problems of ``op`` (add/sub/mul) in ``split`` whose answers are each other's wrong
    answer of one kind: (p, q, kind) with ``true_answer(q)`` a wrong answer of that kind for p and
    ``true_answer(p)`` one for q. None to draw again."""
    tables = _tables(cfg.operand_range, tuple(cfg.split_fractions), split)
    p = sample_problem(op, rand, tables.rng)
    if not tables.in_split(p):
        return None
    kinds = [(k, w) for k, w in zip(cfg.error_kinds, cfg.error_weights) if k in KINDS_OF_OP[op]]
    kind = rand.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
    if cfg.train_random_share and split == "train" and rand.random() < cfg.train_random_share:
        kind = RANDOM
    truth = true_answer(p)
    candidates = _OtherNumbers(truth) if kind == RANDOM else tables.wrong(kind, p)
    if not candidates:
        return None
    col, wrong = rand.choice(candidates)
    # (digit, swap and random relate two answers whatever the problems: every problem qualifies.)
    other_side, weights = (tables.carry_side(op, col, wrong, truth) if kind == "carry"
                           else (tables.with_answer(op, wrong), None))
    if not other_side:
        return None
    return p, rand.choices(other_side, weights)[0], kind


def _fresh(rand: random.Random, cfg: ReasoningBenchmarkConfig, value: int, split: str) -> Problem:
    tables = _tables(cfg.operand_range, tuple(cfg.split_fractions), split)
    return rand.choice(tables.with_answer("add", value))


def _unit(rand: random.Random, cfg: ReasoningBenchmarkConfig, op: str, split: str
          ) -> Optional[List[_Row]]:
    """Two rows in which the same two responses swap roles: what is chosen in one is rejected in
    the other. So every response is chosen exactly as often as it is rejected, and no function of
    the response alone can beat chance. None to draw again."""
    pair = _pair(rand, cfg, BASE_OP[op], split)
    if pair is None:
        return None
    p, q, kind = pair
    t, w = true_answer(p), true_answer(q)
    if op in ("add", "sub", "mul"):
        unit: List[_Row] = [(p, t, w, kind), (q, w, t, kind)]
    elif op == "claim":
        # The same claimed value, right for one sum and wrong for the other.
        c = t if rand.random() < 0.5 else w
        unit = [(Problem("claim", p.operands + (c,)), c == t, c != t, kind),
                (Problem("claim", q.operands + (c,)), c == w, c != w, kind)]
    else:
        # compare: the two sums in both orders, each time from fresh problems (p and q are tied to
        # the error's direction through their carries).
        first = Problem("compare", _fresh(rand, cfg, t, split).operands
                        + _fresh(rand, cfg, w, split).operands)
        second = Problem("compare", _fresh(rand, cfg, w, split).operands
                         + _fresh(rand, cfg, t, split).operands)
        unit = [(x, true_answer(x), 1 - true_answer(x), kind) for x in (first, second)]
    if rand.random() < 0.5:
        unit.reverse()
    return unit


def _all_problems(op: str, rng: OperandRange):
    """Every add/sub/mul problem within ``rng``, in a fixed order."""
    lo, hi = rng.lo, rng.hi
    if op == "add":
        return (Problem("add", (a, b)) for a in range(lo, hi + 1) for b in range(lo, hi + 1))
    if op == "sub":
        return (Problem("sub", (a, b)) for a in range(lo, hi + 1) for b in range(lo, a + 1))
    return (Problem("mul", (a, b)) for a in range(lo, hi + 1)
            for b in range(2, rng.max_multiplier + 1))


def _completion(rand: random.Random, cfg: ReasoningBenchmarkConfig, split: str, seen
                ) -> Optional[Iterator[Tuple[str, List[_Row]]]]:
    """(op, unit), one after the other, for the units that the problems no row asks yet (those
    not in ``seen``) can still form, once the draws have stalled: near a full space a new unit
    needs two of the few problems left, which random draws find ever more rarely. Each step
    picks an op and an error kind by their weights (as ``_pair`` does, the random kind with
    ``train_random_share``), then a problem left with a partner of that kind and one of its
    partners, uniformly; an (op, kind) none of whose problems has a partner is dropped. Ends when
    none is left. Only when every op drawn is add, sub or mul, and at most
    ``MAX_COMPLETION_PROBLEMS`` problems are left; otherwise None."""
    weights = cfg.op_weights or (1.0,) * len(cfg.ops)
    ops = [(op, w) for op, w in zip(cfg.ops, weights) if w > 0]
    if any(op not in NUMERIC_OPS for op, _ in ops):
        return None
    tables = _tables(cfg.operand_range, tuple(cfg.split_fractions), split)
    # op -> the problems left, as an insertion-ordered set (a dict), so that picks are
    # deterministic.
    left = {op: dict.fromkeys(p for p in _all_problems(op, tables.rng)
                              if p not in seen and tables.in_split(p)) for op, _ in ops}
    if sum(map(len, left.values())) > MAX_COMPLETION_PROBLEMS:
        return None
    share = cfg.train_random_share if split == "train" else 0.0
    choices: Dict[Tuple[str, str], float] = {}
    for op, w in ops:
        kinds = [(k, kw) for k, kw in zip(cfg.error_kinds, cfg.error_weights)
                 if k in KINDS_OF_OP[op] and kw > 0]
        total = sum(kw for _, kw in kinds)
        for k, kw in kinds:
            choices[(op, k)] = w * (1 - share) * kw / total
        if share:
            choices[(op, RANDOM)] = w * share

    def partners(op: str, kind: str, p: Problem) -> List[Problem]:
        t = true_answer(p)
        if kind == RANDOM:
            return [q for q in left[op] if q != p and true_answer(q) != t
                    and len(str(true_answer(q))) == len(str(t))]
        found: Dict[Problem, None] = {}
        for col, w in tables.wrong(kind, p):
            side = (tables.carry_side(op, col, w, t)[0] if kind == "carry"
                    else tables.with_answer(op, w))
            found.update((q, None) for q in side if q in left[op])
        return list(found)

    def units() -> Iterator[Tuple[str, List[_Row]]]:
        while choices:
            keys = list(choices)
            op, kind = rand.choices(keys, [choices[k] for k in keys])[0]
            order = list(left[op])
            rand.shuffle(order)
            for p in order:
                found = partners(op, kind, p)
                if found:
                    q = rand.choice(found)
                    break
            else:
                del choices[(op, kind)]
                continue
            t, w = true_answer(p), true_answer(q)
            unit: List[_Row] = [(p, t, w, kind), (q, w, t, kind)]
            if rand.random() < 0.5:
                unit.reverse()
            del left[op][p], left[op][q]
            yield op, unit

    return units()


def generate_split(cfg: ReasoningBenchmarkConfig, split: str, n: Optional[int] = None, *,
                   progress: bool = False) -> List[dict]:
    """``n`` rows (default: the config's size of ``split``) with distinct prompts, all of whose
    computations belong to ``split``. Rows come in consecutive twos whose responses swap roles
    (see ``_unit``); an odd ``n`` keeps the first row of the last two. ``progress``: the rows
    found so far on stderr (:mod:`cloud_jax.progress`): many rows take minutes, more as the
    problem space of the chosen digits fills up. More rows than the split's distinct problems
    (``max_distinct_problems``) are refused before any draw. After ``MAX_IDLE_DRAWS`` draws in a
    row without a new row, the problems left are paired directly (``_completion``: add, sub and
    mul); a search that still lacks rows then, or that took 100 draws a row asked for in all,
    stops with an error naming the rows found."""

    from cloud_jax import progress as progress_

    cfg.validate()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    n = cfg.size(split) if n is None else n
    rand = random.Random(f"cloud_jax.reasoning:{cfg.seed}:{split}")
    weights = list(cfg.op_weights) or [1.0] * len(cfg.ops)
    _check_space(cfg, split, n)
    seen, rows = set(), []
    max_draws = 100 * n + 20_000
    draws = idle = 0
    with progress_.bar(n, "rows", desc=f"make-benchmark {split}", disable=not progress) as bar:

        def add(op: str, unit: List[_Row]) -> None:
            added = unit[:n - len(rows)]
            for problem, chosen, rejected, kind in added:
                seen.add(problem)
                # Wordings come from their own stream, so both styles draw the same problems.
                wording = random.Random(f"cloud_jax.reasoning:{cfg.seed}:{split}:{len(rows)}")
                prompt_variant = wording.randrange(num_variants(cfg.style, op, "prompt"))
                response_variant = wording.randrange(num_variants(cfg.style, op, "response"))
                rows.append({
                    "id": f"reasoning-s{cfg.seed}-{split}-{len(rows):05d}",
                    "prompt": prompt_text(problem, cfg.style, prompt_variant),
                    "chosen": response_text(problem, chosen, cfg.style, response_variant),
                    "rejected": response_text(problem, rejected, cfg.style, response_variant),
                    "chosen_feedback": critique_text(problem, chosen, cfg.style),
                    "rejected_feedback": critique_text(problem, rejected, cfg.style),
                    "subset": f"{op}-{kind}",
                })
            bar.update(len(added))

        def used_up(how: str, largest: str) -> ConfigError:
            return ConfigError(
                f"reasoning benchmark: found only {len(rows)} of the {n} distinct {split} rows "
                f"asked for ({how}); the {split} share of the problem space "
                f"({_space_words(cfg)}) is used up: {_remedies(cfg, split, largest)}")

        while len(rows) < n:
            draws += 1
            idle += 1
            if idle > MAX_IDLE_DRAWS:
                # Near a full space: pair the problems left directly. The draws so far, and so
                # every request they filled, are the same as without this step; what follows
                # depends on them alone, not on n, so a smaller split is still a prefix.
                how = f"{MAX_IDLE_DRAWS} draws in a row found no new one"
                completed = _completion(rand, cfg, split, seen)
                if completed is not None:
                    how += ", and no two of the problems left pair up"
                    for op, unit in completed:
                        add(op, unit)
                        if len(rows) >= n:
                            return rows
                # the same seed draws the same rows: this many fit
                raise used_up(how, f"at most {len(rows)}")
            if draws > max_draws:
                raise used_up(f"in {max_draws} draws", f"fewer than {len(rows)}")
            op = rand.choices(cfg.ops, weights)[0]
            unit = _unit(rand, cfg, op, split)
            # A whole unit or nothing, so that the roles stay balanced.
            if unit is None or any(problem in seen for problem, *_ in unit):
                continue
            idle = 0
            add(op, unit)
    return rows


def generate_rows(cfg: ReasoningBenchmarkConfig, *, progress: bool = False
                  ) -> Dict[str, List[dict]]:
    """Every split with a positive size -> its rows (``progress``: as ``generate_split``)."""
    return {split: generate_split(cfg, split, progress=progress) for split in SPLITS
            if cfg.size(split) > 0}


# --- statistics and shortcut predictors -----------------------------------------------------------

def length_stats(rows: Sequence[Mapping[str, str]]) -> Dict[str, Dict[str, float]]:
    """UTF-8 byte lengths (mean, min, max) of each text field."""
    out = {}
    for field in ("prompt", "chosen", "rejected", "chosen_feedback", "rejected_feedback"):
        lengths = [len(r[field].encode("utf-8")) for r in rows]
        out[field] = {"mean": round(statistics.fmean(lengths), 1), "min": min(lengths),
                      "max": max(lengths)}
    return out


def _pairwise(rows: Sequence[Mapping[str, str]], score: Callable[[str, str], float]) -> float:
    """Accuracy of preferring the higher ``score(prompt, response)``, a tie counting one half."""
    total = 0.0
    for r in rows:
        c, j = score(r["prompt"], r["chosen"]), score(r["prompt"], r["rejected"])
        total += 1.0 if c > j else 0.5 if c == j else 0.0
    return total / len(rows)


def _last_int(text: str) -> int:
    found = re.findall(r"\d+", text)
    return int(found[-1]) if found else -1


def shortcut_accuracies(rows: Sequence[Mapping[str, str]]) -> Dict[str, float]:
    """Pairwise accuracy of predictors that do no arithmetic (all should be near 0.5): longer
    response, larger number, more of each digit (the one furthest from 0.5 is reported), even last
    digit, larger digit sum, lexicographically later, more digits shared with the prompt."""
    out = {
        "longer response": _pairwise(rows, lambda p, r: len(r)),
        "larger number": _pairwise(rows, lambda p, r: _last_int(r)),
        "even last digit": _pairwise(
            rows, lambda p, r: float(_last_int(r) >= 0 and _last_int(r) % 2 == 0)),
        "larger digit sum": _pairwise(rows, lambda p, r: sum(int(c) for c in r if c.isdigit())),
        "lexicographically later": _pairwise(rows, lambda p, r: r),  # type: ignore[arg-type]
        "digits shared with prompt": _pairwise(
            rows, lambda p, r: sum(c in p for c in r if c.isdigit())),
    }
    per_digit = {d: _pairwise(rows, lambda p, r, d=d: r.count(d)) for d in "0123456789"}
    worst = max(per_digit, key=lambda d: abs(per_digit[d] - 0.5))
    out[f"more of digit {worst} (worst of 0-9)"] = per_digit[worst]
    return out


def response_prior_accuracy(fit_rows: Sequence[Mapping[str, str]],
                            test_rows: Sequence[Mapping[str, str]]) -> float:
    """Accuracy on ``test_rows`` of the best response-only lookup fitted on ``fit_rows``: score a
    response by how much more often it was chosen than rejected there."""
    counts: Dict[str, int] = collections.Counter()
    for r in fit_rows:
        counts[r["chosen"]] += 1
        counts[r["rejected"]] -= 1
    return _pairwise(test_rows, lambda p, r: counts[r])


def partial_check_accuracies(rows: Sequence[Mapping[str, str]]) -> Dict[str, float]:
    """What a reward model that does only part of the arithmetic scores on the add/sub rows:
    "ones digit" checks the ones digit only; "columns without carries" checks every digit up to
    the carry/borrow (each column's digit may be off by the one carry it does not work out)."""
    rows = [r for r in rows if parse_prompt(r["prompt"]).op in ("add", "sub")]
    if not rows:
        return {}

    def ones(prompt: str, response: str) -> float:
        return float(_last_int(response) % 10 == true_answer(parse_prompt(prompt)) % 10)

    def no_carry(prompt: str, response: str) -> float:
        p = parse_prompt(prompt)
        got = [int(c) for c in reversed(str(_last_int(response)))]
        for col, s in enumerate(columns(p.op, *p.operands)):
            base = (s.x + s.y) % 10 if p.op == "add" else (s.x - s.y) % 10
            allowed = {base, (base + 1) % 10} if p.op == "add" else {base, (base - 1) % 10}
            if col < len(got) and got[col] not in allowed:
                return 0.0
        return 1.0

    return {"ones digit": _pairwise(rows, ones),
            "columns without carries": _pairwise(rows, no_carry)}


# --- files and the command line -------------------------------------------------------------------

def write_splits(out_dir: str, cfg: ReasoningBenchmarkConfig, *, progress: bool = False
                 ) -> Dict[str, str]:
    """Writes ``<split>.jsonl`` for every split with a positive size and ``benchmark.json`` (config,
    row counts, byte lengths, shortcut accuracies) into ``out_dir`` (a local path or a URL);
    returns split -> path. The files an earlier call left there are deleted before any is
    written, and benchmark.json is written last: a call stopped midway (Ctrl-C, a kill) leaves
    no earlier rows beside its own (drawn under another config, other split fractions can put
    their problems in this call's train split) and no benchmark.json, which marks a finished
    write; the same call again writes everything."""
    cfg.validate()
    rows = generate_rows(cfg, progress=progress)
    storage.makedirs(out_dir)
    for name in ("benchmark.json", *(f"{split}.jsonl" for split in SPLITS)):
        storage.remove(storage.join(out_dir, name))
    paths, summary = {}, {"config": dataclasses.asdict(cfg), "splits": {}}
    for split, split_rows in rows.items():
        path = storage.join(out_dir, f"{split}.jsonl")
        write_jsonl_atomic(path, split_rows)
        paths[split] = path
        summary["splits"][split] = {"path": path, "rows": len(split_rows),
                                    "bytes": length_stats(split_rows)}
    # Measured where models are scored: the held-out split (plausible wrong answers only).
    held_out = rows.get("test") or rows.get("eval")
    measured = held_out or rows["train"]
    summary["measured_on"] = "test" if rows.get("test") else "eval" if held_out else "train"
    summary["shortcut_accuracy"] = shortcut_accuracies(measured)
    summary["partial_check_accuracy"] = partial_check_accuracies(measured)
    if "train" in rows and held_out:
        summary["response_prior_accuracy"] = response_prior_accuracy(rows["train"], held_out)
    storage.write_text_atomic(storage.join(out_dir, "benchmark.json"),
                              json.dumps(summary, indent=2, ensure_ascii=False))
    return paths
