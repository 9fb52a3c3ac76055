"""Text of the reasoning benchmark: prompts, responses and oracle critiques in three styles, and
the oracle checker that reads them back.

``compact`` (byte-level models trained from scratch): every token a critique needs is either copied
from close by or computed from the previous step, in one fixed shape per operation::

    prompt    47+38=?
    response  85
    critique  47+38: 7+8=15, 4+3+1=8, so 85; says 85: Correct

The critique restates the problem (one contiguous copy from the prompt), works the columns ones
first from that restatement (the "+1" is the carry, part of the step that uses it), reads the answer
off the steps, copies the response's answer, and ends in the verdict phrase ": Correct" or
": Incorrect". Subtraction writes a borrow as the 1 in front of the digit that borrows and the
``-1`` in the next column (``85-38: 15-8=7, 8-1-3=4, so 47``); multiplication carries its tens
(``47*6: 7*6=42, 4*6+4=28, so 282``).

``columns`` (the same prompts and responses): the critique checks the response as it goes, each
step followed by the response's digit in that column (the last step by all its remaining digits)
and ``ok`` or ``no``, so the verdict only has to notice a ``no`` instead of comparing two numbers::

    critique  47+38: 7+8=15 5 ok, 4+3+1=8 7 no: Incorrect

A claim is checked the same way against the claimed sum (``...; claim no; says yes: Incorrect``);
a comparison has no digits to check against and is written as in ``compact``.

``natural`` (pretrained chat models): the same working in chat-like sentences, several prompt and
response wordings, and the verdict phrase "the response is correct." / "... incorrect.".
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple, Union

from cloud_jax.data.synthetic.arithmetic import Problem, Step, columns, true_answer

STYLES = ("compact", "columns", "natural")
Answer = Union[int, bool]

_OP_SYMBOL = {"compact": {"add": "+", "sub": "-", "mul": "*"},
              "columns": {"add": "+", "sub": "-", "mul": "*"},
              "natural": {"add": " + ", "sub": " - ", "mul": " × "}}
_COLUMN_NAMES = ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands")

_NATURAL_PROMPTS = {
    "numeric": ("What is {expr}?", "Can you work out {expr} for me?",
                "Quick question: what does {expr} come to?"),
    "claim": ("Is it true that {expr} = {c}?", "My friend says {expr} = {c}. Is that right?"),
    "compare": ("Which is larger, {first} or {second}?",
                "Of {first} and {second}, which one is bigger?"),
}
_NATURAL_RESPONSES = {
    "numeric": ("{expr} = {ans}.", "Sure! {expr} = {ans}.", "The answer is {ans}."),
    "claim": ("{yes_no}",),
    "compare": ("The {which} one is larger.",),
}


def _kind(op: str) -> str:
    return op if op in ("claim", "compare") else "numeric"


def num_variants(style: str, op: str, what: str) -> int:
    """How many wordings ``style`` has for the prompt or response (``what``) of ``op``."""
    if style != "natural":
        return 1
    table = _NATURAL_PROMPTS if what == "prompt" else _NATURAL_RESPONSES
    return len(table[_kind(op)])


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def _expr(style: str, op: str, a: int, b: int) -> str:
    return f"{a}{_OP_SYMBOL[style][op]}{b}"


def prompt_text(p: Problem, style: str, variant: int = 0) -> str:
    _check_style(style)
    o = p.operands
    if style != "natural":
        if p.op == "claim":
            return f"Is {o[0]}+{o[1]}={o[2]}?"
        if p.op == "compare":
            return f"Larger: {o[0]}+{o[1]} or {o[2]}+{o[3]}?"
        return f"{_expr(style, p.op, o[0], o[1])}=?"
    template = _NATURAL_PROMPTS[_kind(p.op)][variant]
    if p.op == "claim":
        return template.format(expr=_expr(style, "add", o[0], o[1]), c=o[2])
    if p.op == "compare":
        return template.format(first=_expr(style, "add", o[0], o[1]),
                               second=_expr(style, "add", o[2], o[3]))
    return template.format(expr=_expr(style, p.op, o[0], o[1]))


def _answer_words(op: str, answer: Answer, style: str) -> str:
    if op == "claim":
        return ("yes" if answer else "no") if style != "natural" else (
            "Yes, that is right." if answer else "No, that is not right.")
    if op == "compare":
        return ("first", "second")[answer]
    return str(answer)


def response_text(p: Problem, answer: Answer, style: str, variant: int = 0) -> str:
    """The assistant's reply giving ``answer`` (right or wrong) to ``p``."""
    _check_style(style)
    if style != "natural":
        return _answer_words(p.op, answer, style)
    template = _NATURAL_RESPONSES[_kind(p.op)][variant]
    o = p.operands
    if p.op == "claim":
        return template.format(yes_no=_answer_words(p.op, answer, style))
    if p.op == "compare":
        return template.format(which=_answer_words(p.op, answer, style))
    return template.format(expr=_expr(style, p.op, o[0], o[1]), ans=answer)


# --- critiques ------------------------------------------------------------------------------------

def _compact_step(op: str, s: Step) -> str:
    if op == "add":
        return f"{s.x}+{s.y}{'+1' if s.carry_in else ''}={s.value}"
    if op == "sub":
        return f"{'1' if s.borrow_out else ''}{s.x}{'-1' if s.carry_in else ''}-{s.y}={s.value}"
    return f"{s.x}*{s.y}{f'+{s.carry_in}' if s.carry_in else ''}={s.value}"


def _natural_step(op: str, s: Step, col: int, last: bool) -> str:
    name = _COLUMN_NAMES[col] if col < len(_COLUMN_NAMES) else f"Column {col + 1}"
    if op == "add":
        calc = f"{s.x} + {s.y}{' + 1' if s.carry_in else ''} = {s.value}"
    elif op == "sub":
        top = f"{10 + s.x}" if s.borrow_out else f"{s.x}"
        calc = f"{top}{' - 1' if s.carry_in else ''} - {s.y} = {s.value}"
        if s.borrow_out:
            calc += " (borrowing 1)"
    else:
        calc = f"{s.x} × {s.y}{f' + {s.carry_in}' if s.carry_in else ''} = {s.value}"
    if last or op == "sub":
        return f"{name}: {calc}, write {s.value}."
    carry = s.value // 10
    return f"{name}: {calc}, write {s.value % 10}{f' and carry {carry}' if carry else ''}."


def _working(style: str, op: str, a: int, b: int) -> str:
    steps = columns(op, a, b)
    if style != "natural":
        return ", ".join(_compact_step(op, s) for s in steps)
    return " ".join(_natural_step(op, s, i, i == len(steps) - 1) for i, s in enumerate(steps))


def _checked_working(op: str, a: int, b: int, given: int) -> Tuple[str, bool]:
    """The ``columns`` working: each step followed by ``given``'s digit in that column (the last
    step by all its remaining digits; 0 where it has none) and ``ok`` or ``no``; and whether every
    column matched."""
    steps = columns(op, a, b)
    rev = str(given)[::-1]
    parts, all_ok = [], True
    for col, s in enumerate(steps):
        last = col == len(steps) - 1
        digit = (rev[col:][::-1] if last else rev[col:col + 1]) or "0"
        ok = int(digit) == (s.value if last else s.value % 10)
        all_ok &= ok
        parts.append(f"{_compact_step(op, s)} {digit} {'ok' if ok else 'no'}")
    return ", ".join(parts), all_ok


def critique_text(p: Problem, answer: Answer, style: str) -> str:
    """The oracle critique of a response that gives ``answer`` to ``p``: the working, the answer it
    leads to, what the response says, and the verdict."""
    _check_style(style)
    o = p.operands
    truth = true_answer(p)
    correct = answer == truth
    said = _answer_words(p.op, answer, "compact")
    if style == "columns" and p.op != "compare":
        if p.op == "claim":
            marks, same = _checked_working("add", o[0], o[1], o[2])
            body = f"{o[0]}+{o[1]}: {marks}; claim {'yes' if same else 'no'}; says {said}"
        else:
            marks, _ = _checked_working(p.op, o[0], o[1], answer)
            body = f"{_expr(style, p.op, o[0], o[1])}: {marks}"
        return f"{body}: {'Correct' if correct else 'Incorrect'}"
    if style != "natural":
        if p.op == "claim":
            body = (f"{o[0]}+{o[1]}: {_working(style, 'add', o[0], o[1])}, so {o[0] + o[1]}; "
                    f"claim {o[2]}: {'yes' if truth else 'no'}")
        elif p.op == "compare":
            s1, s2 = o[0] + o[1], o[2] + o[3]
            body = (f"{o[0]}+{o[1]}: {_working(style, 'add', o[0], o[1])}, so {s1}; "
                    f"{o[2]}+{o[3]}: {_working(style, 'add', o[2], o[3])}, so {s2}; "
                    f"{s1}{'<' if s1 < s2 else '>'}{s2}: {('first', 'second')[truth]}")
        else:
            body = (f"{_expr(style, p.op, o[0], o[1])}: {_working(style, p.op, o[0], o[1])}, "
                    f"so {truth}")
        return f"{body}; says {said}: {'Correct' if correct else 'Incorrect'}"

    if p.op == "claim":
        expr = _expr(style, "add", o[0], o[1])
        verdict_of_claim = ("as claimed, so the right answer is yes" if truth else
                            f"not {o[2]}, so the claim is false and the right answer is no")
        body = (f"Let me check {expr} column by column. {_working(style, 'add', o[0], o[1])} "
                f"So {expr} = {o[0] + o[1]}, {verdict_of_claim}. The response says {said}")
    elif p.op == "compare":
        first, second = _expr(style, "add", o[0], o[1]), _expr(style, "add", o[2], o[3])
        s1, s2 = o[0] + o[1], o[2] + o[3]
        body = (f"Let me work out both sums column by column. First, {first}. "
                f"{_working(style, 'add', o[0], o[1])} So {first} = {s1}. Second, {second}. "
                f"{_working(style, 'add', o[2], o[3])} So {second} = {s2}. "
                f"{s1} {'<' if s1 < s2 else '>'} {s2}, so the {('first', 'second')[truth]} one is "
                f"larger. The response says the {said} one")
    else:
        expr = _expr(style, p.op, o[0], o[1])
        body = (f"Let me check {expr} column by column. {_working(style, p.op, o[0], o[1])} "
                f"So {expr} = {truth}. The response says {said}")
    if correct:
        return f"{body}, which matches, so the response is correct."
    return f"{body}, which does not match, so the response is incorrect."


# --- the oracle checker ---------------------------------------------------------------------------

_EXPR = re.compile(r"(\d+)\s*([-+*×])\s*(\d+)(?:\s*=\s*(\d+))?")
_SYMBOL_OP = {"+": "add", "-": "sub", "*": "mul", "×": "mul"}
# The verdict word at the end ("correct", "incorrect", "right", "wrong", "... at all" after it)
# and the words right before it that change what it says: a negation ("not", "n't", "never",
# "cannot", "far from", ...), maybe with a linking verb ("does not seem", "can't be") and a degree
# ("not quite", "not at all"), or a limit ("almost", "partially").
_NEGATION = r"(?:\b(?:not|never|cannot|hardly|far\s+from|nowhere\s+near)|n['’]t)"
_LINK = r"(?:\s+(?:be|seems?|looks?|appears?|sounds?)(?:\s+to\s+be)?)?"
# "not quite correct": not wholly correct, so not correct; "not quite wrong" says neither.
_PARTIAL = (r"quite|entirely|fully|completely|totally|wholly|altogether|exactly|strictly|"
            r"necessarily|100\s*%|all\s+that")
_INTENSIFIER = r"really|at\s+all"
_LIMIT = r"almost|nearly|partially|partly|mostly|half"
_VERDICT = re.compile(
    rf"(?:(?P<neg>{_NEGATION}){_LINK}(?:\s+(?:(?P<partial>{_PARTIAL})|{_INTENSIFIER}))?\s+"
    rf"|\b(?P<limit>{_LIMIT})\s+)?"
    r"\b(?P<word>correct|incorrect|right|wrong)(?:\s+at\s+all)?\W*\Z", re.IGNORECASE)


def parse_prompt(prompt: str) -> Problem:
    """The problem a benchmark prompt (any style) asks; ValueError if it is not one."""
    found = _EXPR.findall(prompt)
    if len(found) == 2 and all(op == "+" and not c for _, op, _, c in found):
        (a, _, b, _), (c, _, d, _) = found
        return Problem("compare", (int(a), int(b), int(c), int(d)))
    if len(found) == 1:
        a, symbol, b, c = found[0]
        if c and symbol == "+":
            return Problem("claim", (int(a), int(b), int(c)))
        if not c:
            return Problem(_SYMBOL_OP[symbol], (int(a), int(b)))
    raise ValueError(f"not a reasoning-benchmark prompt (expected one arithmetic expression, a "
                     f"claimed sum or two sums to compare): {prompt[:120]!r}")


def parse_answer(p: Problem, response: str) -> Optional[Answer]:
    """The answer a response gives to ``p``, or None if it gives none: the last integer (add, sub,
    mul), a leading yes/no (claim), the one of "first"/"second" it names (compare)."""
    if p.op == "claim":
        m = re.match(r"\W*(yes|no)\b", response, re.IGNORECASE)
        return None if m is None else m.group(1).lower() == "yes"
    if p.op == "compare":
        named = {w.lower() for w in re.findall(r"\b(first|second)\b", response, re.IGNORECASE)}
        return ("first", "second").index(named.pop()) if len(named) == 1 else None
    numbers = re.findall(r"\d+", response)
    return int(numbers[-1]) if numbers else None


def verify(prompt: str, response: str) -> bool:
    """Whether ``response`` answers the benchmark ``prompt`` correctly (a response that gives no
    answer is not correct). ValueError if ``prompt`` is not a benchmark prompt."""
    p = parse_prompt(prompt)
    answer = parse_answer(p, response)
    return answer is not None and answer == true_answer(p)


def verdict_of(critique: str) -> Optional[bool]:
    """The verdict a critique ends in: True ("correct", "right"), False ("incorrect", "wrong"),
    or None when it does not end in one (a critique cut off by the token budget, say). Case and
    trailing punctuation are ignored, so it reads model-written critiques of any style. The
    words right before the verdict word count: a negation turns it over ("is not correct",
    "isn't right", "far from correct", "never correct", "cannot be correct", "does not seem
    correct", "not correct at all": False; "not wrong": True); a negated degree says the
    response is not wholly correct ("not quite correct", "not entirely right": False; "not
    entirely wrong" says neither: None); a limit says it falls short ("almost correct",
    "partially correct": False)."""
    m = _VERDICT.search(critique)
    if m is None:
        return None
    positive = m.group("word").lower() in ("correct", "right")
    if m.group("limit"):
        return False
    if m.group("partial"):
        return False if positive else None
    return positive != bool(m.group("neg"))


def steps_of(critique: str) -> List[str]:
    """The column steps of a compact critique (``7+8=15``, ``15-8=7``, ``4*6+4=28``), for checking
    them one by one."""
    return re.findall(r"(?<![\d:])\d+(?:[-+*]\d+)+=\d+", critique)
