"""Training losses and metrics: masked LM cross-entropy, Bradley-Terry, pairwise metrics.

Every term is computed in fp32 whatever dtype the model computes in.

Sums and counts, not means. Each loss here returns ``(sum, count)`` and every metric is a dict of
sums and counts, so that gradient accumulation over micro-batches is exact. Averaging
per-micro-batch means would weight a micro-batch with 10 critique tokens the same as one with
1,000; instead the train step divides every micro-batch's sum by the count of the *whole* batch
(:func:`loss_normalizers`), so the accumulated gradient equals the full-batch gradient. Metric dicts
add with ``jax.tree.map(jnp.add, a, b)`` across micro-batches or steps; :func:`finalize_metrics`
turns the totals into means.

Batch layout (pair axis: index 0 = chosen row, 1 = rejected row)::

    targets, loss_mask  [P, 2, T]    next token at each position / 1 where it is a training target
    reward_index        [P, 2]       consumed by the model; rewards arrive already gathered
    pair_valid          [P]          0 marks a padding pair, which contributes nothing anywhere
    logits              [P, 2, T, V] model output
    rewards             [P, 2]       model output
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from cloud_jax.errors import ConfigError
from cloud_jax.training.stages import stage as stage_record

F32 = jnp.float32



@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights for the training stages (the reference: lm_coef 1.25 for 8B, 0.75 for 70B)."""

    # Weight of the critique LM loss in the `cloud` stage; unused by the other stages.
    lm_coef: float = 1.25
    # Required reward gap: BT becomes -log sigmoid(r_c - r_r - margin). 0 is the plain BT loss.
    margin: float = 0.0
    # TRL-style reward centering, center_coef * mean((r_c + r_r)^2); keeps rewards near zero.
    center_coef: float = 0.0
    # The LM loss is computed this many sequence positions at a time, with no [B, T, V] logits
    # array; a chunk without target tokens (prompt, response, padding) skips the LM head.
    # 0: the whole logits array at once.
    lm_chunk_size: int = 256

    def validate(self) -> "LossConfig":
        for key in ("lm_coef", "center_coef", "lm_chunk_size"):
            if not 0 <= getattr(self, key) < math.inf:  # NaN too
                raise ConfigError(f"loss.{key}={getattr(self, key)}: must be a finite number "
                                  ">= 0")
        if not math.isfinite(self.margin):
            raise ConfigError(f"loss.margin={self.margin}: must be a finite number")
        return self


def _safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    # An empty batch (no target tokens, no valid pairs) has sum 0; dividing by 1 gives 0, not NaN.
    return total / jnp.maximum(count, 1.0)


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over the masked positions, and how many there are.

    Args:
      logits: ``[..., T, V]`` in any float dtype; cast to fp32 first.
      targets: ``[..., T]`` integer token ids. Where ``loss_mask`` is 0 the value is never read, so
        padding may hold any id (also -100 or out-of-vocabulary ids).
      loss_mask: ``[..., T]``; nonzero marks a target token.

    Returns:
      ``(loss_sum, token_count)``, both fp32 scalars. Divide by the token count of the whole batch,
      not of a micro-batch (see the module docstring).
    """
    logits = logits.astype(F32)
    mask = loss_mask != 0
    safe_targets = jnp.where(mask, targets, 0)
    # log_softmax(logits)[target] = logits[target] - logsumexp(logits); written this way so no
    # second [..., T, V] array of log-probabilities is materialised.
    target_logits = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    loss_sum = jnp.sum(jnp.where(mask, nll, 0.0))
    return loss_sum, jnp.sum(mask, dtype=F32)


def lm_loss_mean(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy per target token of this batch; 0 when it has no target tokens."""
    return _safe_divide(*lm_loss(logits, targets, loss_mask))


def _pair_inputs(r_chosen, r_rejected, pair_valid):
    valid = pair_valid != 0
    # Zeroing padding pairs before any arithmetic keeps a NaN or inf reward on a padding row out
    # of the values and out of the reward gradients (a masked NaN still poisons a product's grad).
    r_chosen = jnp.where(valid, r_chosen.astype(F32), 0.0)
    r_rejected = jnp.where(valid, r_rejected.astype(F32), 0.0)
    return r_chosen, r_rejected, valid


def _bt_terms(r_chosen, r_rejected, pair_valid, margin):
    """Per-pair BT negative log-likelihood and centering term, zero on padding pairs; [P] each."""
    r_c, r_r, valid = _pair_inputs(r_chosen, r_rejected, pair_valid)
    gap = r_c - r_r
    if margin is not None:
        gap = gap - jnp.asarray(margin, F32)
    nll = jnp.where(valid, -jax.nn.log_sigmoid(gap), 0.0)
    center = jnp.where(valid, jnp.square(r_c + r_r), 0.0)
    return nll, center, jnp.sum(valid, dtype=F32)


def bt_loss(r_chosen: jax.Array, r_rejected: jax.Array, pair_valid: jax.Array,
            margin: Optional[jax.Array | float] = None, center_coef: float = 0.0
            ) -> tuple[jax.Array, jax.Array]:
    """Summed Bradley-Terry loss with optional margin and reward centering, and the pair count.

    Per valid pair: ``-log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2``. Divided by
    the pair count this is TRL's ``RewardTrainer`` loss. ``log_sigmoid`` keeps it finite for any
    gap.

    Args:
      r_chosen, r_rejected: ``[P]`` rewards, any float dtype.
      pair_valid: ``[P]``; 0 marks a padding pair.
      margin: None, a scalar, or ``[P]`` per-pair margins.
      center_coef: weight of the centering term.

    Returns:
      ``(loss_sum, pair_count)``, fp32 scalars; divide by the pair count of the whole batch.
    """
    nll, center, count = _bt_terms(r_chosen, r_rejected, pair_valid, margin)
    return jnp.sum(nll) + center_coef * jnp.sum(center), count


def bt_loss_mean(r_chosen, r_rejected, pair_valid, margin=None, center_coef: float = 0.0):
    """Mean of :func:`bt_loss` over the valid pairs; 0 when there are none."""
    return _safe_divide(*bt_loss(r_chosen, r_rejected, pair_valid, margin, center_coef))


def pair_metrics(r_chosen: jax.Array, r_rejected: jax.Array, pair_valid: jax.Array
                 ) -> dict[str, jax.Array]:
    """Sums for pairwise accuracy, mean margin and reward mean/std; finish with finalize_metrics.

    A tie (``r_c == r_r``) counts as wrong, as in TRL and RewardBench: a reward model that has
    collapsed to a constant then scores 0 accuracy rather than a flattering 0.5.
    """
    r_c, r_r, valid = _pair_inputs(r_chosen, r_rejected, pair_valid)
    return {
        "pairs": jnp.sum(valid, dtype=F32),
        "correct": jnp.sum(valid & (r_c > r_r), dtype=F32),
        "margin_sum": jnp.sum(r_c - r_r),
        "chosen_sum": jnp.sum(r_c),
        "chosen_sq_sum": jnp.sum(jnp.square(r_c)),
        "rejected_sum": jnp.sum(r_r),
        "rejected_sq_sum": jnp.sum(jnp.square(r_r)),
    }


def _std(sq_sum, total, count):
    mean = _safe_divide(total, count)
    # E[x^2] - E[x]^2 can dip below 0 by rounding; rewards are O(1-10), so fp32 keeps it accurate.
    return jnp.sqrt(jnp.maximum(_safe_divide(sq_sum, count) - jnp.square(mean), 0.0))


def finalize_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from accumulated metric sums (from :func:`stage_loss` or :func:`pair_metrics`).

    Standard deviations are population ones (ddof 0). Empty counts give 0, never NaN.
    """
    out: dict[str, jax.Array] = {}
    if "lm_tokens" in sums:
        out["lm_loss"] = _safe_divide(sums["lm_loss_sum"], sums["lm_tokens"])
        out["lm_tokens"] = sums["lm_tokens"]
    if "pairs" in sums:
        n = sums["pairs"]
        out["pairs"] = n
        if "bt_loss_sum" in sums:
            out["bt_loss"] = _safe_divide(sums["bt_loss_sum"], n)
            out["center"] = _safe_divide(sums["center_sum"], n)
        out["accuracy"] = _safe_divide(sums["correct"], n)
        out["margin"] = _safe_divide(sums["margin_sum"], n)
        out["chosen_mean"] = _safe_divide(sums["chosen_sum"], n)
        out["chosen_std"] = _std(sums["chosen_sq_sum"], sums["chosen_sum"], n)
        out["rejected_mean"] = _safe_divide(sums["rejected_sum"], n)
        out["rejected_std"] = _std(sums["rejected_sq_sum"], sums["rejected_sum"], n)
    return out


def _require(mapping: Mapping, key: str, what: str, stage: str):
    if key not in mapping:
        raise KeyError(f"stage {stage!r} needs {what}[{key!r}]; {what} has keys {sorted(mapping)}")
    return mapping[key]


def lm_target_mask(batch: Mapping, stage: str) -> jax.Array:
    """[P, 2, T] bool: the LM target positions of the valid pairs."""
    loss_mask = _require(batch, "loss_mask", "batch", stage)
    pair_valid = _require(batch, "pair_valid", "batch", stage)
    # A padding pair contributes no tokens even if its loss_mask was left nonzero.
    return (loss_mask != 0) & (pair_valid != 0)[:, None, None]


def loss_normalizers(stage: str, batch: Mapping) -> dict[str, jax.Array]:
    """Token and pair counts of a whole batch, the denominators for its micro-batches.

    Under gradient accumulation, compute these once on the full batch and pass them to
    :func:`stage_loss` for every micro-batch: the micro-batch losses then add up to the full-batch
    loss, and so do their gradients.
    """
    record = stage_record(stage)
    out = {}
    if record.lm_loss:
        out["lm_tokens"] = jnp.sum(lm_target_mask(batch, stage), dtype=F32)
    if record.bt_loss:
        out["pairs"] = jnp.sum(_require(batch, "pair_valid", "batch", stage) != 0, dtype=F32)
    return out


def stage_loss(stage: str, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
               lm_coef: float = LossConfig.lm_coef, margin: Optional[jax.Array | float] = None,
               center_coef: float = LossConfig.center_coef,
               normalizers: Optional[Mapping[str, jax.Array]] = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss to differentiate for one training stage, and additive metric sums.

    ``critique_sft`` and ``lm_pretrain``: LM. ``classic``: BT (+ centering). ``cloud``:
    BT (+ centering) ``+ lm_coef * LM``. Each term is its sum divided by the matching count in
    ``normalizers`` (default: this batch's own counts, see :func:`loss_normalizers`).

    Args:
      stage: a name from :data:`cloud_jax.training.stages.STAGES`.
      outputs: ``{"logits": [P, 2, T, V], "rewards": [P, 2]}``; only what the stage uses is read.
        Instead of logits, ``"lm": (loss_sum, token_count)`` of the LM loss already computed over
        :func:`lm_target_mask` (the model's chunked LM loss).
      batch: the training batch (``targets``, ``loss_mask``, ``pair_valid`` are read).
      lm_coef, margin, center_coef: see :class:`LossConfig`; ignored by stages without the term.
      normalizers: whole-batch counts when this is one micro-batch of it.

    Returns:
      ``(loss, metric_sums)``; ``metric_sums`` holds only sums and counts, so it adds across
      micro-batches and steps; :func:`finalize_metrics` turns it into means.
    """
    record = stage_record(stage)
    if normalizers is None:
        normalizers = loss_normalizers(stage, batch)
    loss = jnp.zeros((), F32)
    sums: dict[str, jax.Array] = {}
    if record.lm_loss:
        if "lm" in outputs:  # computed with the forward (chunked, see LossConfig.lm_chunk_size)
            lm_sum, lm_tokens = outputs["lm"]
        else:
            logits = _require(outputs, "logits", "outputs", stage)
            targets = _require(batch, "targets", "batch", stage)
            lm_sum, lm_tokens = lm_loss(logits, targets, lm_target_mask(batch, stage))
        sums.update(lm_loss_sum=lm_sum, lm_tokens=lm_tokens)
        lm_term = _safe_divide(lm_sum, _require(normalizers, "lm_tokens", "normalizers", stage))
        loss = loss + (lm_coef * lm_term if record.lm_coef_applies else lm_term)
    if record.bt_loss:
        rewards = _require(outputs, "rewards", "outputs", stage)
        pair_valid = _require(batch, "pair_valid", "batch", stage)
        r_chosen, r_rejected = rewards[:, 0], rewards[:, 1]
        nll, center, _ = _bt_terms(r_chosen, r_rejected, pair_valid, margin)
        bt_sum, center_sum = jnp.sum(nll), jnp.sum(center)
        pairs = _require(normalizers, "pairs", "normalizers", stage)
        loss = loss + _safe_divide(bt_sum + center_coef * center_sum, pairs)
        sums.update(bt_loss_sum=bt_sum, center_sum=center_sum)
        sums.update(pair_metrics(r_chosen, r_rejected, pair_valid))
    return loss, sums
