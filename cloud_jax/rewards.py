"""CLoud rewards as a reward function for GRPO-style trainers, in the same process.

    from cloud_jax.rewards import CLoudReward
    reward = CLoudReward("runs/cloud/final", num_samples=4, temperature=0.7)
    reward(prompts=["What is 2+2?"], completions=["4"])          # -> [0.83]
    reward.last_critiques                                          # [["The answer is right...", ...]]

The call signature is the one TRL's ``GRPOTrainer`` and tunix's GRPO learner use for reward
functions: ``fn(prompts, completions, **kwargs) -> list[float]``, one float per completion, in
order; extra keyword arguments (dataset columns, trainer state, completion ids) are accepted and
ignored (tunix's ``prompts`` are rendered with the policy's chat template: score its raw question
column instead, docs/SERVING.md), but TRL's logging hooks: given ``log_extra``, each completion's
critiques go to TRL's completions table (column ``cloud_reward/critiques``), and given
``log_metric``, their measures to its logs (``cloud_reward/sample_reward_std``,
``truncated_frac``, ``critique_tokens``, ``too_long_frac``; docs/SERVING.md). Prompts and
completions may be strings or chat messages (TRL's conversational format): a prompt's user
message and a completion's assistant message are what get scored (a system message is left
out, with a warning the first time: the model's layout has no place for it); a completion holding
more than its one assistant message (a tool call and its result) is a ValueError, and so is an
assistant message that makes a tool call (``tool_calls``). A message key that is not read is a
ValueError naming it (as /v1/score refuses it), not dropped: user and system messages hold role and
content, an assistant message also tool_calls and its parsed-out reasoning (``reasoning_content``
or ``thinking``: left out of the score, with a warning the first time); a key holding None counts
as absent. A message's content is a string or a list of text parts (``{"type": "text", "text":
...}``, the form of OpenAI's API and newer TRL), read joined in order with nothing between (the
tokens of the joined string); a part of another type (an image, audio) is a ValueError naming the
message and the part. The rewards equal ``rm.score`` on the
same texts and settings, but for the prompt cut: where a prompt must be cut from the left to fit
``max_length``, the completions of one prompt text in a call (a GRPO group) all read it after the
largest cut any of them needs (``rm.score``'s ``min_prompt_cuts``), so that their rewards, which
the trainer compares, judge the same question. A non-finite reward (NaN weights, an overflowing
dtype) is a ValueError, not a reward.

A completion too long for the model (it does not fit ``max_length``, or the positions the
critique budget leaves, even with the whole prompt cut away) is not scored, and the call goes on:
its reward is ``None`` (``on_too_long="skip"``, the default: TRL leaves such a sample out of that
function's reward), or ``too_long_reward`` (``on_too_long="penalty"``), with a warning naming the
samples; ``on_too_long="error"`` raises ``InputTooLongError`` as ``rm.score`` does.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from cloud_jax.api import RewardModel
from cloud_jax.data.schema import content_text
from cloud_jax.errors import InputTooLongError

log = logging.getLogger(__name__)


# The keys of a chat message that are read. Any other key is refused (as /v1/score refuses it)
# unless it holds None: datasets fills the fields one row's messages lack with None when another
# row has them. An assistant message's tool_calls are refused when they hold a call, and its
# reasoning (the part of the response a response schema parses out: TRL with transformers'
# parsed responses) is left out of the score, with a warning the first time.
_MESSAGE_KEYS = ("role", "content")
_REASONING_KEYS = ("reasoning_content", "thinking")
_ASSISTANT_KEYS = _MESSAGE_KEYS + ("tool_calls",) + _REASONING_KEYS


def _check_keys(message: dict, where: str, accepted: Sequence[str]) -> None:
    unknown = [k for k, v in message.items() if k not in accepted and v is not None]
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (a {message.get('role')} message "
                         f"holds {', '.join(accepted[:-1])} and {accepted[-1]}; a key the model "
                         "does not read is refused, not dropped: remove it)")


def _prompt_text(prompt: Any, index: int) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        users = [j for j, m in enumerate(prompt) if m.get("role") == "user"]
        if users and isinstance(prompt[users[-1]].get("content"), (str, list)):
            if len(users) > 1 or any(m.get("role") not in ("user", "system") for m in prompt):
                raise ValueError(f"prompts[{index}]: multi-turn conversations are not supported; "
                                 "give one user message")
            for j, m in enumerate(prompt):
                _check_keys(m, f"prompts[{index}][{j}]", _MESSAGE_KEYS)
            text = content_text(prompt[users[-1]]["content"],
                                f"prompts[{index}][{users[-1]}].content")
            if any(m.get("role") == "system" for m in prompt):
                _warn_system_once()
            return text
    raise ValueError(f"prompts[{index}]: expected a string or a list of chat messages with one "
                     f"user message, got {prompt!r:.80}")


_warned: set = set()


def _warn_system_once() -> None:
    if "system" not in _warned:
        _warned.add("system")
        log.warning("a prompt's system message is not scored: a CLoud model reads one user "
                    "message and the response (its training layout), so the reward is the "
                    "same with or without it")


def _warn_reasoning_once(key: str) -> None:
    if "reasoning" not in _warned:
        _warned.add("reasoning")
        log.warning("a completion's reasoning (its assistant message's %s) is not scored: the "
                    "reward is the model's judgement of the response's content, the same with "
                    "or without it", key)


def _completion_text(completion: Any, index: int) -> str:
    if isinstance(completion, str):
        return completion
    # Exactly one message, the assistant's: a tool call and its result, or a second turn, would
    # otherwise be left out of what is scored without a word.
    if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict) \
            and completion[0].get("role") == "assistant" \
            and isinstance(completion[0].get("content"), (str, list)):
        # A tool call parsed out of the response (TRL's tool_calls, the content left empty or a
        # preamble) is not in the content: scoring the content alone would drop it.
        if completion[0].get("tool_calls"):
            raise ValueError(f"completions[{index}]: its assistant message makes a tool call "
                             "(tool_calls); only a response without tool calls can be scored")
        _check_keys(completion[0], f"completions[{index}][0]", _ASSISTANT_KEYS)
        text = content_text(completion[0]["content"], f"completions[{index}][0].content")
        for key in _REASONING_KEYS:
            if completion[0].get(key):
                _warn_reasoning_once(key)
        return text
    raise ValueError(f"completions[{index}]: expected a string or a list holding one assistant "
                     f"message (and nothing else), got {completion!r:.80}")


ON_TOO_LONG = ("skip", "penalty", "error")


def _check_too_long_options(on_too_long: Any, too_long_reward: Any) -> Optional[float]:
    """``too_long_reward`` as a float (None unless ``on_too_long`` is "penalty"); ValueError
    naming the option that does not fit."""
    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"on_too_long={on_too_long!r}: expected one of "
                         f"{', '.join(map(repr, ON_TOO_LONG))}")
    if on_too_long != "penalty":
        if too_long_reward is not None:
            raise ValueError(f"too_long_reward={too_long_reward!r} is used only with "
                             f"on_too_long='penalty' (here {on_too_long!r}): pass both, or "
                             "neither")
        return None
    if isinstance(too_long_reward, (bool, np.bool_)) or \
            not isinstance(too_long_reward, (int, float, np.integer, np.floating)) or \
            not math.isfinite(too_long_reward):
        raise ValueError(f"on_too_long='penalty' needs too_long_reward=<a finite number>, the "
                         f"reward a too-long completion gets; got {too_long_reward!r}")
    return float(too_long_reward)


class CLoudReward:
    """A reward function over a CLoud model (a :class:`cloud_jax.RewardModel`, or a path or hub id
    to load). ``settings`` are the sampling settings of ``rm.score`` (``num_samples``,
    ``temperature``, ``top_k``, ``top_p``, ``max_critique_tokens``, ``repetition_penalty``,
    ``seed``, ``batch_size``, ``max_length``, ...).

    ``on_too_long``: what a completion too long to score gets (it does not fit ``max_length``,
    or what the model's positions leave after the critique budget, even with the whole prompt cut
    away): ``"skip"`` (default) its reward is ``None``, which TRL's ``GRPOTrainer`` reads as "no
    reward from this function" (a sample no reward function scores gets no advantage);
    ``"penalty"`` its reward is ``too_long_reward`` (for trainers that need a number, tunix's);
    ``"error"`` raises ``InputTooLongError`` (``rm.score``'s behaviour). The other completions of
    the call are scored as always, a warning names the ones that were not, and
    ``last_too_long`` lists them.

    Called with TRL's ``log_extra`` / ``log_metric`` hooks, a call logs its critiques and their
    measures under ``<__name__>/`` (``cloud_reward/``: set ``__name__`` to tell two apart); the
    rewards are the same with or without them."""

    def __init__(self, model: RewardModel | str | os.PathLike, *, on_too_long: str = "skip",
                 too_long_reward: Optional[float] = None, **settings):
        # Checked now, before loading, not at the trainer's first reward call: a misspelt or bad
        # setting is an error before any policy generation (the TypeError or ValueError
        # rm.score gives).
        from cloud_jax.scoring.rewards import ScoreConfig, too_long

        self._cfg = ScoreConfig.from_settings("CLoudReward", settings,
                                              ("on_too_long", "too_long_reward"))
        self.too_long_reward = _check_too_long_options(on_too_long, too_long_reward)
        self.on_too_long = on_too_long
        if not isinstance(model, RewardModel):
            import cloud_jax

            model = cloud_jax.load(model)
        # Settings under which not even an empty completion fits (a critique budget the size of
        # the model's positions) would leave every reward of the run unscored: refused now.
        if model.tokenizer is not None:
            for over in too_long(model, [""], [""], self._cfg):
                raise ValueError(f"no completion can be scored with these settings: an empty one "
                                 f"takes {over.tokens} tokens, over the limit of {over.limit} "
                                 f"({over.what})")
        self.rm = model
        self.settings = settings
        # Trainers name a reward function by __name__ in their logs.
        self.__name__ = "cloud_reward"
        self.last_critiques: list[list[str]] = []
        self.last_result = None
        self.last_too_long = []

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 **kwargs: Any) -> list[Optional[float]]:
        # Dataset columns, trainer state, completion ids: not needed. TRL's GRPOTrainer also
        # passes its logging hooks, log_extra (a column of its completions table) and log_metric
        # (a scalar averaged into its logged metrics): the critiques behind the rewards go there.
        log_extra, log_metric = kwargs.get("log_extra"), kwargs.get("log_metric")
        rewards, _ = self.with_critiques(prompts, completions)
        if rewards and (callable(log_extra) or callable(log_metric)):
            self._log_to_trainer(log_extra if callable(log_extra) else None,
                                 log_metric if callable(log_metric) else None)
        return rewards

    def _log_to_trainer(self, log_extra, log_metric) -> None:
        """The last call's critiques, one text per completion, to ``log_extra`` (column
        ``<__name__>/critiques``), and its means to ``log_metric`` (``<__name__>/...``): names
        under the function's own, beside TRL's ``rewards/<__name__>/...`` and its reward column."""
        from cloud_jax.scoring.rewards import resolve_classic

        result, name = self.last_result, self.__name__
        over = {o.index: o for o in self.last_too_long}
        scored = [i for i in range(len(result.rewards)) if i not in over]
        # A classic model writes no critiques: nothing to show or measure but the too-long ones.
        critiqued = not resolve_classic(self.rm, self._cfg)
        if log_extra is not None and critiqued:
            budget = self._cfg.max_critique_tokens
            texts = []
            for i in range(len(result.rewards)):
                if i in over:
                    texts.append(f"(not scored: {over[i].tokens} tokens with the prompt cut "
                                 f"away, over the limit of {over[i].limit})")
                    continue
                texts.append("\n\n".join(
                    f"[{j + 1}] reward {result.sample_rewards[i, j]:.3f}"
                    + (f", cut at {budget} tokens" if result.truncated[i, j] else "")
                    + f": {critique}" for j, critique in enumerate(result.critiques[i])))
            log_extra(f"{name}/critiques", texts)
        if log_metric is None:
            return
        # A fraction, not a count: TRL averages each metric over its processes and generation
        # batches, which a fraction survives (every process scores as many completions).
        log_metric(f"{name}/too_long_frac", len(over) / len(result.rewards))
        # With nothing scored there is no mean: left out (a NaN would blot the other processes').
        if critiqued and scored:
            log_metric(f"{name}/sample_reward_std", float(np.mean(result.reward_std[scored])))
            log_metric(f"{name}/truncated_frac", float(np.mean(result.truncated[scored])))
            log_metric(f"{name}/critique_tokens", float(np.mean(result.critique_tokens[scored])))

    def with_critiques(self, prompts: Sequence[Any], completions: Sequence[Any]
                       ) -> tuple[list[Optional[float]], list[list[str]]]:
        """The rewards and each completion's K critiques (for logging). A completion too long to
        score has no critiques, and the reward ``on_too_long`` gives it; in ``last_result`` its
        rewards are NaN."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions: the "
                             "trainer passes one prompt per completion")
        if len(prompts) == 0:  # a list, or a dataset column as an array
            # Nothing scored: last_critiques is this call's (none), not the call before's.
            self.last_critiques, self.last_result, self.last_too_long = [], None, []
            return [], []
        texts = [_prompt_text(p, i) for i, p in enumerate(prompts)]
        answers = [_completion_text(c, i) for i, c in enumerate(completions)]
        over, cuts = self._shared_cuts(texts, answers)
        if over and self.on_too_long == "error":
            err = over[0].error()
            raise InputTooLongError(err.index, err.detail + " (or build the reward function "
                                    "with on_too_long='skip' or 'penalty' to go on without it)")
        if over:
            result = self._score_the_rest(texts, answers, {o.index for o in over}, cuts)
        else:
            result = self.rm.score(texts, answers, min_prompt_cuts=cuts, **self.settings)
        # A NaN reaches a trainer as no reward (TRL) or as 0 (tunix's nansum), without a word.
        # (A completion too long to score has NaN rewards by design: not a fault of the model.)
        finite = (np.isfinite(np.asarray(result.rewards))
                  & np.all(np.isfinite(np.asarray(result.sample_rewards)), axis=1))
        finite[[o.index for o in over]] = True
        bad = np.flatnonzero(~finite)
        if bad.size:
            raise ValueError(f"the model gave non-finite rewards (NaN or inf) for "
                             f"completions{bad[:8].tolist()}: its weights hold non-finite "
                             "values, or its compute dtype overflows")
        self.last_result, self.last_too_long = result, over
        self.last_critiques = [list(c) for c in result.critiques]
        rewards: list[Optional[float]] = [float(r) for r in result.rewards]
        if over:
            for o in over:
                rewards[o.index] = self.too_long_reward
            self._warn_too_long(over, len(texts))
        return rewards, self.last_critiques

    def _shared_cuts(self, texts: list[str], answers: list[str]
                     ) -> tuple[list, Optional[list[int]]]:
        """The inputs too long to score (``too_long``'s list), and the prompt tokens to cut from
        each input (None: every input fits whole): the completions of one prompt text read the
        same prompt tokens, the largest cut any of its scorable completions needs (a GRPO group
        compares their rewards with one another; evaluation and Best-of-N share cuts so too)."""
        from cloud_jax.scoring.rewards import prompt_tokens_cut, too_long

        cuts = prompt_tokens_cut(self.rm, texts, answers, self._cfg)
        if not cuts.any():  # nothing is cut, so nothing is too long either
            return [], None
        over = too_long(self.rm, texts, answers, self._cfg)
        skipped = {o.index for o in over}
        most: dict[str, int] = {}
        for i, (text, cut) in enumerate(zip(texts, cuts.tolist())):
            if i not in skipped:
                most[text] = max(most.get(text, 0), cut)
        return over, [most.get(text, 0) for text in texts]

    def _score_the_rest(self, texts: list[str], answers: list[str], skipped: set,
                        cuts: Optional[list[int]] = None):
        """``rm.score`` over the inputs not in ``skipped`` (each cut by at least ``cuts[i]``
        prompt tokens), as a result over all of them: the skipped ones with NaN rewards, no
        critiques and no critique tokens."""
        from cloud_jax.scoring.rewards import ScoreResult, resolve_classic

        keep = [i for i in range(len(texts)) if i not in skipped]
        n = len(texts)
        k = 1 if resolve_classic(self.rm, self._cfg) else self._cfg.num_samples
        sample_rewards = np.full((n, k), np.nan, np.float32)
        truncated = np.zeros((n, k), bool)
        critique_tokens = np.zeros((n, k), np.int32)
        critiques: list[list[str]] = [[] for _ in range(n)]
        if keep:
            part = self.rm.score([texts[i] for i in keep], [answers[i] for i in keep],
                                 min_prompt_cuts=None if cuts is None else
                                 [cuts[i] for i in keep], **self.settings)
            sample_rewards[keep], truncated[keep] = part.sample_rewards, part.truncated
            critique_tokens[keep] = part.critique_tokens
            for j, i in enumerate(keep):
                critiques[i] = part.critiques[j]
        rewards = np.full(n, np.nan, np.float32)
        std = np.full(n, np.nan, np.float32)
        if keep:
            rewards[keep], std[keep] = part.rewards, part.reward_std
        return ScoreResult(rewards=rewards, sample_rewards=sample_rewards, reward_std=std,
                           critiques=critiques, truncated=truncated,
                           critique_tokens=critique_tokens)

    def _warn_too_long(self, over: list, n: int) -> None:
        given = ("None" if self.too_long_reward is None else
                 f"too_long_reward={self.too_long_reward}")
        shown = ", ".join(f"[{o.index}] {o.tokens}" for o in over[:8])
        more = f", and {len(over) - 8} more" if len(over) > 8 else ""
        log.warning("%d of %d completions too long to score, not scored (their reward: %s, "
                    "on_too_long=%r): tokens with the prompt cut away %s%s, over the limit of %d "
                    "(%s)", len(over), n, given, self.on_too_long, shown, more, over[0].limit,
                    over[0].what)


def cloud_reward(model: RewardModel | str | os.PathLike,
                 **settings) -> CLoudReward:
    """``CLoudReward(model, **settings)``: a reward function for ``GRPOTrainer(reward_funcs=...)``
    and tunix's GRPO learner."""
    return CLoudReward(model, **settings)

