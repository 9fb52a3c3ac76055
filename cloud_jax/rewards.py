"""CLoud rewards as a reward function for GRPO-style trainers, in the same process.

    from cloud_jax.rewards import CLoudReward
    reward = CLoudReward("runs/cloud/final", num_samples=4, temperature=0.7)
    reward(prompts=["What is 2+2?"], completions=["4"])          # -> [0.83]
    reward.last_critiques                                          # [["The answer is right...", ...]]

The call signature is the one TRL's ``GRPOTrainer`` and tunix's GRPO learner use for reward
functions: ``fn(prompts, completions, **kwargs) -> list[float]``, one float per completion, in
order; extra keyword arguments (dataset columns, trainer state, completion ids) are accepted and
ignored. Prompts and completions may be strings or chat messages (TRL's conversational format):
a prompt's user message and a completion's assistant message are what get scored (a system
message is left out, with a warning the first time: the model's layout has no place for it); a
completion holding more than its one assistant message (a tool call and its result) is a
ValueError. The rewards equal ``rm.score`` on the same texts and settings.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from cloud_jax.api import RewardModel

log = logging.getLogger(__name__)


def _prompt_text(prompt: Any, index: int) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        users = [m.get("content") for m in prompt if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            if len(users) > 1 or any(m.get("role") not in ("user", "system") for m in prompt):
                raise ValueError(f"prompts[{index}]: multi-turn conversations are not supported; "
                                 "give one user message")
            if any(m.get("role") == "system" for m in prompt):
                _warn_system_once()
            return users[-1]
    raise ValueError(f"prompts[{index}]: expected a string or a list of chat messages with one "
                     f"user message, got {prompt!r:.80}")


_warned: set = set()


def _warn_system_once() -> None:
    if "system" not in _warned:
        _warned.add("system")
        log.warning("a prompt's system message is not scored: a CLoud model reads one user "
                    "message and the response (its training layout), so the reward is the "
                    "same with or without it")


def _completion_text(completion: Any, index: int) -> str:
    if isinstance(completion, str):
        return completion
    # Exactly one message, the assistant's: a tool call and its result, or a second turn, would
    # otherwise be left out of what is scored without a word.
    if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict) \
            and completion[0].get("role") == "assistant" \
            and isinstance(completion[0].get("content"), str):
        return completion[0]["content"]
    raise ValueError(f"completions[{index}]: expected a string or a list holding one assistant "
                     f"message (and nothing else), got {completion!r:.80}")


class CLoudReward:
    """A reward function over a CLoud model (a :class:`cloud_jax.RewardModel`, or a path or hub id
    to load). ``settings`` are the sampling settings of ``rm.score`` (``num_samples``,
    ``temperature``, ``top_k``, ``top_p``, ``max_critique_tokens``, ``repetition_penalty``,
    ``seed``, ``batch_size``, ...)."""

    def __init__(self, model: RewardModel | str | os.PathLike, **settings):
        # Checked now, before loading, not at the trainer's first reward call: a misspelt or bad
        # setting is an error before any policy generation (the TypeError or ValueError
        # rm.score gives).
        from cloud_jax.scoring.rewards import ScoreConfig

        ScoreConfig(**settings).validate()
        if not isinstance(model, RewardModel):
            import cloud_jax

            model = cloud_jax.load(model)
        self.rm = model
        self.settings = settings
        # Trainers name a reward function by __name__ in their logs.
        self.__name__ = "cloud_reward"
        self.last_critiques: list[list[str]] = []
        self.last_result = None

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 **kwargs: Any) -> list[float]:
        del kwargs  # dataset columns, trainer state, completion ids: not needed
        rewards, _ = self.with_critiques(prompts, completions)
        return rewards

    def with_critiques(self, prompts: Sequence[Any],
                       completions: Sequence[Any]) -> tuple[list[float], list[list[str]]]:
        """The rewards and each completion's K critiques (for logging)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions: the "
                             "trainer passes one prompt per completion")
        if len(prompts) == 0:  # a list, or a dataset column as an array
            # Nothing scored: last_critiques is this call's (none), not the call before's.
            self.last_critiques, self.last_result = [], None
            return [], []
        texts = [_prompt_text(p, i) for i, p in enumerate(prompts)]
        answers = [_completion_text(c, i) for i, c in enumerate(completions)]
        result = self.rm.score(texts, answers, **self.settings)
        self.last_result = result
        self.last_critiques = [list(c) for c in result.critiques]
        return [float(r) for r in result.rewards], self.last_critiques


def cloud_reward(model: RewardModel | str | os.PathLike,
                 **settings) -> CLoudReward:
    """``CLoudReward(model, **settings)``: a reward function for ``GRPOTrainer(reward_funcs=...)``
    and tunix's GRPO learner."""
    return CLoudReward(model, **settings)

