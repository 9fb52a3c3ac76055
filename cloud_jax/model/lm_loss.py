"""The LM head and its cross-entropy in sequence chunks, without a ``[B, T, V]`` logits array.

``chunked_lm_loss(hidden, kernel, targets, mask, chunk_size)`` returns the same
``(loss_sum, token_count)`` as :func:`cloud_jax.training.losses.lm_loss` on ``hidden @ kernel`` logits,
computed ``chunk_size`` positions at a time:

- A chunk in which no row has a target token is skipped (``lax.cond``): the prompt and response
  part of a CLoud row carries no LM targets, nor does the padding of a length bucket, so their
  share of the LM head's matmuls (forward and backward) is never run.
- Under differentiation the forward pass computes each chunk's gradients as it goes (the loss is a
  scalar, so ``d loss / d logits = softmax - onehot`` is known in the forward) and keeps only
  ``d hidden`` and the accumulated ``d kernel``; no chunk's logits outlive the chunk. The backward
  pass scales those by the incoming cotangent.

Logits, log-sum-exp and their gradients are fp32 whatever the compute dtype; ``d kernel`` is
accumulated in fp32 across chunks.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

F32 = jnp.float32
# A chunk's rows and positions are flattened to one axis for its matmuls, so the kernel's gradient
# contracts a single axis: free on every backend, faster on CPU (docs/BENCHMARKS.md).
_LOGITS_AXES = ("activation_batch", "activation_vocab")


def _logits(h_nd, kernel, vocab_first: bool):
    spec = "nd,vd->nv" if vocab_first else "nd,dv->nv"
    logits = jnp.einsum(spec, h_nd, kernel, preferred_element_type=F32)
    return nn.with_logical_constraint(logits, _LOGITS_AXES)


def _flat(x):  # a chunk [R, c, ...] -> [R * c, ...]
    return x.reshape((-1,) + x.shape[2:])


def _chunk_nll(logits, targets, mask):
    """Summed NLL of the masked positions, the log-sum-exp and the safe targets."""
    safe = jnp.where(mask, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, lse - target_logits, 0.0)), lse, safe


def _chunks(t: int, size: int):
    return [(s, min(s + size, t)) for s in range(0, t, size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss_sum(hidden, kernel, targets, mask, chunk_size: int, vocab_first: bool):
    total = jnp.zeros((), F32)
    for s, e in _chunks(hidden.shape[1], chunk_size):
        def run(h, t, m):
            return _chunk_nll(_logits(_flat(h), kernel, vocab_first), _flat(t), _flat(m))[0]

        m = mask[:, s:e]
        total = total + jax.lax.cond(jnp.any(m), run, lambda *_: jnp.zeros((), F32),
                                     hidden[:, s:e], targets[:, s:e], m)
    return total


def _loss_sum_fwd(hidden, kernel, targets, mask, chunk_size, vocab_first):
    def run(carry, h_chunk, t, m):
        total, d_kernel = carry
        h, t, m = _flat(h_chunk), _flat(t), _flat(m)
        logits = _logits(h, kernel, vocab_first)
        nll, lse, safe = _chunk_nll(logits, t, m)
        probs = jnp.exp(logits - lse[..., None])
        onehot = safe[..., None] == jnp.arange(logits.shape[-1], dtype=safe.dtype)
        d_logits = jnp.where(m[..., None], probs - onehot.astype(F32), 0.0)
        d_logits = nn.with_logical_constraint(d_logits, _LOGITS_AXES).astype(kernel.dtype)
        dh_spec, dk_spec = (("nv,vd->nd", "nv,nd->vd") if vocab_first
                            else ("nv,dv->nd", "nd,nv->dv"))
        d_h = jnp.einsum(dh_spec, d_logits, kernel, preferred_element_type=F32)
        dk_args = (d_logits, h) if vocab_first else (h, d_logits)
        d_kernel = d_kernel + jnp.einsum(dk_spec, *dk_args, preferred_element_type=F32)
        return (total + nll, d_kernel), d_h.astype(h.dtype).reshape(h_chunk.shape)

    def skip(carry, h, t, m):
        return carry, jnp.zeros_like(h)

    carry = (jnp.zeros((), F32), jnp.zeros(kernel.shape, F32))
    d_hidden = []
    for s, e in _chunks(hidden.shape[1], chunk_size):
        m = mask[:, s:e]
        carry, d_h = jax.lax.cond(jnp.any(m), run, skip, carry, hidden[:, s:e], targets[:, s:e], m)
        d_hidden.append(d_h)
    total, d_kernel = carry
    return total, (jnp.concatenate(d_hidden, axis=1), d_kernel.astype(kernel.dtype))


def _loss_sum_bwd(chunk_size, vocab_first, residuals, g):
    d_hidden, d_kernel = residuals
    # Scaled in fp32: the cotangent (lm_coef / token count in the train step) rounded to bf16
    # first would scale every gradient by its rounding error, up to 0.4%.
    g = g.astype(F32)
    return ((g * d_hidden.astype(F32)).astype(d_hidden.dtype),
            (g * d_kernel.astype(F32)).astype(d_kernel.dtype), None, None)


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)


def chunked_lm_loss(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                    loss_mask: jax.Array, chunk_size: int, vocab_first: bool
                    ) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy of ``hidden`` through the LM head, and the token count.

    Args:
      hidden: ``[..., T, D]`` final-norm hidden states (the compute dtype).
      kernel: the LM head, ``[V, D]`` when ``vocab_first`` (a tied embedding) else ``[D, V]``;
        cast to ``hidden``'s dtype, as :meth:`CLoudModel.logits` does.
      targets: ``[..., T]`` next-token ids; never read where ``loss_mask`` is 0.
      loss_mask: ``[..., T]``; nonzero marks a target token.
      chunk_size: positions per chunk (> 0); a last, shorter chunk takes the remainder.

    Returns:
      ``(loss_sum, token_count)`` fp32 scalars, equal to :func:`cloud_jax.training.losses.lm_loss` of the
      full logits; differentiable in ``hidden`` and ``kernel``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be > 0")
    t, d = hidden.shape[-2:]
    h = hidden.reshape(-1, t, d)
    mask = (loss_mask != 0).reshape(-1, t)
    tg = targets.reshape(-1, t).astype(jnp.int32)
    total = _loss_sum(h, kernel.astype(hidden.dtype), tg, mask, int(chunk_size), bool(vocab_first))
    return total, jnp.sum(mask, dtype=F32)
