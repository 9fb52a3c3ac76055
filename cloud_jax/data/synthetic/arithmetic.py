"""The arithmetic under the reasoning benchmark: problems, their column-by-column working, and the
plausible wrong answers of each kind.

Operations (operands are non-negative integers):

    add      a + b
    sub      a - b, a >= b
    mul      a * b, b a single digit
    claim    "is a + b = c?"                       answer: True (yes) / False (no)
    compare  "which is larger, a + b or c + d?"    answer: 0 (the first) / 1 (the second)

Wrong answers of ``add``, ``sub`` and ``mul`` keep the number of digits of the true answer (so a
response's length says nothing) and are one of these kinds:

    carry   the digit of one column (tens or higher) as if the carry (add) or borrow (sub) into that
            column had been the other way: forgotten where there is one, added where there is none
    digit   one digit off by one (mod 10)
    swap    two adjacent digits transposed
    random  any other number of that length (implausible; see ``train_random_share`` of the
            generator: it keeps a model from learning to copy the response into its working)

Each kind is a symmetric relation between a problem and a wrong answer: if ``w`` is a wrong answer
of kind K for a problem with true answer ``t``, there are problems with true answer ``w`` for which
``t`` is a wrong answer of kind K (for ``carry``: problems whose carry into that column is the
other way). The generator draws from both sides of the relation with equal probability, which makes
the true and the wrong answers identically distributed.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

NUMERIC_OPS = ("add", "sub", "mul")
OPS = NUMERIC_OPS + ("claim", "compare")
ERROR_KINDS = ("carry", "digit", "swap")
RANDOM = "random"
# mul has no carry kind: forgetting a multiplication carry shifts a digit by the carry, and the
# reverse error (inventing one) has no single natural size, so the relation would not be symmetric.
KINDS_OF_OP: Dict[str, Tuple[str, ...]] = {
    "add": ERROR_KINDS, "sub": ERROR_KINDS, "mul": ("digit", "swap"),
    "claim": ERROR_KINDS, "compare": ERROR_KINDS,
}
# The operation whose pairs (true, wrong) claim and compare are built from.
BASE_OP = {"add": "add", "sub": "sub", "mul": "mul", "claim": "add", "compare": "add"}


@dataclasses.dataclass(frozen=True)
class Problem:
    """``operands``: add/sub/mul (a, b); claim (a, b, claimed sum); compare (a, b, c, d)."""

    op: str
    operands: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Step:
    """One column of the working, ones first.

    add: ``x + y (+ carry_in) = value`` (value 0-19); sub: ``x (+10 if borrow_out) (- carry_in)
    - y = value`` (value 0-9, carry_in is the borrow); mul: ``x * y (+ carry_in) = value``.
    """

    x: int
    y: int
    carry_in: int
    value: int
    borrow_out: int = 0


@dataclasses.dataclass(frozen=True)
class OperandRange:
    """Operands of add/sub and the first factor of mul: ``min_digits``-``max_digits`` digits; the
    second factor of mul: 2..``max_multiplier``."""

    min_digits: int = 2
    max_digits: int = 2
    max_multiplier: int = 9

    @property
    def lo(self) -> int:
        return 1 if self.min_digits == 1 else 10 ** (self.min_digits - 1)

    @property
    def hi(self) -> int:
        return 10 ** self.max_digits - 1


def digits_of(n: int) -> List[int]:
    """Ones first."""
    return [int(c) for c in reversed(str(n))]


def columns(op: str, a: int, b: int) -> List[Step]:
    """The column working of ``a op b`` for op in add/sub/mul (a digit missing from the shorter
    operand is 0). The last step of add and mul carries what is left (value may have two digits)."""
    da = digits_of(a)
    if op == "mul":
        steps, carry = [], 0
        for x in da:
            value = x * b + carry
            steps.append(Step(x, b, carry, value))
            carry = value // 10
        return steps
    db = digits_of(b)
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    steps, carry = [], 0
    for x, y in zip(da, db):
        if op == "add":
            value = x + y + carry
            steps.append(Step(x, y, carry, value))
            carry = value // 10
        elif op == "sub":
            borrow = int(x - carry < y)
            steps.append(Step(x, y, carry, x + 10 * borrow - carry - y, borrow))
            carry = borrow
        else:
            raise ValueError(f"columns: unknown operation {op!r}")
    return steps


def true_answer(p: Problem):
    """int for add/sub/mul, bool for claim (is the claim right), 0/1 for compare (larger one)."""
    o = p.operands
    if p.op == "add":
        return o[0] + o[1]
    if p.op == "sub":
        return o[0] - o[1]
    if p.op == "mul":
        return o[0] * o[1]
    if p.op == "claim":
        return o[0] + o[1] == o[2]
    if p.op == "compare":
        return int(o[2] + o[3] > o[0] + o[1])
    raise ValueError(f"unknown operation {p.op!r}; expected one of {', '.join(OPS)}")


def carry_into(op: str, a: int, b: int, col: int) -> int:
    """The carry (add) or borrow (sub) that enters column ``col`` (0 for the ones column)."""
    m = 10 ** col
    if op == "add":
        return int(a % m + b % m >= m)
    if op == "sub":
        return int(a % m < b % m)
    raise ValueError(f"carry_into: {op!r} has no carry relation")


def _with_digit(n: int, col: int, digit: int) -> Optional[int]:
    s = list(str(n))
    s[len(s) - 1 - col] = str(digit)
    if len(s) > 1 and s[0] == "0":
        return None
    return int("".join(s))


def wrong_answers(kind: str, p: Problem) -> List[Tuple[int, int]]:
    """(column, wrong answer) pairs of ``kind`` for an add/sub/mul problem, each of the true
    answer's length; several may share a wrong answer through different columns (column -1: the
    random kind, which has none)."""
    t = true_answer(p)
    d = digits_of(t)
    out: List[Tuple[int, int]] = []
    if kind == "digit":
        for col in range(len(d)):
            for delta in (1, -1):
                w = _with_digit(t, col, (d[col] + delta) % 10)
                if w is not None:
                    out.append((col, w))
    elif kind == "carry":
        if p.op not in ("add", "sub"):
            return out
        a, b = p.operands
        for col in range(1, len(d)):
            c = carry_into(p.op, a, b, col)
            # add: a missing carry lowers the digit, an invented one raises it; sub: the opposite.
            delta = (1 - 2 * c) if p.op == "add" else (2 * c - 1)
            w = _with_digit(t, col, (d[col] + delta) % 10)
            if w is not None:
                out.append((col, w))
    elif kind == RANDOM:
        lo = 0 if len(d) == 1 else 10 ** (len(d) - 1)
        out = [(-1, w) for w in range(lo, 10 ** len(d)) if w != t]
    elif kind == "swap":
        for col in range(len(d) - 1):
            if d[col] != d[col + 1]:
                s = d.copy()
                s[col], s[col + 1] = s[col + 1], s[col]
                if len(s) == 1 or s[-1] != 0:
                    out.append((col, int("".join(map(str, reversed(s))))))
    else:
        raise ValueError(f"unknown error kind {kind!r}; expected one of "
                         f"{', '.join(ERROR_KINDS + (RANDOM,))}")
    return out


def problems_with_answer(op: str, value: int, rng: OperandRange) -> Iterator[Problem]:
    """Every add/sub/mul problem within ``rng`` whose true answer is ``value``."""
    lo, hi = rng.lo, rng.hi
    if op == "add":
        for a in range(max(lo, value - hi), min(hi, value - lo) + 1):
            yield Problem("add", (a, value - a))
    elif op == "sub":
        for b in range(lo, hi - value + 1):
            yield Problem("sub", (b + value, b))
    elif op == "mul":
        for b in range(2, rng.max_multiplier + 1):
            if value % b == 0 and lo <= value // b <= hi:
                yield Problem("mul", (value // b, b))
    else:
        raise ValueError(f"problems_with_answer: {op!r} is not one of {', '.join(NUMERIC_OPS)}")


def sample_problem(op: str, rand, rng: OperandRange) -> Problem:
    """A uniformly random add/sub/mul problem (``rand``: a ``random.Random``)."""
    a = rand.randint(rng.lo, rng.hi)
    if op == "mul":
        return Problem("mul", (a, rand.randint(2, rng.max_multiplier)))
    b = rand.randint(rng.lo, rng.hi)
    if op == "sub" and a < b:
        a, b = b, a
    if op not in ("add", "sub"):
        raise ValueError(f"sample_problem: {op!r} is not one of {', '.join(NUMERIC_OPS)}")
    return Problem(op, (a, b))


def mul_key(a: int, b: int) -> str:
    """The split key of the product a * b, which b * a shares."""
    return f"mul:{max(a, b)},{min(a, b)}"


def computation_keys(p: Problem) -> List[str]:
    """The computations a problem asks for, as keys that decide its split: a claim and a compare
    share their sums' keys with add, a + b is the same computation as b + a, and a * b the same
    as b * a (both are drawn where the first factor has one digit; the larger factor comes
    first, so a key with a single-digit second factor reads as the problem)."""
    o = p.operands
    if p.op in ("add", "claim"):
        return [f"add:{min(o[0], o[1])},{max(o[0], o[1])}"]
    if p.op == "compare":
        return [f"add:{min(o[0], o[1])},{max(o[0], o[1])}",
                f"add:{min(o[2], o[3])},{max(o[2], o[3])}"]
    if p.op == "mul":
        return [mul_key(o[0], o[1])]
    return [f"{p.op}:{o[0]},{o[1]}"]
