"""How the next token is chosen from a row's logits: small frozen objects, usable as jit statics.

Every method maps ``(logits_nv fp32, keys_n)`` to ``tokens_n``; ``keys_n`` holds one PRNG key per
row, so a row's draw depends only on its own key, never on the rest of the batch. A draw reads
one uniform number per row from its key (:func:`uniforms`); ``method.draw(logits_nv, uniforms_n)``
takes those numbers instead of the keys, so a decode loop can make every step's numbers before
the loop (:func:`step_uniforms`) rather than run the key hashing inside every step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def _last_positive(x_nv: jax.Array) -> jax.Array:
    """Index of each row's last entry > 0 [N] int32 (0 where none is)."""
    return (x_nv.shape[-1] - 1 - jnp.argmax(x_nv[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


def uniforms(keys_n: jax.Array) -> jax.Array:
    """The uniform number in [0, 1) [N] fp32 that a random method's draw reads from each row's
    key."""
    return jax.vmap(jax.random.uniform)(keys_n)


def step_uniforms(keys_n: jax.Array, steps: int) -> jax.Array:
    """[N, steps] fp32: row n's number at step t, ``uniforms(fold_in(keys_n[n], t))``, the one a
    decode loop that folds the step into each row's key draws with, for every step at once."""
    fold = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))
    steps_t = jnp.arange(steps, dtype=jnp.uint32)
    return jax.vmap(uniforms)(fold(keys_n, steps_t))


def _categorical(logits_nv: jax.Array, keys_n: jax.Array, block: int = 256) -> jax.Array:
    """One draw per row from ``softmax(logits)`` with each row's key (:func:`_inverse_cdf`)."""
    return _inverse_cdf(logits_nv, uniforms(keys_n), block)


def _inverse_cdf(logits_nv: jax.Array, u_n: jax.Array, block: int = 256) -> jax.Array:
    """One draw per row from ``softmax(logits)`` by inverting the cumulative distribution with one
    uniform number per row ``u_n`` in [0, 1), instead of ``jax.random.categorical``'s one per
    vocabulary entry (on CPU, 20 ms a step for 16 rows x 32000 entries). The inversion runs in
    two levels: it finds the block of ``block`` entries where the number falls through the
    cumulative sums of the blocks, then the entry inside that block, so no cumulative sum runs
    over the whole vocabulary. Entries at -inf are never drawn."""
    n, v = logits_nv.shape
    probs_nv = jnp.exp(logits_nv - jnp.max(logits_nv, axis=-1, keepdims=True))
    blocks = -(-v // block)
    probs_nlb = jnp.pad(probs_nv, ((0, 0), (0, blocks * block - v))).reshape(n, blocks, block)
    sums_nl = jnp.sum(probs_nlb, axis=-1)
    cdf_nl = jnp.cumsum(sums_nl, axis=-1)
    u_n = u_n * cdf_nl[:, -1]
    # The first block whose cumulative sum exceeds u; rounding can put u at the very top of the
    # cdf, then the last block holding any probability.
    block_n = jnp.minimum(jnp.sum(cdf_nl <= u_n[:, None], axis=-1, dtype=jnp.int32),
                          _last_positive(sums_nl))
    before_n = jnp.where(block_n > 0, jnp.take_along_axis(
        cdf_nl, jnp.maximum(block_n - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inner_nb = jnp.take_along_axis(probs_nlb, block_n[:, None, None], axis=1)[:, 0]
    inside_n = jnp.sum(jnp.cumsum(inner_nb, axis=-1) <= (u_n - before_n)[:, None], axis=-1,
                       dtype=jnp.int32)
    # The same rounding inside the block: fall back to its last possible entry.
    inside_n = jnp.minimum(inside_n, _last_positive(inner_nb))
    return block_n * block + inside_n


def _check_temperature(temperature: float) -> None:
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature={temperature}: must be a finite number > 0 (use Greedy() "
                         "for 0)")


# The smallest normal float32. A smaller temperature is subnormal in float32 (or 0), which CPUs
# flush to 0.
_MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)


def _scale(logits_nv: jax.Array, temperature: float) -> jax.Array:
    """``logits / temperature`` less each row's maximum: the most likely tokens stay at 0 however
    small the temperature, and the others go to -inf where the quotient overflows, so a tiny
    temperature draws as greedy does (ties at random) instead of overflowing to inf - inf = NaN.
    A temperature below the smallest normal float32 counts as that one."""
    top_n1 = jnp.max(logits_nv, axis=-1, keepdims=True)
    return (logits_nv - top_n1) / max(temperature, _MIN_TEMPERATURE)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token (ties go to the lowest id)."""

    random = False  # reads no uniform number

    def __call__(self, logits_nv: jax.Array, keys_n: jax.Array) -> jax.Array:
        del keys_n
        return self.draw(logits_nv, None)

    def draw(self, logits_nv: jax.Array, uniforms_n: Optional[jax.Array]) -> jax.Array:
        del uniforms_n
        return jnp.argmax(logits_nv, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """A draw from ``softmax(logits / temperature)``. However small the temperature, the draw is
    among the most likely tokens, as greedy's (see ``_scale``)."""

    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)

    random = True  # reads one uniform number a row

    def __call__(self, logits_nv: jax.Array, keys_n: jax.Array) -> jax.Array:
        return self.draw(logits_nv, uniforms(keys_n))

    def draw(self, logits_nv: jax.Array, uniforms_n: jax.Array) -> jax.Array:
        return _inverse_cdf(_scale(logits_nv, self.temperature), uniforms_n)


@dataclasses.dataclass(frozen=True)
class TopK:
    """A draw among the ``k`` most likely tokens, at ``temperature``."""

    k: int
    temperature: float = 1.0

    def __post_init__(self):
        # A float (2.0) would fail only at the first draw, inside the sampler, naming nothing.
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)):
            raise ValueError(f"top_k={self.k!r}: must be a whole number >= 1")
        if self.k < 1:
            raise ValueError(f"top_k={self.k}: must be >= 1")
        _check_temperature(self.temperature)

    random = True  # reads one uniform number a row

    def __call__(self, logits_nv: jax.Array, keys_n: jax.Array) -> jax.Array:
        return self.draw(logits_nv, uniforms(keys_n))

    def draw(self, logits_nv: jax.Array, uniforms_n: jax.Array) -> jax.Array:
        k = min(self.k, logits_nv.shape[-1])
        top_nk, idx_nk = jax.lax.top_k(logits_nv, k)
        choice_n = _inverse_cdf(_scale(top_nk, self.temperature), uniforms_n)
        return jnp.take_along_axis(idx_nk, choice_n[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: a draw among the fewest most likely tokens whose probability (at
    ``temperature``) reaches ``p``; the most likely token is always kept. ``p`` = 1 cuts
    nothing: it draws exactly as ``Temperature(temperature)`` (in float32 the mass before a
    token of a probability near 1e-7 can round to 1, which the cut would drop)."""

    p: float
    temperature: float = 1.0

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"top_p={self.p}: must lie in (0, 1]")
        _check_temperature(self.temperature)

    random = True  # reads one uniform number a row

    def __call__(self, logits_nv: jax.Array, keys_n: jax.Array) -> jax.Array:
        return self.draw(logits_nv, uniforms(keys_n))

    def draw(self, logits_nv: jax.Array, uniforms_n: jax.Array) -> jax.Array:
        scaled = _scale(logits_nv, self.temperature)
        if self.p >= 1:
            return _inverse_cdf(scaled, uniforms_n)
        order_nv = jnp.argsort(-scaled, axis=-1)
        sorted_nv = jnp.take_along_axis(scaled, order_nv, axis=-1)
        probs = jax.nn.softmax(sorted_nv, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < self.p, sorted_nv, -jnp.inf)
        choice_n = _inverse_cdf(kept, uniforms_n)
        return jnp.take_along_axis(order_nv, choice_n[:, None], axis=-1)[:, 0].astype(jnp.int32)


SamplingMethod = Greedy | Temperature | TopK | TopP


def penalize_repeats(logits_nv: jax.Array, seen_nv: jax.Array, penalty: float) -> jax.Array:
    """The repetition penalty of Hugging Face's ``generate`` (applied before any sampling
    method): a token already in the row (prefix or critique so far) has its logit divided by
    ``penalty`` where positive, multiplied where negative."""
    penalized = jnp.where(logits_nv > 0, logits_nv / penalty, logits_nv * penalty)
    return jnp.where(seen_nv, penalized, logits_nv)


def check_repetition_penalty(penalty: float) -> None:
    # inf would turn a seen token's logit of exactly 0 into 0 * inf = NaN.
    if not 0 < penalty < float("inf"):
        raise ValueError(f"repetition_penalty={penalty}: must be a finite number > 0 (1.0 is off; "
                         "the reference samples with 1.01)")


def check_seed(seed: int) -> None:
    """Seeds are 32-bit: ``jax.random.key`` keeps the low 32 bits of a larger one (seed 2**32 + 1
    would give seed 1's critiques) and overflows past 64."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r}: must be a whole number in [0, 2**32)")


def method_from(temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None) -> SamplingMethod:
    """The method the usual knobs describe: temperature 0 is greedy (top-k / top-p then unused,
    but still checked: a bad value is an error whatever the temperature)."""
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature={temperature}: must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and top_p is not None:
        raise ValueError("give top_k or top_p, not both")
    if temperature == 0:
        if top_k is not None:
            TopK(top_k, 1.0)
        if top_p is not None:
            TopP(top_p, 1.0)
        return Greedy()
    if top_k is not None:
        return TopK(top_k, temperature)
    if top_p is not None:
        return TopP(top_p, temperature)
    return Temperature(temperature)
