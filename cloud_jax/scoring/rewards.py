"""Scoring: critique -> reward for (prompt, response) pairs, with self-consistency over K samples.

    result = rm.score(prompts, responses, num_samples=8, temperature=0.7)
    result.rewards [B] (mean over samples), result.sample_rewards [B, K], result.reward_std [B],
    result.critiques [B][K], result.truncated [B, K]

Each input is prefilled as ``[user: prompt][assistant: response][user: critique prefix`` once;
K critiques are sampled from its replicated cache and each reward is read inside the decode loop
at the end-of-turn token. A classic model (``classic=True``) has no critique: its reward is read
by one forward over ``[user: prompt][assistant: response]<end-of-turn>``. Given critiques
(:func:`teacher_forced_rewards`) are read the same way, after the critique. Every whole-sequence
forward, ``RewardModel.forward`` included, is :func:`sequence_rewards`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from cloud_jax.model.config import ModelConfig
from cloud_jax.model.decode_step import decode_layout, prepare_decode_weights_jit
from cloud_jax.data.config import CRITIQUE_PREFIX, LAYOUT_VERSION, LAYOUT_VERSIONS
from cloud_jax.data.layout import Example, chat_layout, encode_critique_prefix, encode_example
from cloud_jax.data.schema import lone_surrogate
from cloud_jax.data.tokenizer import end_of_turn_ids
from cloud_jax.model import CLoudModel, param_shardings, unstack_layers
from cloud_jax.sampling import (DECODE_PHASES, bucket_length, check_decode_phases,
                                check_repetition_penalty, check_seed, check_steps_per_check,
                                method_from, pad_prefixes, sample)
from cloud_jax.sharding import SAMPLE_RULES
from cloud_jax.errors import InputTooLongError

log = logging.getLogger(__name__)


# Prefill tokens at most where ScoreConfig.max_length is None (as the CLI's --max-length).
DEFAULT_MAX_LENGTH = 2048


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """How critiques are sampled and rewards read."""

    num_samples: int = 1
    # 0 is greedy; top_k / top_p (at most one) apply when temperature > 0.
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    # Critique-token budget; a critique that reaches it gets the end-of-turn token forced and is
    # flagged truncated (the reference samples up to 1024).
    max_critique_tokens: int = 256
    # Hugging Face's repetition penalty over the prefix and the critique so far; 1.0 is off (the
    # reference samples with 1.01).
    repetition_penalty: float = 1.0
    seed: int = 0
    # Inputs per compiled batch (each becomes num_samples decode rows).
    batch_size: int = 8
    # Prefill tokens at most; longer inputs lose prompt tokens from the left. Also never more
    # than the model's positions allow: max_position_embeddings, less max_critique_tokens + 1
    # (the critique and its end-of-turn token) where a critique is sampled. None:
    # DEFAULT_MAX_LENGTH, held to the positions without a word; a value given above what they
    # allow is warned about once.
    max_length: Optional[int] = None
    # The text the critique starts after. None: the one stored in the model's checkpoint by
    # training (RewardModel.critique_prefix), else data.config.CRITIQUE_PREFIX.
    critique_prefix: Optional[str] = None
    # A classic reward model: no critique, one forward. None: the model's own kind (a checkpoint
    # whose feedback_method is "vanilla" is classic).
    classic: Optional[bool] = None
    # How rows are tokenized (data.config.LAYOUT_VERSIONS). None: the version the
    # model was trained with (RewardModel.layout_version).
    layout_version: Optional[int] = None
    # Prefill length buckets; empty: powers of two.
    length_buckets: tuple[int, ...] = ()
    # Decode steps between two checks of whether every critique has ended: on a GPU each check
    # waits for the device (cloud_jax.sampling.loop.decode). The same critiques at any value.
    steps_per_check: int = 1
    # Loops the decode grows the critiques' cache in, each compiled on its own: more read fewer
    # empty cache slots a step, 1 compiles fastest (cloud_jax.sampling.loop.phase_lengths). The
    # same critiques at any value.
    decode_phases: int = DECODE_PHASES

    @classmethod
    def from_settings(cls, caller: str, settings: dict, also: Sequence[str] = ()
                      ) -> "ScoreConfig":
        """``ScoreConfig(**settings)``, validated; a name that is no field is a TypeError that
        names ``caller``, the nearest field and every setting ``caller`` takes (the fields, then
        ``also``, its own keyword arguments)."""
        known = [f.name for f in dataclasses.fields(cls)]
        for name in settings:
            if name not in known:
                near = difflib.get_close_matches(name, known + list(also), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                more = f", {', '.join(also)}" if also else ""
                raise TypeError(f"{caller}: unknown setting {name!r}{hint}; the settings are "
                                f"{', '.join(known)}{more}")
        return cls(**settings).validate()

    def validate(self) -> "ScoreConfig":
        # Whole numbers, checked first: a float (2.0) would otherwise pass here and fail as a
        # TypeError deep in the sampler at the first call, not when the settings are made.
        for name in ("num_samples", "batch_size", "max_critique_tokens", "max_length"):
            value = getattr(self, name)
            if name == "max_length" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name}={value!r}: must be a whole number")
        # Real numbers, checked as such: a string failed in a comparison inside the sampler's
        # checks, naming no setting.
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if name == "top_p" and value is None:
                continue
            if isinstance(value, (bool, np.bool_)) or \
                    not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name}={value!r}: must be a number"
                                 + (" (None: not used)" if name == "top_p" else ""))
        # Prefill lengths: a float (64.0) failed as a TypeError in np.full at the first batch.
        buckets = self.length_buckets
        if not isinstance(buckets, (list, tuple, np.ndarray)) or any(
                isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)) or b < 1
                for b in buckets):
            raise ValueError(f"length_buckets={buckets!r:.80}: must be a list of whole numbers "
                             ">= 1 (prefill lengths; empty: powers of two)")
        if self.critique_prefix is not None and not isinstance(self.critique_prefix, str):
            raise ValueError(f"critique_prefix={self.critique_prefix!r}: must be a string (None: "
                             "the model's own)")
        if self.classic is not None and not isinstance(self.classic, (bool, np.bool_)):
            raise ValueError(f"classic={self.classic!r}: must be True, False or None")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length={self.max_length}: must be >= 1")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.max_critique_tokens < 0:
            raise ValueError(f"max_critique_tokens={self.max_critique_tokens}: must be >= 0")
        method_from(self.temperature, self.top_k, self.top_p)
        check_repetition_penalty(self.repetition_penalty)
        check_seed(self.seed)
        check_steps_per_check(self.steps_per_check)
        check_decode_phases(self.decode_phases)
        if self.layout_version is not None and self.layout_version not in LAYOUT_VERSIONS:
            raise ValueError(f"layout_version={self.layout_version}: expected one of "
                             f"{', '.join(map(str, LAYOUT_VERSIONS))}")
        return self


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    rewards: np.ndarray  # float32 [B]: mean over the samples
    sample_rewards: np.ndarray  # float32 [B, K] (K = 1 for a classic model)
    reward_std: np.ndarray  # float32 [B]: population std over the samples
    critiques: list[list[str]]  # [B][K]; [B][0] (empty lists) for a classic model
    truncated: np.ndarray  # bool [B, K]: critique hit the token budget
    critique_tokens: np.ndarray  # int32 [B, K]: critique length in tokens


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _sampling_params(rm) -> tuple[ModelConfig, Any]:
    cfg, params = rm.config, rm.params
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.num_layers)
        cfg = dataclasses.replace(cfg, scan_layers=False)
    if rm.mesh is not None:
        params = jax.device_put(params, param_shardings(cfg, rm.mesh, SAMPLE_RULES))
    return cfg, params


@functools.partial(jax.jit, static_argnames=("cfg", "return_logits"))
def sequence_rewards(params, ids_bt, mask_bt, reward_index_b, *, cfg: ModelConfig,
                     return_logits: bool = False):
    """One forward over whole sequences: rewards [B] fp32 read at ``reward_index_b``; with
    ``return_logits``, ``(logits [B, T, V] fp32, rewards [B])``."""
    out = CLoudModel(cfg).apply({"params": params}, ids_bt, mask_bt,
                                reward_index_b=reward_index_b, return_logits=return_logits)
    return (out.logits, out.rewards) if return_logits else out.rewards


def _require_tokenizer(rm):
    if rm.tokenizer is None:
        raise ValueError("this model has no tokenizer: load a checkpoint directory that holds "
                         "one, or set rm.tokenizer (e.g. cloud_jax.data.tokenizer.load_tokenizer)")
    return rm.tokenizer


def _check_texts(**named: Sequence[Any]) -> None:
    """Every element a string of valid Unicode: anything else (None, a number, chat messages, a
    lone surrogate) is named here rather than failing in the tokenizer."""
    for name, texts in named.items():
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}]: expected a string, got {type(text).__name__} "
                                f"{text!r:.60}")
            bad = lone_surrogate(text)
            if bad is not None:
                raise ValueError(f"{name}[{i}]: {bad}")


def _check_critiques(critiques: Sequence[str]) -> None:
    """A given critique must hold text: the layout reads the reward after it (an empty one is
    what a sampled critique that ended at once decodes to)."""
    for i, critique in enumerate(critiques):
        if not critique:
            raise ValueError(f"critiques[{i}]: empty; teacher forcing needs a critique to read "
                             "the reward after (score that input with a sampled critique, or "
                             "leave it out)")


def _positions(rm) -> int:
    """The positions the model was built for (its max_position_embeddings)."""
    return rm.config.max_position_embeddings


def _token_limit(rm, cfg: ScoreConfig, reserved: int = 0) -> tuple[int, str, str]:
    """(tokens an input may take, what sets that limit, how to fit it): ``cfg.max_length``
    (None: DEFAULT_MAX_LENGTH), or fewer where the model's positions less ``reserved`` (a sampled
    critique and its end-of-turn token) allow fewer. Where the two are equal the positions are
    named: a larger max_length would not fit more."""
    asked = DEFAULT_MAX_LENGTH if cfg.max_length is None else cfg.max_length
    positions = _positions(rm)
    room = positions - reserved
    if room > asked:
        return asked, f"max_length={asked}", "raise max_length or shorten"
    if not reserved:
        return room, f"the model's max_position_embeddings={positions}", "shorten"
    room = max(room, 0)
    return (room, f"the {room} tokens the model's max_position_embeddings={positions} "
            f"leaves after a critique of {reserved - 1} tokens and its end-of-turn token",
            "lower max_critique_tokens or shorten")


def fit_max_length(rm, max_length: int, reserved: int = 0) -> int:
    """``max_length`` held to what the model's positions leave after ``reserved`` tokens (a
    sampled critique's budget + 1 for its end-of-turn token; 0 for a classic model or a given
    critique): the limit :func:`score` applies, for a caller that passes a length the user did
    not choose for scoring (the pipeline's data.max_length, a server's --max-length), so that
    no warning names it. Unchanged where the positions leave no token (score then refuses
    every input, naming the positions)."""
    limit, _, _ = _token_limit(rm, ScoreConfig(max_length=max_length), reserved)
    return limit if limit >= 1 else max_length


def _warn_positions(rm, cfg: ScoreConfig, reserved: int = 0) -> None:
    """One warning where a max_length the caller gave (not None) is more than the model's
    positions allow after ``reserved`` tokens (the fewest any input reserves): inputs are cut
    to fit them instead."""
    if cfg.max_length is None:
        return
    limit, what, _ = _token_limit(rm, cfg, reserved)
    if limit < cfg.max_length:
        _warn_once(f"max_length={cfg.max_length} is more than the model's positions allow: "
                   f"inputs are held to {what}")


@dataclasses.dataclass(frozen=True)
class TooLong:
    """An input :func:`score` cannot read: even with its whole prompt cut away it takes
    ``tokens`` (its critique prefill; for a classic model, or a given critique, the whole
    sequence), over ``limit``, which ``what`` sets; ``detail`` says by how much and how to fit
    it (the InputTooLongError's message)."""

    index: int
    tokens: int
    limit: int
    what: str
    detail: str

    def error(self) -> InputTooLongError:
        return InputTooLongError(self.index, self.detail)


def _encode_whole_checked(rm, tok, prompts, responses, critiques, layout: str,
                          cfg: ScoreConfig, min_cuts: Optional[Sequence[int]] = None
                          ) -> tuple[list[Optional[Example]], list[TooLong]]:
    """Every input in ``layout``, its prompt cut from the left to fit ``cfg.max_length`` and the
    model's positions (and by ``min_cuts[i]`` tokens at least); None, and a :class:`TooLong`, for
    each that does not fit."""
    _warn_positions(rm, cfg)
    limit, what, fix = _token_limit(rm, cfg)
    examples, over = [], []
    for i, (p, r, c) in enumerate(zip(prompts, responses, critiques)):
        ex = encode_example(tok, p, r, c, layout, cfg.critique_prefix, limit,
                            "truncate_prompt", cfg.layout_version,
                            0 if min_cuts is None else int(min_cuts[i]))
        if ex is None:
            least = encode_example(tok, "", r, c, layout, cfg.critique_prefix, 1 << 30,
                                   "truncate_prompt", cfg.layout_version)
            over.append(TooLong(i, len(least.input_ids), limit, what,
                                f"longer than {what} tokens even with its whole prompt cut; {fix} "
                                + ("the response" if layout == "classic"
                                   else "the response or the critique")))
        examples.append(ex)
    return examples, over


def _encode_whole(rm, tok, prompts, responses, critiques, layout: str,
                  cfg: ScoreConfig, min_cuts: Optional[Sequence[int]] = None) -> list[Example]:
    """Every input in ``layout``, its prompt cut from the left to fit ``cfg.max_length`` and the
    model's positions, and by ``min_cuts[i]`` tokens at least (InputTooLongError for the first
    that does not fit)."""
    examples, over = _encode_whole_checked(rm, tok, prompts, responses, critiques, layout, cfg,
                                           min_cuts)
    if over:
        raise over[0].error()
    return examples


def _critique_prefixes(rm, tok, prompts, responses, cfg: ScoreConfig,
                       reserved: Sequence[int], min_cuts: Optional[Sequence[int]] = None
                       ) -> tuple[list[Optional[list[int]]], list[TooLong]]:
    """Each input's critique prefill, its prompt cut from the left to fit what ``cfg.max_length``
    and the model's positions leave after its ``reserved`` critique tokens (and by
    ``min_cuts[i]`` tokens at least); None, and a :class:`TooLong`, for each that does not fit."""
    prefixes, over = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        limit, what, fix = _token_limit(rm, cfg, reserved[i])
        try:
            prefixes.append(encode_critique_prefix(tok, p, r, cfg.critique_prefix,
                                                   limit, cfg.layout_version,
                                                   0 if min_cuts is None else int(min_cuts[i])))
        except ValueError:
            least = len(encode_critique_prefix(tok, "", r, cfg.critique_prefix, None,
                                               cfg.layout_version))
            prefixes.append(None)
            over.append(TooLong(i, least, limit, what,
                                f"the critique prefill is {least - limit} tokens over {what} "
                                f"even with the prompt cut away; {fix} the response"))
    return prefixes, over


def too_long(rm, prompts: Sequence[str], responses: Sequence[str],
             cfg: ScoreConfig = ScoreConfig()) -> list[TooLong]:
    """The inputs :func:`score` with ``cfg`` cannot read, in order (none: it scores them all):
    those whose response does not fit ``cfg.max_length``, or the model's positions less the
    critique budget, even with the whole prompt cut away. ``score`` raises InputTooLongError for
    the first; a caller that must go on scores the others (their critiques do not depend on
    which inputs are scored together, their rewards only up to float rounding)."""
    cfg.validate()
    cfg = dataclasses.replace(cfg, critique_prefix=resolve_critique_prefix(rm, cfg),
                              classic=resolve_classic(rm, cfg),
                              layout_version=resolve_layout_version(rm, cfg))
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    _check_texts(prompts=prompts, responses=responses)
    tok = _require_tokenizer(rm)
    if cfg.classic:
        return _encode_whole_checked(rm, tok, prompts, responses, [None] * len(prompts),
                                     "classic", cfg)[1]
    return _critique_prefixes(rm, tok, prompts, responses, cfg,
                              [1 + cfg.max_critique_tokens] * len(prompts))[1]


def prompt_tokens_cut(rm, prompts: Sequence[str], responses: Sequence[str],
                      cfg: ScoreConfig = ScoreConfig(),
                      critiques: Optional[Sequence[str]] = None) -> np.ndarray:
    """int [B]: the prompt tokens :func:`score` with ``cfg`` cuts from the left of each input to
    fit ``cfg.max_length`` and the model's positions (0: the input fits whole). An input
    :func:`too_long` lists gets more than its prompt holds. A pair's evaluation passes the larger
    of its two sides' cuts to both (``score``'s ``min_prompt_cuts``), so chosen and rejected are
    rewarded after the same prompt. With ``critiques``: what :func:`teacher_forced_rewards`
    cuts, reading each input after its critique."""
    cfg.validate()
    cfg = dataclasses.replace(cfg, critique_prefix=resolve_critique_prefix(rm, cfg),
                              classic=resolve_classic(rm, cfg),
                              layout_version=resolve_layout_version(rm, cfg))
    if len(prompts) != len(responses) or (critiques is not None
                                          and len(critiques) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses"
                         + ("" if critiques is None else f" and {len(critiques)} critiques"))
    _check_texts(prompts=prompts, responses=responses,
                 **({} if critiques is None else {"critiques": critiques}))
    if critiques is not None:
        _check_critiques(critiques)
    tok = _require_tokenizer(rm)
    if critiques is not None or cfg.classic:  # one forward over the whole input
        method = "classic" if critiques is None else "critique"
        limit = _token_limit(rm, cfg)[0]
        lengths = [len(encode_example(tok, p, r, c, method, cfg.critique_prefix, 1 << 30,
                                      "truncate_prompt", cfg.layout_version).input_ids)
                   for p, r, c in zip(prompts, responses,
                                      [None] * len(prompts) if critiques is None else critiques)]
    else:
        limit = _token_limit(rm, cfg, 1 + cfg.max_critique_tokens)[0]
        lengths = [len(encode_critique_prefix(tok, p, r, cfg.critique_prefix, None,
                                              cfg.layout_version))
                   for p, r in zip(prompts, responses)]
    return np.maximum(np.asarray(lengths, np.int64) - limit, 0)


def _check_on_batch(on_batch) -> None:
    """Checked before any batch runs: a value that is no function otherwise failed only after the
    first batch had been scored."""
    if on_batch is not None and not callable(on_batch):
        raise TypeError(f"on_batch={on_batch!r:.60}: must be callable as on_batch(inputs, "
                        "critique_tokens), or None")


def _check_min_prompt_cuts(min_prompt_cuts: Optional[Sequence[int]], n: int) -> None:
    if min_prompt_cuts is None:
        return
    # Each a whole number: int() further down would cut 1.5 to 1 without a word.
    for i, cut in enumerate(min_prompt_cuts):
        if isinstance(cut, (bool, np.bool_)) or not isinstance(
                cut, (int, float, np.integer, np.floating)) or not float(cut).is_integer():
            shown = cut.item() if isinstance(cut, np.generic) else cut
            raise ValueError(f"min_prompt_cuts[{i}]={shown!r:.40}: each must be a whole number of "
                             "prompt tokens >= 0")
    if len(min_prompt_cuts) != n or min(min_prompt_cuts, default=0) < 0:
        raise ValueError(f"min_prompt_cuts: one count >= 0 per input ({n})")


def _forward_rewards(rm, examples: Sequence[Example], cfg: ScoreConfig, on_batch) -> np.ndarray:
    """float32 [N]: each example's reward at its reward index, ``cfg.batch_size`` per forward."""
    vocab = rm.config.vocab_size
    for i, ex in enumerate(examples):  # the embedding has no row for such a token: NaN rewards
        outside = np.flatnonzero((ex.input_ids < 0) | (ex.input_ids >= vocab))
        if outside.size:
            raise ValueError(f"input {i}: token id {int(ex.input_ids[outside[0]])} at position "
                             f"{int(outside[0])} is not in the model's vocabulary [0, {vocab}) "
                             "(is the tokenizer the model's own?)")
    rewards = np.zeros(len(examples), np.float32)
    rows = min(cfg.batch_size, len(examples))
    for start, end in _batches(len(examples), cfg.batch_size):
        chunk = examples[start:end]
        # A short last batch is filled up with copies, so every batch has one compiled shape.
        chunk = chunk + [chunk[0]] * (rows - len(chunk))
        length = bucket_length(max(len(ex.input_ids) for ex in chunk), cfg.length_buckets)
        ids, mask = pad_prefixes([ex.input_ids.tolist() for ex in chunk], length, side="right")
        index = np.asarray([ex.reward_index for ex in chunk], np.int32)
        rewards[start:end] = np.asarray(sequence_rewards(rm.params, ids, mask, index,
                                                         cfg=rm.config))[:end - start]
        if on_batch is not None:
            on_batch(end - start, 0)
    return rewards


def _score_classic(rm, prompts, responses, cfg: ScoreConfig, on_batch,
                   min_cuts: Optional[Sequence[int]] = None) -> ScoreResult:
    examples = _encode_whole(rm, _require_tokenizer(rm), prompts, responses,
                             [None] * len(prompts), "classic", cfg, min_cuts)
    rewards = _forward_rewards(rm, examples, cfg, on_batch)
    n = len(examples)
    return ScoreResult(rewards=rewards, sample_rewards=rewards[:, None],
                       reward_std=np.zeros(n, np.float32), critiques=[[] for _ in range(n)],
                       truncated=np.zeros((n, 1), bool), critique_tokens=np.zeros((n, 1), np.int32))


def teacher_forced_rewards(rm, prompts: Sequence[str], responses: Sequence[str],
                           critiques: Sequence[str], cfg: ScoreConfig = ScoreConfig(),
                           on_batch: Optional[Callable[[int, int], None]] = None,
                           min_prompt_cuts: Optional[Sequence[int]] = None) -> np.ndarray:
    """float32 [B]: the reward a CLoud model gives each (prompt, response) after the critique
    given (e.g. the oracle's) rather than one it samples, read by one forward over
    ``[prompt][response][critique prefix + critique]<end-of-turn>``. Uses ``cfg``'s
    ``batch_size``, ``max_length``, ``critique_prefix`` and ``length_buckets``.
    ``min_prompt_cuts`` [B], optional, as :func:`score`'s (a pair gives both sides the larger of
    their :func:`prompt_tokens_cut` with ``critiques``)."""
    cfg.validate()
    cfg = dataclasses.replace(cfg, critique_prefix=resolve_critique_prefix(rm, cfg),
                              layout_version=resolve_layout_version(rm, cfg))
    if not len(prompts) == len(responses) == len(critiques):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and "
                         f"{len(critiques)} critiques: one each per input")
    _check_texts(prompts=prompts, responses=responses, critiques=critiques)
    _check_critiques(critiques)
    _check_min_prompt_cuts(min_prompt_cuts, len(prompts))
    _check_on_batch(on_batch)
    examples = _encode_whole(rm, _require_tokenizer(rm), prompts, responses, critiques,
                             "critique", cfg, min_prompt_cuts)
    return _forward_rewards(rm, examples, cfg, on_batch)


def resolve_layout_version(rm, cfg: ScoreConfig) -> int:
    """The critique-turn tokenization to score with: ``cfg``'s, else the model's own."""
    if cfg.layout_version is not None:
        return cfg.layout_version
    return getattr(rm, "layout_version", None) or LAYOUT_VERSION


def resolve_classic(rm, cfg: ScoreConfig) -> bool:
    """Whether to score without critiques: ``cfg.classic`` if set, else the model's kind."""
    model_classic = getattr(rm, "feedback_method", "teacher") == "vanilla"
    if cfg.classic is None:
        return model_classic
    if model_classic and not cfg.classic:
        _warn_once("sampling critiques from a classic (feedback_method 'vanilla') model: it was "
                   "not trained to write them")
    return bool(cfg.classic)


def resolve_critique_prefix(rm, cfg: ScoreConfig) -> str:
    """The prefix to score with: ``cfg``'s, else the model's own, else CRITIQUE_PREFIX."""
    trained = getattr(rm, "critique_prefix", None)
    if cfg.critique_prefix is None:
        return CRITIQUE_PREFIX if trained is None else trained
    if trained is not None and cfg.critique_prefix != trained:
        _warn_once(f"scoring with critique_prefix {cfg.critique_prefix!r}, but the model was "
                   f"trained with {trained!r}")
    return cfg.critique_prefix


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def warn_greedy_samples(num_samples: int) -> None:
    """The warning, once per process and K, that K > 1 critiques at temperature 0 are K copies
    of the greedy one (rm.score's; ``evaluate`` gives it before scoring, not a second one)."""
    _warn_once(f"num_samples={num_samples} at temperature 0: greedy decoding writes the same "
               "critique K times, so the mean is the K = 1 reward at K times the cost (and a "
               "sweep over K measures nothing); set a temperature (e.g. 0.7) or num_samples=1")


def score(rm, prompts: Sequence[str], responses: Sequence[str], cfg: ScoreConfig = ScoreConfig(),
          on_batch: Optional[Callable[[int, int], None]] = None,
          budgets: Optional[Sequence[int]] = None,
          min_prompt_cuts: Optional[Sequence[int]] = None) -> ScoreResult:
    """Scores every (prompt, response); ``rm`` is a :class:`cloud_jax.RewardModel`.

    ``on_batch(inputs_done, critique_tokens)`` is called after each batch (progress bars).
    A fixed seed gives the same critiques whatever the batch size or input order: each input's
    random stream derives from its tokens.

    ``budgets`` [B], optional: each input's own critique budget in place of
    ``cfg.max_critique_tokens`` (results equal scoring each input with its own). Batches compile
    for ``cfg.max_critique_tokens`` when no budget is over it (one decode length whatever the
    budgets: the static server passes its budget limit), else for the largest budget rounded up
    to a power of two.

    ``min_prompt_cuts`` [B], optional: prompt tokens each input loses from the left however short
    it is (more where it must, to fit; at most its whole prompt). Pair evaluation gives both
    sides of a pair the larger of their :func:`prompt_tokens_cut`, so the two rewards read one
    prompt; without it each input loses only what it must.
    """
    cfg.validate()
    asked_classic = cfg.classic
    cfg = dataclasses.replace(cfg, critique_prefix=resolve_critique_prefix(rm, cfg),
                              classic=resolve_classic(rm, cfg),
                              layout_version=resolve_layout_version(rm, cfg))
    # Once per setting (not once per call: a reward function scores every trainer step).
    if cfg.classic and cfg.num_samples > 1:
        why = ("with classic=True" if asked_classic else
               "on a classic (feedback_method 'vanilla') model")
        _warn_once(f"num_samples={cfg.num_samples} {why}: a classic reward model writes no "
                   "critiques, so K is 1 (one reward per response); drop num_samples, or pass "
                   "classic=False to sample critiques")
    elif not cfg.classic and cfg.num_samples > 1 and cfg.temperature == 0:
        warn_greedy_samples(cfg.num_samples)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("nothing to score: no prompts given")
    _check_texts(prompts=prompts, responses=responses)
    _check_min_prompt_cuts(min_prompt_cuts, len(prompts))
    _check_on_batch(on_batch)
    if cfg.classic:
        return _score_classic(rm, prompts, responses, cfg, on_batch, min_prompt_cuts)
    tok = _require_tokenizer(rm)
    stop_ids = end_of_turn_ids(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if budgets is not None and (len(budgets) != len(prompts) or min(budgets) < 0):
        raise ValueError(f"budgets: one critique budget >= 0 per input ({len(prompts)})")
    # Each input's critique (its budget, then the end-of-turn token) takes positions after its
    # prefill: the prefill gets what the model's positions leave, at most max_length.
    reserved = [1 + (cfg.max_critique_tokens if budgets is None else budgets[i])
                for i in range(len(prompts))]
    _warn_positions(rm, cfg, min(reserved))
    prefixes, over = _critique_prefixes(rm, tok, prompts, responses, cfg, reserved,
                                        min_prompt_cuts)
    if over:
        raise over[0].error()
    model_cfg, params = _sampling_params(rm)
    # The decode's weight layout for this machine; the feature-major weights are prepared once
    # for every batch of this call.
    layout = decode_layout(model_cfg, rm.mesh)
    weights = (prepare_decode_weights_jit(params, cfg=model_cfg) if layout == "feature_major"
               else None)
    method = method_from(cfg.temperature, cfg.top_k, cfg.top_p)
    n, k, m = len(prefixes), cfg.num_samples, cfg.max_critique_tokens
    if budgets is not None and max(budgets) > m:
        m = max(16, 1 << (max(budgets) - 1).bit_length())
    tokens = np.zeros((n, k, m), np.int32)
    lengths = np.zeros((n, k), np.int32)
    rewards = np.zeros((n, k), np.float32)
    truncated = np.zeros((n, k), bool)
    # Rows per prefill: on a mesh, a multiple of the devices the batch is split over.
    split = 1 if rm.mesh is None else rm.mesh.shape["data"] * rm.mesh.shape["fsdp"]
    rows = -(-min(cfg.batch_size, n) // split) * split
    # Similar lengths share a batch (less padding); critiques do not depend on the grouping,
    # rewards only up to float rounding (the padded length changes the order of float sums).
    order = sorted(range(n), key=lambda i: len(prefixes[i]))
    for start, end in _batches(n, cfg.batch_size):
        idx = order[start:end]
        chunk = [prefixes[i] for i in idx]
        # A short last batch is filled up with copies, so every batch has one compiled shape.
        filler = [chunk[0]] * (rows - len(chunk))
        out = sample(model_cfg, params, chunk + filler, max_new_tokens=m, stop_ids=stop_ids,
                     num_samples=k, method=method, seed=cfg.seed, pad_id=pad_id,
                     buckets=cfg.length_buckets or None, mesh=rm.mesh, rules=SAMPLE_RULES,
                     repetition_penalty=cfg.repetition_penalty, decode_layout=layout,
                     decode_weights=weights, steps_per_check=cfg.steps_per_check,
                     decode_phases=cfg.decode_phases,
                     budgets=None if budgets is None else
                     [budgets[i] for i in idx] + [budgets[idx[0]]] * len(filler))
        real = slice(0, len(chunk))
        tokens[idx], lengths[idx] = out.tokens[real], out.lengths[real]
        rewards[idx], truncated[idx] = out.rewards[real], out.truncated[real]
        if on_batch is not None:
            on_batch(len(chunk), int(out.lengths[real].sum()))
    layout = chat_layout(tok)
    critiques = [[layout.critique_text(tok.decode(tokens[b, j, :lengths[b, j]].tolist(),
                                                  skip_special_tokens=True),
                                       cfg.critique_prefix, cfg.layout_version)
                  for j in range(k)] for b in range(n)]
    return ScoreResult(rewards=rewards.mean(axis=1), sample_rewards=rewards,
                       reward_std=rewards.std(axis=1), critiques=critiques, truncated=truncated,
                       critique_tokens=lengths)
