"""What evaluation needs from a reward model: a scoring callable, and an adapter over ``rm.score``.

Evaluation never touches a model directly. It calls

    score_fn(prompts, responses, num_samples) -> an object with
        .rewards [B], .sample_rewards [B, K], .critiques [B][K] (optionally .truncated [B, K])

so tests drive it with fake functions and any scorer (a classic model: K = 1, empty critique
lists) plugs in. :func:`score_fn_from_model` builds one from a :class:`cloud_jax.RewardModel`.

A scorer that cuts long prompts may also have ``score_fn.prompt_tokens_cut(prompts, responses)
-> int [B]`` (the prompt tokens it cuts from each input to fit) and take ``min_prompt_cuts=``
([B], cut at least that many): the evaluation then cuts the responses to one prompt (both sides
of a pair, a Best-of-N prompt's candidates) to the same prompt tokens, the largest cut among them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Protocol, Sequence

import numpy as np

from cloud_jax.errors import InputTooLongError


class ScoreLike(Protocol):
    rewards: Any  # [B]
    sample_rewards: Any  # [B, K]
    critiques: Sequence[Sequence[str]]  # [B][K]; empty inner lists when there are no critiques


ScoreFn = Callable[[List[str], List[str], int], ScoreLike]


@dataclasses.dataclass(frozen=True)
class Scores:
    """Scores of N inputs, checked and gathered from one or more ``score_fn`` calls."""

    sample_rewards: np.ndarray  # float32 [N, K]
    critiques: List[List[str]]  # [N][K], or [N][0] without critiques
    truncated: Optional[np.ndarray]  # bool [N, K]; None when the scorer does not report it

    @property
    def num_samples(self) -> int:
        return self.sample_rewards.shape[1]


def score_fn_from_model(rm, *, temperature: float = 0.0, max_critique_tokens: int = 256,
                        seed: int = 0, batch_size: int = 8, classic: Optional[bool] = None,
                        **settings) -> ScoreFn:
    """A ``score_fn`` over ``rm.score``; ``settings`` are further keyword arguments of it
    (``top_k``, ``top_p``, ``max_length``, ...). With ``classic`` the model reads one reward per
    response without a critique, so K is always 1; None (the default) takes the model's own
    kind, as ``rm.score`` does: a ``vanilla`` checkpoint is scored without critiques."""
    from cloud_jax.scoring.rewards import ScoreConfig

    if "num_samples" in settings:
        raise TypeError("score_fn_from_model: num_samples is not a setting of the score_fn: the "
                        "evaluation gives it per call (EvalConfig.num_samples)")
    # Checked now, before any scoring: a misspelt or bad setting fails here, not at the first
    # batch of an evaluation.
    ScoreConfig.from_settings("score_fn_from_model", dict(
        temperature=temperature, max_critique_tokens=max_critique_tokens, seed=seed,
        batch_size=batch_size, classic=classic, **settings))
    if classic is None:
        classic = bool(rm.is_classic)
    common = dict(temperature=temperature, max_critique_tokens=max_critique_tokens, seed=seed,
                  batch_size=batch_size, classic=classic, **settings)

    def score_fn(prompts: List[str], responses: List[str], num_samples: int,
                 min_prompt_cuts: Optional[Sequence[int]] = None) -> ScoreLike:
        cuts = {} if min_prompt_cuts is None else {"min_prompt_cuts": min_prompt_cuts}
        return rm.score(prompts, responses, num_samples=1 if classic else num_samples,
                        **cuts, **common)

    if hasattr(rm, "prompt_tokens_cut"):
        score_fn.prompt_tokens_cut = lambda prompts, responses: rm.prompt_tokens_cut(
            prompts, responses, **common)
    return score_fn


def _check(out: ScoreLike, n: int, k: int, first: int) -> tuple[np.ndarray, list, Any]:
    where = f"score_fn on inputs {first}..{first + n - 1}"
    rewards = np.asarray(out.sample_rewards, np.float32)
    if rewards.shape != (n, k):
        hint = ""
        if rewards.shape == (n, 1):  # score_fn_from_model over a vanilla checkpoint, say
            hint = ("; a classic scorer gives one reward per response whatever K is asked: "
                    "evaluate it with EvalConfig(classic=True) (K = 1), or sample critiques "
                    "(score_fn_from_model(..., classic=False))")
        raise ValueError(f"{where}: sample_rewards has shape {rewards.shape}, expected "
                         f"({n}, {k}){hint}")
    critiques = [list(c) for c in out.critiques]
    if len(critiques) != n or any(len(c) not in (0, k) for c in critiques):
        raise ValueError(f"{where}: critiques must be {n} lists of {k} strings (or empty lists)")
    truncated = getattr(out, "truncated", None)
    if truncated is not None:
        truncated = np.asarray(truncated, bool).reshape(n, k)
    return rewards, critiques, truncated


def score_all(score_fn: ScoreFn, prompts: Sequence[str], responses: Sequence[str], num_samples: int,
              *, expected_samples: Optional[int] = None, chunk_size: int = 64,
              progress: bool = False, desc: str = "scoring",
              min_prompt_cuts: Optional[Sequence[int]] = None) -> Scores:
    """Scores every (prompt, response) in chunks of ``chunk_size`` (with ``progress``, a tqdm bar on
    a terminal, a line every 30 seconds in a log: :mod:`cloud_jax.progress`).

    ``expected_samples`` is the K the scorer must return (``num_samples``, or 1 for a classic
    model); a scorer that returns another shape is an error, never silently reshaped. An input
    the scorer finds too long raises InputTooLongError with its index among all the inputs (not
    within its chunk). ``min_prompt_cuts`` [N], optional, goes to the scorer (``min_prompt_cuts=``,
    each call its chunk's share): prompt tokens to cut from each input at least.
    """
    from cloud_jax import progress as progress_

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    k = num_samples if expected_samples is None else expected_samples
    parts, critiques, flags = [], [], []
    with progress_.bar(len(prompts), "responses", desc=desc, disable=not progress) as bar:
        for start in range(0, len(prompts), chunk_size):
            end = min(start + chunk_size, len(prompts))
            try:
                cuts = ({} if min_prompt_cuts is None
                        else {"min_prompt_cuts": [int(c) for c in min_prompt_cuts[start:end]]})
                out = score_fn(list(prompts[start:end]), list(responses[start:end]),
                               num_samples, **cuts)
            except InputTooLongError as err:
                raise InputTooLongError(start + err.index, err.detail) from None
            rewards, crit, trunc = _check(out, end - start, k, start)
            parts.append(rewards)
            critiques += crit
            flags.append(trunc)
            bar.update(end - start)
    truncated = None if any(f is None for f in flags) else np.concatenate(flags)
    return Scores(np.concatenate(parts) if parts else np.zeros((0, k), np.float32), critiques,
                  truncated)
