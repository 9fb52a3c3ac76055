"""A small learnable preference set for tiny CPU runs and tests.

    python -m cloud_jax.data.synthetic.toy runs/toy_data      # writes train.jsonl and eval.jsonl

Each row asks a made-up question; the chosen response ends with one of a few approving words and
the rejected one with a disapproving word, after the same random filler, and the critiques say so.
A tiny byte-level model learns to rank them (held-out accuracy near 1) in a few dozen steps,
which is what the tiny configs and the "every stage learns" tests need: a signal, not realism.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Optional, Sequence

from cloud_jax.data.jsonl import write_jsonl_atomic

GOOD = ("correct", "right", "exact", "true", "solid")
BAD = ("wrong", "false", "bogus", "broken", "absurd")
FILLER = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota")


def toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = " ".join(rng.sample(FILLER, 2))
        filler = rng.choice(FILLER)
        good, bad = rng.choice(GOOD), rng.choice(BAD)
        rows.append({
            "id": f"toy-{seed}-{i}",
            "prompt": f"Q: {topic}?",
            "chosen": f"A {filler}: {good}.",
            "rejected": f"A {filler}: {bad}.",
            "chosen_feedback": f"It is {good}.",
            "rejected_feedback": f"It is {bad}.",
        })
    return rows


def write_toy_data(directory: str, n_train: int = 256, n_eval: int = 64,
                   seed: int = 0) -> tuple[str, str]:
    """Writes ``train.jsonl`` and ``eval.jsonl`` (different seeds) and returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, n, s in (("train", n_train, seed), ("eval", n_eval, seed + 1)):
        path = os.path.join(directory, f"{name}.jsonl")
        write_jsonl_atomic(path, toy_rows(n, s))
        paths.append(path)
    return paths[0], paths[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m cloud_jax.data.synthetic.toy OUTPUT_DIR", file=sys.stderr)
        return 2
    train, eval_ = write_toy_data(argv[0])
    print(f"wrote {train} and {eval_}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
