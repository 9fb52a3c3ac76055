"""What explains the gap between CLoud and classic: how the model's critiques compare with the
oracle's (the verdict they end in, whether a pair is judged right, word-for-word matches).

Critiques come as ``[N][K]`` lists: K critiques for each of N responses. A verdict is what
:func:`cloud_jax.data.synthetic.reasoning.verdict_of` reads from a critique's end: True
(correct), False (incorrect) or None (none recognisable, e.g. a critique cut off).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from cloud_jax.data.jsonl import read_jsonl
from cloud_jax.data.schema import PreferenceRow
from cloud_jax.data.synthetic.reasoning import verdict_of


def oracle_critique(row: PreferenceRow, side: str) -> str:
    """The row's oracle critique of its ``chosen`` or ``rejected`` response ("" when absent)."""
    return getattr(row, f"{side}_feedback") or ""


def verdict_agreement(critiques_nk: Sequence[Sequence[str]],
                      oracle: Sequence[Optional[bool]]) -> Dict[str, Any]:
    """How often the model's critiques end in the verdict the oracle critique ends in."""
    agree = total = missing = 0
    for crits, want in zip(critiques_nk, oracle):
        if want is None:
            continue
        for c in crits:
            total += 1
            got = verdict_of(c)
            missing += got is None
            agree += got == want
    if not total:
        return {"agreement": None, "no_verdict": None, "critiques": 0,
                "note": "the oracle critiques end in no recognisable verdict"}
    return {"agreement": agree / total, "no_verdict": missing / total, "critiques": total}


def pairs_judged_right(chosen_nk, rejected_nk) -> Optional[float]:
    """The fraction of (chosen, rejected) critique pairs that call the chosen response correct
    and the rejected one incorrect."""
    right = [verdict_of(c) is True and verdict_of(r) is False
             for cs, rs in zip(chosen_nk, rejected_nk) for c, r in zip(cs, rs)]
    return sum(right) / len(right) if right else None


def exact_match(critiques_nk, oracle_texts: Sequence[str]) -> float:
    hits = [c.strip() == o.strip() for cs, o in zip(critiques_nk, oracle_texts) for c in cs]
    return sum(hits) / max(1, len(hits))


def critique_quality(chosen_nk: List[List[str]], rejected_nk: List[List[str]],
                     rows: Sequence[PreferenceRow]) -> Dict[str, Any]:
    """The model's critiques of every row's two responses against the rows' oracle critiques."""
    oracle = ([oracle_critique(r, "chosen") for r in rows]
              + [oracle_critique(r, "rejected") for r in rows])
    return {**verdict_agreement(chosen_nk + rejected_nk, [verdict_of(t) for t in oracle]),
            "pairs_judged_right": pairs_judged_right(chosen_nk, rejected_nk),
            "exact_match_with_oracle": exact_match(chosen_nk + rejected_nk, oracle)}


def self_critique_quality(shards: str, rows: Sequence[PreferenceRow]) -> Dict[str, Any]:
    """The SFT model's greedy train critiques (stage 2's ``shards``, a glob) against the
    oracle's; a row the shards lack counts as a miss."""
    written = {obj["id"]: obj for _, obj in read_jsonl(shards)}
    chosen, rejected = [], []
    for row in rows:
        obj = written.get(row.id, {})
        chosen.append([obj.get("chosen_feedback") or ""])
        rejected.append([obj.get("rejected_feedback") or ""])
    return critique_quality(chosen, rejected, rows)
