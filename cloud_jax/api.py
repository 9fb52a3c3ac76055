"""The Python surface: ``cloud_jax.load(path)`` -> :class:`RewardModel`.

    rm = cloud_jax.load("path/to/cloud_or_hf_dir")      # or a hub id, where the network allows
    logits, rewards = rm.forward(input_ids, attention_mask)
    rm.save_pretrained("out_dir")                       # the reference CLoud layout
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cloud_jax import storage
from cloud_jax.checkpoints import hf as hf_io
from cloud_jax.data.config import LAYOUT_VERSION, LAYOUT_VERSIONS
from cloud_jax.model.config import ModelConfig
from cloud_jax.model import CLoudModel, init_params, last_attended_index, mesh_context
from cloud_jax.sharding import TRAIN_RULES, Rules

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardModel:
    """A CLoud reward model: config, parameters (a pytree of jax arrays) and optional tokenizer."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None
    mesh: Optional[Mesh] = None
    rules: Rules = TRAIN_RULES
    base_model_name_or_path: Optional[str] = None
    # The text the model was trained to write its critiques after (stored in the checkpoint by
    # training); scoring uses it unless told otherwise. None: not known, the default is used.
    critique_prefix: Optional[str] = None
    # "teacher": writes a critique before its reward; "vanilla": a classic reward model, scored by
    # one forward (the reference's two values, read from and written to config.json).
    feedback_method: str = "teacher"
    # How its rows are tokenized (cloud_jax.data.config.LAYOUT_VERSIONS); scoring follows
    # it. Read from and written to config.json.
    layout_version: int = LAYOUT_VERSION

    def __post_init__(self):
        if self.feedback_method not in hf_io.FEEDBACK_METHODS:
            raise ValueError(f"feedback_method={self.feedback_method!r}: expected one of "
                             f"{', '.join(hf_io.FEEDBACK_METHODS)}")
        if self.layout_version is not None and self.layout_version not in LAYOUT_VERSIONS:
            raise ValueError(f"layout_version={self.layout_version!r}: expected one of "
                             f"{', '.join(map(str, LAYOUT_VERSIONS))}")

    @property
    def is_classic(self) -> bool:
        """A classic (``vanilla``) model: ``score`` reads its rewards without critiques."""
        return self.feedback_method == "vanilla"

    @property
    def module(self) -> CLoudModel:
        return CLoudModel(self.config)

    def forward(self, input_ids, attention_mask=None) -> tuple[jax.Array, jax.Array]:
        """``(logits [B,T,V] fp32, rewards [B] fp32)``; each reward is read at the row's last
        attended position, whether the batch is left- or right-padded."""
        # Checked before the int32 cast, which would truncate fractions and wrap large ids (a jax
        # array, which may span hosts, is checked where it lies).
        xp = jnp if isinstance(input_ids, jax.Array) else np
        given = _as_batch(xp, input_ids, "input_ids")
        if given.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {given.shape}")
        if given.size == 0:
            raise ValueError(f"input_ids is empty (shape {given.shape}): nothing to run")
        if not np.issubdtype(given.dtype, np.integer):
            raise TypeError(f"input_ids must be integer token ids, got dtype {given.dtype}")
        if int(xp.max(given)) >= self.config.vocab_size or int(xp.min(given)) < 0:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size})")
        ids = jnp.asarray(given, jnp.int32)
        if attention_mask is None:
            mask = jnp.ones_like(ids)
        else:
            given_mask = _as_batch(xp, attention_mask, "attention_mask")
            if given_mask.size and not bool(xp.all((given_mask == 0) | (given_mask == 1))):
                raise ValueError("attention_mask holds values other than 0 or 1 (1: attended, "
                                 "0: padding)")
            mask = jnp.asarray(given_mask, jnp.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if not bool(jnp.all(jnp.any(mask > 0, axis=1))):
            raise ValueError("every row needs at least one attended token (attention_mask=1)")
        # Imported here: scoring loads transformers (seconds), which `import cloud_jax` should not.
        from cloud_jax.scoring.rewards import sequence_rewards

        with mesh_context(self.mesh, self.rules):
            return sequence_rewards(self.params, ids, mask, last_attended_index(mask),
                                    cfg=self.config, return_logits=True)

    def score(self, prompts, responses, *, num_samples: int = 1, temperature: float = 0.0,
              max_critique_tokens: int = 256, seed: int = 0,
              on_batch: Optional[Callable[[int, int], None]] = None,
              min_prompt_cuts: Optional[Sequence[int]] = None, **settings):
        """Critiques and rewards for every (prompt, response): K critiques each (greedy at
        temperature 0), the reward read at each critique's end-of-turn token.

        Returns a :class:`cloud_jax.scoring.rewards.ScoreResult`: ``rewards`` [B] (mean over samples),
        ``sample_rewards`` [B, K], ``reward_std`` [B], ``critiques`` [B][K], ``truncated`` [B, K].
        ``settings`` are further :class:`cloud_jax.scoring.rewards.ScoreConfig` fields (``top_k``,
        ``top_p``, ``batch_size``, ``classic``, ...). ``classic`` defaults to the model's own kind:
        a ``vanilla`` checkpoint is scored without critiques. ``on_batch(inputs, critique_tokens)``,
        if given, is called after each batch with that batch's inputs and critique tokens (a
        progress bar's update). An input too long for ``max_length`` (or the model's positions
        less the critique budget) loses prompt tokens from the left, as few as fit;
        ``min_prompt_cuts`` [B], optional, cuts at least that many from each (pair evaluation
        gives both sides of a pair the larger of their :meth:`prompt_tokens_cut`, so that
        their rewards read one prompt).
        """
        from cloud_jax.scoring.rewards import ScoreConfig, score

        _check_lists("score", prompts, responses)
        cfg = ScoreConfig.from_settings("rm.score", dict(
            num_samples=num_samples, temperature=temperature,
            max_critique_tokens=max_critique_tokens, seed=seed, **settings), ("on_batch",))
        return score(self, list(prompts), list(responses), cfg, on_batch,
                     min_prompt_cuts=min_prompt_cuts)

    def prompt_tokens_cut(self, prompts, responses, *, max_critique_tokens: int = 256,
                          **settings):
        """int [B]: the prompt tokens :meth:`score` with the same settings cuts from the left of
        each (prompt, response) to fit (0: it fits whole)."""
        from cloud_jax.scoring.rewards import ScoreConfig, prompt_tokens_cut

        _check_lists("prompt_tokens_cut", prompts, responses)
        cfg = ScoreConfig.from_settings("rm.prompt_tokens_cut", dict(
            max_critique_tokens=max_critique_tokens, **settings))
        return prompt_tokens_cut(self, list(prompts), list(responses), cfg)

    def save_pretrained(self, directory: str | os.PathLike, *,
                        base_model_name_or_path: Optional[str] = None):
        """Writes the reference CLoud layout (safetensors + config.json) and the tokenizer to a
        local directory (returned as a Path) or a ``gs://`` / ``s3://`` URL (returned as is)."""
        with hf_io.staged_export(directory) as local:
            out = hf_io.save_cloud_reference(
                self.params, self.config, local,
                base_model_name_or_path=base_model_name_or_path or self.base_model_name_or_path,
                critique_prefix=self.critique_prefix, feedback_method=self.feedback_method,
                layout_version=self.layout_version)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(out))
        return os.fspath(directory) if storage.is_url(directory) else out


def _as_batch(xp, value, name: str):
    """``value`` as an array; rows of different lengths (lists of ids) are refused naming
    ``name`` and saying to pad, not with numpy's message about an inhomogeneous shape."""
    try:
        return xp.asarray(value)
    except (ValueError, TypeError):
        if not isinstance(value, (list, tuple)):
            raise
        lengths = [len(row) if isinstance(row, (list, tuple, np.ndarray)) else None
                   for row in value]
        if len(set(lengths)) < 2:
            raise
        shown = ", ".join("not a row" if n is None else str(n) for n in lengths[:8])
        raise ValueError(
            f"{name} has rows of different lengths ({shown}{', ...' if len(lengths) > 8 else ''}"
            "): pad every row to one length and pass input_ids and attention_mask (1: token, "
            "0: padding) of shape [batch, length], e.g. a tokenizer's output with "
            "padding=True") from None


def _check_lists(method: str, prompts, responses) -> None:
    """One pair given as two strings is refused, not read as pairs of characters."""
    for name, value in (("prompts", prompts), ("responses", responses)):
        if isinstance(value, (str, bytes)):
            raise TypeError(f"{name} must be a list of texts, got one {type(value).__name__} "
                            f"(for one pair: rm.{method}([prompt], [response]))")


def _load_tokenizer(directory: Path):
    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                        "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    # Never trust_remote_code: a checkpoint from a stranger must not run code on load.
    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def load(path: str | os.PathLike, *, mesh: Optional[Mesh] = None, rules: Rules = TRAIN_RULES,
         seed: int = 0, **config_overrides) -> RewardModel:
    """Loads a CLoud reward model from a reference-layout directory, or a plain HF Llama / Mistral /
    Qwen2 directory (the reward head then starts from random init, with a warning: its rewards
    are random until it is trained), or a hub id. A directory may
    be a ``gs://`` / ``s3://`` URL: it is downloaded into the local cache first
    (``cloud_jax.storage.local_copy``).

    ``config_overrides`` replace ModelConfig fields, e.g. ``dtype="bfloat16"`` or
    ``scan_layers=True``.
    """
    cfg, params, directory, raw = hf_io.load_model_dir(
        path, mesh=mesh, rules=rules, rng=jax.random.key(seed),
        fresh_head_log_level=logging.WARNING, **config_overrides)
    cloud = hf_io.is_cloud_reference(raw)
    # The hub id the model descends from, where one is known (exports record it).
    base_name = hf_io.base_model_name_of(path)
    prefix = raw.get("critique_prefix") if cloud else None
    if prefix is not None and not isinstance(prefix, str):
        raise hf_io.CheckpointError(f"{directory}/config.json: critique_prefix must be a string, "
                                    f"got {prefix!r}")
    feedback = hf_io.feedback_method_of(directory, raw)
    return RewardModel(cfg, params, _load_tokenizer(directory), mesh, rules, base_name, prefix,
                       feedback, hf_io.layout_version_of(directory, raw))


def from_config(cfg: ModelConfig, *, seed: int = 0, mesh: Optional[Mesh] = None,
                rules: Rules = TRAIN_RULES, tokenizer=None) -> RewardModel:
    """A randomly initialised model (tiny CPU configs, tests, demos)."""
    return RewardModel(cfg, init_params(cfg, jax.random.key(seed), mesh, rules), tokenizer, mesh,
                       rules)
