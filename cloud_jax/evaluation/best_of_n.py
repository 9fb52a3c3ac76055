"""Best-of-N: the reward model picks one of N candidates per prompt; how good are its picks?

Input: JSONL, one prompt per line:

    {"id": "q1", "prompt": "...", "candidates": ["...", "...", "..."], "scores": [0, 1, 0.5]}

``scores`` holds one number per candidate, higher is better: a 0/1 correctness label or a judge's
score (finite, at most 1e100 in magnitude). ``id`` is a string or an integer; ``subset`` is optional; other keys are ignored. N may
differ between prompts (at least 2 each).

Picks, per prompt:

- reward model: the candidate with the highest reward (a tie goes to the lowest index);
- baseline: ``first`` (candidate 0, e.g. the policy's first sample) or ``random`` (one
  ``numpy.random.default_rng(seed)`` draws an index per prompt, in file order);
- oracle: a candidate with the highest quality score.

Reported:

- against the baseline: wins / ties / losses of the model's pick's quality against the baseline's
  pick's, and the win rate ``(wins + ties / 2) / n`` with a percentile-bootstrap confidence
  interval over prompts (seeded, :func:`bootstrap_ci`);
- against the oracle: the model can at best match it, so the match rate (the model's pick has the
  best quality) with a Wilson score interval (:func:`wilson_ci`), and the mean regret
  ``quality(oracle) - quality(model)``;
- mean quality of the model's, the baseline's and the oracle's picks and of all candidates (the
  expected quality of a uniform random pick).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from cloud_jax import storage
from cloud_jax.data.schema import HUB_PREFIX, RowError, expand_paths, lone_surrogate
from cloud_jax.errors import ConfigError

BASELINES = ("first", "random")
# The largest quality score read, in magnitude: the report's means and regrets (sums and
# differences of scores) of larger ones could overflow to inf, which report.json cannot hold.
MAX_SCORE = 1e100
# How every message about a source or a line that is not Best-of-N JSONL ends: what to do.
_JSONL_HINT = "Best-of-N rows are JSONL, one whole JSON object per line (docs/EVALUATION.md)"
# Row files that --input reads and Best-of-N does not.
_NOT_JSONL = {".parquet": "a Parquet file", ".arrow": "an Arrow file"}


@dataclasses.dataclass(frozen=True)
class BestOfNItem:
    id: str
    prompt: str
    candidates: tuple[str, ...]
    scores: tuple[float, ...]  # quality per candidate, higher is better
    subset: Optional[str]
    source: str  # "file:line"


def _text(path: str, line: int, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else type(value).__name__
        raise RowError(path, line, None, field, f"expected a non-empty string, got {got}")
    bad = lone_surrogate(value)  # a JSON \ud800 escape: no tokenizer takes it
    if bad is not None:
        raise RowError(path, line, None, field, bad)
    return value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def _check_jsonl_source(path: str) -> None:
    """Refuses, before a line is read, a source that preference rows may come from but Best-of-N
    rows do not: a dataset (hub id or directory) or a Parquet / Arrow file."""
    if path.startswith(HUB_PREFIX):
        what = "a Hugging Face hub id"
    elif storage.isdir(path):
        what = "a directory"
    else:
        what = _NOT_JSONL.get(os.path.splitext(path)[1].lower())
    if what is not None:
        raise ConfigError(f"{path}: {what}, not a JSONL file; {_JSONL_HINT}: write the rows out "
                          "as JSONL (a datasets.Dataset: .to_json(path)) and pass that file")


def _item(path: str, line: int, obj: Any) -> BestOfNItem:
    if isinstance(obj, list):
        raise RowError(path, line, None, None, f"a JSON array, not an object; {_JSONL_HINT}")
    if not isinstance(obj, dict):
        raise RowError(path, line, None, None, f"expected a JSON object, got {type(obj).__name__}")
    for field in ("id", "prompt", "candidates", "scores"):
        if field not in obj:
            raise RowError(path, line, None, field, "missing (a Best-of-N row needs id, prompt, "
                                                    "candidates and scores)")
    row_id = obj["id"]
    row_id = str(row_id) if isinstance(row_id, int) and not isinstance(row_id, bool) else _text(
        path, line, "id", row_id)
    prompt = _text(path, line, "prompt", obj["prompt"])
    candidates, scores = obj["candidates"], obj["scores"]
    if not isinstance(candidates, list) or len(candidates) < 2:
        raise RowError(path, line, None, "candidates", "expected a list of at least 2 strings")
    for j, c in enumerate(candidates):
        _text(path, line, f"candidates[{j}]", c)
    if not isinstance(scores, list) or len(scores) != len(candidates):
        got = f"a list of {len(scores)}" if isinstance(scores, list) else type(scores).__name__
        raise RowError(path, line, None, "scores",
                       f"expected a list of {len(candidates)} numbers (one per candidate), "
                       f"got {got}")
    for j, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not _finite(s):
            shown = repr(s) if len(repr(s)) <= 40 else f"{repr(s)[:20]}..."
            raise RowError(path, line, None, f"scores[{j}]",
                           f"expected a finite number, got {shown}")
        if abs(s) > MAX_SCORE:
            raise RowError(path, line, None, f"scores[{j}]",
                           f"expected a number of magnitude at most {MAX_SCORE:g}, got {s:g}")
    subset = obj.get("subset")
    if isinstance(subset, str) and not subset.strip():
        subset = None  # a blank subset is none, as preference rows read it
    if subset is not None:
        subset = _text(path, line, "subset", subset)
    return BestOfNItem(row_id, prompt, tuple(candidates), tuple(float(s) for s in scores), subset,
                       f"{path}:{line}")


def load_best_of_n(paths) -> List[BestOfNItem]:
    """Reads and checks Best-of-N JSONL file(s); a bad line raises RowError (file, line, field)."""
    items: List[BestOfNItem] = []
    first_seen: Dict[str, str] = {}
    sources = expand_paths(paths)
    for path in sources:
        _check_jsonl_source(path)
    for path in sources:
        with storage.open_file(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8-sig" if line == 1 else "utf-8"))
                except UnicodeDecodeError as err:
                    raise RowError(path, line, None, None,
                                   f"invalid UTF-8 at byte {err.start}") from None
                except json.JSONDecodeError as err:
                    raise RowError(path, line, None, None,
                                   f"invalid JSON: {err.msg} (column {err.colno}); "
                                   f"{_JSONL_HINT}") from None
                item = _item(path, line, obj)
                if item.id in first_seen:
                    raise RowError(path, line, None, "id",
                                   f"duplicate id {item.id!r} (first at {first_seen[item.id]})")
                first_seen[item.id] = item.source
                items.append(item)
    if not items:
        raise ConfigError(f"no Best-of-N rows in {paths}")
    return items


# --- confidence intervals ---------------------------------------------------------------------

def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level {level}: must lie in (0, 1)")
    return statistics.NormalDist().inv_cdf(0.5 + level / 2)


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_ci needs 0 <= successes <= n and n > 0, got {successes}/{n}")
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(values: np.ndarray, *, seed: int, num_resamples: int = 2000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampling items with replacement).

    A resample of n items drawn from a few distinct values is exactly a multinomial draw of how
    often each value occurs, so that is what is drawn: same distribution, O(resamples) memory.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D array")
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples}: must be >= 1")
    _z(level)
    distinct, counts = np.unique(values, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(values.size, counts / values.size, size=num_resamples)
    means = draws @ distinct / values.size
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# --- picks and win rates ----------------------------------------------------------------------

def baseline_picks(sizes: Sequence[int], baseline: str, seed: int) -> np.ndarray:
    """int [P]: the baseline's candidate index per prompt (see the module docstring)."""
    if baseline == "first":
        return np.zeros(len(sizes), np.int64)
    if baseline == "random":
        rng = np.random.default_rng(seed)
        return np.asarray([rng.integers(n) for n in sizes], np.int64)
    raise ValueError(f"baseline {baseline!r}: expected one of {', '.join(BASELINES)}")


def best_of_n_metrics(qualities: Sequence[np.ndarray], rewards: Sequence[np.ndarray],
                      baseline_pick: np.ndarray, *, seed: int, num_resamples: int = 2000,
                      level: float = 0.95) -> Dict[str, Any]:
    """Metrics of one set of picks: ``qualities[i]`` and ``rewards[i]`` are prompt i's [N_i]
    quality scores and model rewards."""
    if not qualities or len(qualities) != len(rewards) or len(rewards) != len(baseline_pick):
        raise ValueError("qualities, rewards and baseline picks must be non-empty and equally long")
    model_q, base_q, best_q, mean_q = [], [], [], []
    for q, r, b in zip(qualities, rewards, baseline_pick):
        # float64, not float32: rewards given in float64 (another scorer's, Python floats) are
        # compared as given (float32 ones exactly as before), not rounded into false ties.
        q, r = np.asarray(q, np.float64), np.asarray(r, np.float64)
        if q.shape != r.shape:
            raise ValueError(f"{q.size} quality scores but {r.size} rewards for one prompt")
        if not np.all(np.isfinite(r)):
            raise ValueError("rewards must be finite (found NaN or inf)")
        model_q.append(q[int(np.argmax(r))])
        base_q.append(q[int(b)])
        best_q.append(q.max())
        mean_q.append(q.mean())
    model_q, base_q, best_q = map(np.asarray, (model_q, base_q, best_q))
    n = model_q.size
    # Per prompt: 1 win, 0.5 tie, 0 loss against the baseline's pick.
    vs_base = np.where(model_q > base_q, 1.0, np.where(model_q == base_q, 0.5, 0.0))
    matches = int(np.sum(model_q == best_q))
    return {
        "num_prompts": n,
        "against_baseline": {
            "wins": int(np.sum(vs_base == 1.0)), "ties": int(np.sum(vs_base == 0.5)),
            "losses": int(np.sum(vs_base == 0.0)), "win_rate": float(vs_base.mean()),
            "ci": list(bootstrap_ci(vs_base, seed=seed, num_resamples=num_resamples,
                                    level=level)),
        },
        "against_oracle": {
            "matches": matches, "match_rate": matches / n,
            "ci": list(wilson_ci(matches, n, level)),
            "mean_regret": float(np.mean(best_q - model_q)),
        },
        "mean_quality": {"model": float(model_q.mean()), "baseline": float(base_q.mean()),
                         "oracle": float(best_q.mean()), "all_candidates": float(np.mean(mean_q))},
    }
