"""The chunked LM loss (cloud_jax.model.lm_loss) against the whole-logits loss and its autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.training.losses import lm_loss
from cloud_jax.model.lm_loss import chunked_lm_loss

R, T, D, V = 3, 37, 16, 50


def _inputs(seed=1, frac=0.3, start=12):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (R, T, D))
    emb = jax.random.normal(k[1], (V, D))
    targets = jax.random.randint(k[2], (R, T), 0, V)
    # Targets only after position `start`: the first chunks have none and are skipped.
    mask = (jax.random.uniform(k[3], (R, T)) < frac) & (jnp.arange(T) > start)
    return h, emb, targets, mask


def _reference(h, emb, targets, mask):
    def loss(h, emb):
        logits = jnp.einsum("btd,vd->btv", h, emb, preferred_element_type=jnp.float32)
        return lm_loss(logits, targets, mask)[0]

    return jax.value_and_grad(loss, argnums=(0, 1))(h, emb)


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])
@pytest.mark.parametrize("vocab_first", [True, False])
def test_value_and_grads_equal_whole_logits(chunk, vocab_first):
    h, emb, targets, mask = _inputs()
    want_loss, (want_dh, want_demb) = _reference(h, emb, targets, mask)
    kernel = emb if vocab_first else emb.T

    def f(h, kernel):
        return chunked_lm_loss(h, kernel, targets, mask, chunk, vocab_first)[0]

    got_loss, (got_dh, got_dk) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, kernel)
    got_demb = got_dk if vocab_first else got_dk.T
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(got_dh, want_dh, atol=2e-6)
    np.testing.assert_allclose(got_demb, want_demb, atol=2e-6)
    # Without differentiation (the eval step) the same value.
    np.testing.assert_allclose(jax.jit(f)(h, kernel), want_loss, rtol=1e-6)
    _, count = chunked_lm_loss(h, kernel, targets, mask, chunk, vocab_first)
    assert float(count) == float(mask.sum())


def test_leading_axes_and_a_scaled_cotangent():
    """[P, 2, T, D] hidden states as the train step passes them, and a loss scaled after the sum
    (the step divides by the token count and weights by lm_coef)."""
    h, emb, targets, mask = _inputs(seed=3)
    h4 = jnp.concatenate([h, h[:1]]).reshape(2, 2, T, D)
    t4 = jnp.concatenate([targets, targets[:1]]).reshape(2, 2, T)
    m4 = jnp.concatenate([mask, mask[:1]]).reshape(2, 2, T)

    def f(h, emb):
        total, count = chunked_lm_loss(h, emb, t4, m4, 8, True)
        return 1.25 * total / count

    def ref(h, emb):
        logits = jnp.einsum("pctd,vd->pctv", h, emb)
        total, count = lm_loss(logits, t4, m4)
        return 1.25 * total / count

    got = jax.value_and_grad(f, argnums=(0, 1))(h4, emb)
    want = jax.value_and_grad(ref, argnums=(0, 1))(h4, emb)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


def test_no_targets_gives_zero_loss_and_zero_grads():
    h, emb, targets, _ = _inputs()
    mask = jnp.zeros((R, T), bool)
    f = lambda h, emb: chunked_lm_loss(h, emb, targets, mask, 8, True)[0]  # noqa: E731
    loss, (dh, demb) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, emb)
    assert float(loss) == 0.0
    assert not np.any(np.asarray(dh)) and not np.any(np.asarray(demb))


def test_targets_outside_the_vocabulary_are_never_read_where_masked():
    h, emb, targets, mask = _inputs()
    bad = jnp.where(mask, targets, -100)
    got = chunked_lm_loss(h, emb, bad, mask, 8, True)[0]
    want, _ = _reference(h, emb, targets, mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bf16_hidden_states():
    h, emb, targets, mask = _inputs()
    want_loss, (want_dh, want_demb) = _reference(h.astype(jnp.bfloat16).astype(jnp.float32),
                                                 emb.astype(jnp.bfloat16).astype(jnp.float32),
                                                 targets, mask)

    def f(h, emb):  # the kernel is cast to the hidden states' dtype inside, like model.logits
        return chunked_lm_loss(h.astype(jnp.bfloat16), emb, targets, mask, 8, True)[0]

    loss, (dh, demb) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, emb)
    assert demb.dtype == jnp.float32 and dh.dtype == jnp.float32
    np.testing.assert_allclose(loss, want_loss, rtol=1e-3)
    np.testing.assert_allclose(dh, want_dh, atol=0.05 * float(jnp.abs(want_dh).max()))
    np.testing.assert_allclose(demb, want_demb, atol=0.05 * float(jnp.abs(want_demb).max()))


def test_chunk_size_must_be_positive():
    h, emb, targets, mask = _inputs()
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_lm_loss(h, emb, targets, mask, 0, True)


def test_bf16_gradients_carry_the_cotangent_unrounded():
    """The step scales the LM sum by lm_coef / token count. That factor rounded to bf16 (1.25/75
    is 0.34% off there) would scale every bf16 gradient by the same error, tilting the cloud
    stage's LM term against the BT term; autodiff of the whole logits applies it exactly."""
    h, emb, targets, _ = _inputs()
    mask = jnp.zeros((R, T), bool).at[:, -25:].set(True)  # 75 target tokens
    scale = 1.25 / 75  # 0.34% off in bf16
    hb, embb = h.astype(jnp.bfloat16), emb.astype(jnp.bfloat16)

    def want(h, emb):  # fp32 arithmetic on the same bf16 inputs
        logits = jnp.einsum("btd,vd->btv", h, emb, preferred_element_type=jnp.float32)
        return scale * lm_loss(logits, targets, mask)[0]

    def got(h, emb):
        return scale * chunked_lm_loss(h, emb, targets, mask, 8, True)[0]

    w = jax.grad(want, argnums=(0, 1))(hb.astype(jnp.float32), embb.astype(jnp.float32))
    g = jax.jit(jax.grad(got, argnums=(0, 1)))(hb, embb)
    for a, b in zip(g, w):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # The gradients' overall scale (their projection on the exact ones): bf16 rounding of
        # each entry averages out, a rounded scale factor does not.
        assert abs((a * b).sum() / (b * b).sum() - 1) < 1e-3
