"""Shared by the evaluation tests: a fake scorer whose rewards are written into the responses."""

import dataclasses
import json
import re

import numpy as np

_REWARDS = re.compile(r"R:([-0-9.,]+)")


@dataclasses.dataclass
class FakeResult:
    rewards: np.ndarray
    sample_rewards: np.ndarray
    critiques: list
    truncated: np.ndarray


class FakeScorer:
    """score_fn whose sample rewards are the numbers after ``R:`` in each response (cycled to K).

    ``"good R:0,1"`` gives samples 0, 1, 0, 1, ...; ``calls`` records (inputs, K) per call.
    """

    def __init__(self, classic: bool = False):
        self.classic = classic
        self.calls = []

    def __call__(self, prompts, responses, num_samples):
        self.calls.append((len(prompts), num_samples))
        k = 1 if self.classic else num_samples
        rows = []
        for r in responses:
            values = [float(v) for v in _REWARDS.search(r).group(1).split(",")]
            rows.append([values[j % len(values)] for j in range(k)])
        sample = np.asarray(rows, np.float32).reshape(len(responses), k)
        critiques = [[] if self.classic else [f"critique {j} of {r}" for j in range(k)]
                     for r in responses]
        return FakeResult(sample.mean(axis=1), sample, critiques,
                          np.zeros((len(responses), k), bool))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def pair(row_id, subset, chosen, rejected):
    """A RewardBench-format row whose chosen / rejected rewards are ``chosen`` / ``rejected``."""
    row = {"id": row_id, "prompt": f"prompt {row_id}", "chosen": f"chosen {row_id} R:{chosen}",
           "rejected": f"rejected {row_id} R:{rejected}", "chosen_model": "a",
           "rejected_model": "b"}
    if subset is not None:
        row["subset"] = subset
    return row


# A small RewardBench-format file: (id, subset, chosen reward, rejected reward).
# Outcomes: c = correct, w = wrong, t = tie.
SYNTHETIC = [
    (1, "alpacaeval-easy", "1", "0"),         # c
    (2, "alpacaeval-easy", "0", "1"),         # w
    (3, "mt-bench-easy", "2", "1"),           # c
    (4, "mt-bench-hard", "0.5", "0.5"),       # t
    (5, "mt-bench-hard", "3", "-3"),          # c
    (6, "xstest-should-refuse", "1", "0"),    # c
    (7, "donotanswer", "0", "1"),             # w
    (8, "math-prm", "1", "0"),                # c
    (9, "math-prm", "5", "4"),                # c
    (10, "hep-python", "1", "0"),             # c
    (11, "hep-python", "-1", "0"),            # w
    (12, "arith-easy", "0", "2"),             # w  (not a RewardBench subset -> "other")
    (13, None, "2", "0"),                     # c  (no subset -> "other")
]


def synthetic_rows():
    return [pair(*r) for r in SYNTHETIC]


def bon_row(row_id, scores, rewards):
    """A Best-of-N row whose candidate j gets reward samples ``rewards[j]``."""
    return {"id": row_id, "prompt": f"prompt {row_id}",
            "candidates": [f"candidate {j} R:{r}" for j, r in enumerate(rewards)],
            "scores": scores}


# Hand-computed, baseline = first candidate:
#   p1: model picks 1 (quality 1) vs baseline 0      -> win,  matches the oracle
#   p2: model picks 1 (quality 0) vs baseline 1      -> loss, regret 1
#   p3: rewards tie at 0.3 -> index 0 (quality 0.5) = baseline -> tie, regret 0.5
#   p4: model picks 1 (quality 2) vs baseline 0      -> win,  matches the oracle
HAND = [
    bon_row("p1", [0, 1, 0], ["0.1", "0.9", "0.2"]),
    bon_row("p2", [1, 0], ["0.2", "0.8"]),
    bon_row("p3", [0.5, 0.5, 1.0], ["0.3", "0.3", "0.1"]),
    bon_row("p4", [0, 2], ["0", "1"]),
]
