"""AdamW with the reference's decoupled weight decay, warmup + cosine schedule, gradient clipping.

The reference trains with a *decoupled* AdamW whose ``weight_decay`` is an absolute amount per
step, scaled only by the schedule: ``p <- p - weight_decay * (lr_t / peak_lr) * p`` (its configs
set it equal to the learning rate). ``optax.adamw`` instead decays by ``lr_t * wd_optax * p``, so
``wd_optax = weight_decay / peak_lr`` gives the same update.

    tx = make_optimizer(OptimConfig(learning_rate=5e-6), total_steps=1000)
    opt_state = tx.init(params)
    lr = current_learning_rate(make_schedule(cfg, 1000), opt_state)   # for logging
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from cloud_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule. Defaults are the reference's 8B settings (lr 5e-6: SFT, classic)."""

    # Peak learning rate, reached at the end of warmup.
    learning_rate: float = 5e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-10
    # Decoupled decay per step at the peak of the schedule (see the module docstring). None means
    # equal to learning_rate, as in the reference, so overriding only the rate keeps the pairing.
    weight_decay: Optional[float] = None
    # Fraction of total_steps spent in linear warmup from 0; must be < 1 to leave a decay phase.
    warmup_ratio: float = 0.1
    # Cosine floor at total_steps, as a fraction of the peak.
    final_lr_ratio: float = 0.01
    # Global-norm gradient clipping threshold; 0 disables clipping.
    grad_clip_norm: float = 1.0
    # The reference decays every parameter. False exempts biases and norm scales (the usual LLM
    # recipe). At the reference's 5e-6 per step, a few thousand steps shrink a weight by a few
    # percent at most, so the choice matters little and the default follows the reference.
    decay_norms_and_biases: bool = True
    # dtype of AdamW's first moment: "bfloat16" saves 2 of the 12 bytes per parameter that fp32
    # weights and both moments take (the second moment stays fp32: its range needs it).
    mu_dtype: str = "float32"

    @property
    def resolved_weight_decay(self) -> float:
        return self.learning_rate if self.weight_decay is None else self.weight_decay

    def validate(self) -> "OptimConfig":
        if not 0 < self.learning_rate < math.inf:
            raise ConfigError(f"optim.learning_rate={self.learning_rate}: must be a finite "
                              "number > 0")
        for key in ("b1", "b2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)}: must be in [0, 1)")
        if not 0 < self.eps < math.inf:
            raise ConfigError(f"optim.eps={self.eps}: must be a finite number > 0")
        if not 0 <= self.resolved_weight_decay < math.inf:  # NaN too
            raise ConfigError(f"optim.weight_decay={self.weight_decay}: must be a finite "
                              "number >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(
                f"optim.warmup_ratio={self.warmup_ratio}: must be in [0, 1) so the cosine decay "
                "has at least one step"
            )
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"optim.final_lr_ratio={self.final_lr_ratio}: must be in [0, 1]")
        if not self.grad_clip_norm >= 0:  # NaN too: it would turn clipping off
            raise ConfigError(
                f"optim.grad_clip_norm={self.grad_clip_norm}: must be >= 0 (0 disables clipping)"
            )
        if self.mu_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"optim.mu_dtype={self.mu_dtype!r}: expected 'float32' or "
                              "'bfloat16'")
        return self


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length: floor(warmup_ratio * total_steps), always < total_steps. The product is
    rounded to 9 decimals first: in binary 0.29 * 100 is 28.999999999999996, not 29."""
    return math.floor(round(cfg.warmup_ratio * total_steps, 9))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear 0 -> peak over the warmup, then cosine to final_lr_ratio * peak at total_steps.

    ``schedule(k)`` is the rate the update at 0-based step ``k`` applies; step 0 of a warmup
    therefore applies rate 0.
    """
    cfg.validate()
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps}: a schedule needs at least 1 step")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup_steps(cfg, total_steps),
        decay_steps=total_steps,
        end_value=cfg.final_lr_ratio * cfg.learning_rate,
    )


def _decay_mask(params: Any) -> Any:
    # Flax names a Dense/attention bias "bias" and an RMSNorm/LayerNorm gain "scale"; norm modules
    # are named "*norm*" by every Llama-family port, which also catches stacked (scanned) norms.
    def decays(path, _leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        last = names[-1] if names else ""
        return last not in ("bias", "scale") and not any("norm" in n.lower() for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (unless grad_clip_norm is 0) -> AdamW on the schedule."""
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.resolved_weight_decay / cfg.learning_rate,
        mask=None if cfg.decay_norms_and_biases else _decay_mask,
        mu_dtype=jnp.bfloat16 if cfg.mu_dtype == "bfloat16" else None,
    )
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw


def update_count(opt_state: Any) -> jax.Array:
    """How many updates ``opt_state`` has seen (the schedule's step counter)."""
    counts = [
        s.count for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(s, optax.ScaleByScheduleState)
    ]
    if len(counts) != 1:
        raise ValueError(
            f"expected one schedule state in the optimizer state (from make_optimizer), found "
            f"{len(counts)}"
        )
    return counts[0]


def current_learning_rate(schedule: optax.Schedule, opt_state: Any) -> jax.Array:
    """The rate the next update from ``opt_state`` applies.

    Call it on the state passed *into* a train step to log the rate that step uses.
    """
    return jnp.asarray(schedule(update_count(opt_state)), jnp.float32)
