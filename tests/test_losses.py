"""Losses and metrics against hand-computed values (plain math / numpy references)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.training import losses
from cloud_jax.errors import ConfigError

# Compiled once per shape: much cheaper on CPU than dispatching every op eagerly.
lm_loss = jax.jit(losses.lm_loss)
lm_loss_mean = jax.jit(losses.lm_loss_mean)
bt_loss = jax.jit(losses.bt_loss)
bt_loss_mean = jax.jit(losses.bt_loss_mean)
stage_loss = jax.jit(losses.stage_loss, static_argnames="stage")
pair_metrics = jax.jit(losses.pair_metrics)
finalize_metrics = jax.jit(losses.finalize_metrics)


def _softplus(x):
    # -log sigmoid(x) = log(1 + exp(-x))
    return math.log1p(math.exp(-x))


def _np_lm_reference(logits, targets, mask):
    total, count = 0.0, 0
    for idx in np.ndindex(*targets.shape):
        if mask[idx]:
            row = logits[idx].astype(np.float64)
            total += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[targets[idx]]
            count += 1
    return total, count


def _random_batch(seed, pairs=8, length=5, vocab=7):
    rng = np.random.default_rng(seed)
    loss_mask = (rng.random((pairs, 2, length)) < 0.5).astype(np.int32)
    loss_mask[0, 0, :] = 1  # micro-batches get very different token counts
    loss_mask[1] = 0
    pair_valid = np.ones(pairs, np.int32)
    pair_valid[-1] = 0
    batch = {
        "targets": rng.integers(0, vocab, (pairs, 2, length)).astype(np.int32),
        "loss_mask": loss_mask,
        "pair_valid": pair_valid,
    }
    outputs = {
        "logits": rng.normal(size=(pairs, 2, length, vocab)).astype(np.float32) * 3,
        "rewards": rng.normal(size=(pairs, 2)).astype(np.float32) * 2,
    }
    return outputs, batch


def _slice(tree, start, stop):
    return {k: v[start:stop] for k, v in tree.items()}


# ---------------------------------------------------------------------------------------------
# LM loss


def test_lm_loss_toy_explicit_numbers():
    # logits [2 rows, 2 positions, 3 vocab]
    logits = jnp.array([
        [[0.0, 0.0, 0.0], [0.0, math.log(2), math.log(3)]],  # p(1)=1/3 ; p(2)=3/6
        [[10.0, 0.0, 0.0], [1e30, -1e30, 0.0]],              # p(0)=e^10/(e^10+2) ; masked
    ])
    targets = jnp.array([[1, 2], [0, -100]])
    mask = jnp.array([[1, 1], [1, 0]])
    loss_sum, count = lm_loss(logits, targets, mask)
    expected = math.log(3) + math.log(2) + math.log1p(2 * math.exp(-10))
    assert count == 3
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-6)
    np.testing.assert_allclose(lm_loss_mean(logits, targets, mask), expected / 3, rtol=1e-6)


def test_lm_loss_matches_numpy_reference():
    outputs, batch = _random_batch(0)
    loss_sum, count = lm_loss(outputs["logits"], batch["targets"], batch["loss_mask"])
    ref_sum, ref_count = _np_lm_reference(outputs["logits"], batch["targets"], batch["loss_mask"])
    assert count == ref_count
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5)


def test_lm_loss_zero_targets_is_finite_zero_with_finite_grad():
    logits = jnp.ones((2, 2, 3, 5))
    targets = jnp.zeros((2, 2, 3), jnp.int32)
    mask = jnp.zeros((2, 2, 3), jnp.int32)
    loss_sum, count = lm_loss(logits, targets, mask)
    assert float(loss_sum) == 0.0 and float(count) == 0.0
    assert float(lm_loss_mean(logits, targets, mask)) == 0.0
    grad = jax.jit(jax.grad(losses.lm_loss_mean))(logits, targets, mask)
    assert np.all(np.asarray(grad) == 0.0)


def test_lm_loss_is_fp32_for_bf16_logits():
    outputs, batch = _random_batch(1)
    logits_bf16 = jnp.asarray(outputs["logits"], jnp.bfloat16)
    loss_sum, count = lm_loss(logits_bf16, batch["targets"], batch["loss_mask"])
    assert loss_sum.dtype == jnp.float32 and count.dtype == jnp.float32
    ref_sum, _ = _np_lm_reference(np.asarray(logits_bf16.astype(jnp.float32)), batch["targets"],
                                  batch["loss_mask"])
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# BT loss


R_CHOSEN = [2.0, 0.5, -1.0]
R_REJECTED = [1.0, 0.5, 1.0]


@pytest.mark.parametrize("margin", [None, 0.5, [0.5, -1.0, 2.0]])
@pytest.mark.parametrize("center_coef", [0.0, 0.1])
def test_bt_loss_matches_hand_formula(margin, center_coef):
    margins = margin if isinstance(margin, list) else [margin or 0.0] * 3
    expected = sum(
        _softplus(c - r - m) + center_coef * (c + r) ** 2
        for c, r, m in zip(R_CHOSEN, R_REJECTED, margins)
    )
    loss_sum, count = bt_loss(
        jnp.array(R_CHOSEN), jnp.array(R_REJECTED), jnp.ones(3, jnp.int32),
        margin=None if margin is None else jnp.array(margin), center_coef=center_coef,
    )
    assert count == 3
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-6)
    np.testing.assert_allclose(
        bt_loss_mean(jnp.array(R_CHOSEN), jnp.array(R_REJECTED), jnp.ones(3),
                            None if margin is None else jnp.array(margin), center_coef),
        expected / 3, rtol=1e-6)


def test_bt_loss_plain_values():
    # gaps 1, 0, -2: log(1+e^-1) + log 2 + log(1+e^2)
    loss_sum, _ = bt_loss(jnp.array(R_CHOSEN), jnp.array(R_REJECTED), jnp.ones(3))
    expected = math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-6)


def test_bt_loss_is_stable_for_huge_gaps():
    loss_sum, _ = bt_loss(jnp.array([1000.0, -1000.0]), jnp.array([0.0, 0.0]), jnp.ones(2))
    np.testing.assert_allclose(loss_sum, 1000.0, rtol=1e-6)


def test_bt_padding_pairs_are_ignored_even_if_not_finite():
    valid = jnp.array([1, 1, 1, 0])
    r_c = jnp.array(R_CHOSEN + [jnp.nan])
    r_r = jnp.array(R_REJECTED + [jnp.inf])
    loss_sum, count = bt_loss(r_c, r_r, valid, margin=0.5, center_coef=0.1)
    ref_sum, ref_count = bt_loss(jnp.array(R_CHOSEN), jnp.array(R_REJECTED), jnp.ones(3),
                                        margin=0.5, center_coef=0.1)
    assert count == ref_count == 3
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-6)
    grad_fn = jax.grad(lambda a, b: bt_loss(a, b, valid, 0.5, 0.1)[0], argnums=(0, 1))
    grads = jax.jit(grad_fn)(r_c, r_r)
    for g in grads:
        assert np.all(np.isfinite(g)) and float(g[3]) == 0.0


# ---------------------------------------------------------------------------------------------
# Metrics


def test_pair_metrics_values():
    valid = jnp.array([1, 1, 1, 0])
    sums = pair_metrics(jnp.array(R_CHOSEN + [3.0]), jnp.array(R_REJECTED + [0.0]), valid)
    m = finalize_metrics(sums)
    assert float(m["pairs"]) == 3
    np.testing.assert_allclose(m["accuracy"], 1 / 3, rtol=1e-6)  # 2>1 right, tie wrong, -1<1 wrong
    np.testing.assert_allclose(m["margin"], (1.0 + 0.0 - 2.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(m["chosen_mean"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(m["chosen_std"], math.sqrt(1.5), rtol=1e-6)
    np.testing.assert_allclose(m["rejected_mean"], 2.5 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["rejected_std"], np.std(R_REJECTED), rtol=1e-5)


def test_metrics_accumulate_across_micro_batches():
    outputs, batch = _random_batch(2)
    r = outputs["rewards"]
    full = finalize_metrics(pair_metrics(r[:, 0], r[:, 1], batch["pair_valid"]))
    parts = [pair_metrics(r[i:i + 3, 0], r[i:i + 3, 1], batch["pair_valid"][i:i + 3])
             for i in (0, 3, 6)]
    summed = finalize_metrics(jax.tree.map(lambda *xs: sum(xs), *parts))
    for key in full:
        np.testing.assert_allclose(summed[key], full[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_finalize_metrics_on_empty_batch_is_finite():
    _, sums = stage_loss(
        "cloud",
        {"logits": jnp.zeros((2, 2, 3, 4)), "rewards": jnp.zeros((2, 2))},
        {"targets": jnp.zeros((2, 2, 3), jnp.int32), "loss_mask": jnp.zeros((2, 2, 3)),
         "pair_valid": jnp.zeros(2, jnp.int32)},
    )
    for key, value in finalize_metrics(sums).items():
        assert float(value) == 0.0, key


# ---------------------------------------------------------------------------------------------
# Stage losses and gradient accumulation


def test_stage_losses_combine_terms():
    outputs, batch = _random_batch(3)
    mask = batch["loss_mask"] * batch["pair_valid"][:, None, None]
    ref_sum, ref_count = _np_lm_reference(outputs["logits"], batch["targets"], mask)
    lm = ref_sum / ref_count
    valid = batch["pair_valid"].astype(bool)
    r_c, r_r = outputs["rewards"][valid, 0], outputs["rewards"][valid, 1]
    bt = np.mean([_softplus(c - r - 0.3) for c, r in zip(r_c, r_r)])
    center = np.mean((r_c + r_r) ** 2)
    expected = {
        "critique_sft": lm,
        "lm_pretrain": lm,
        "classic": bt + 0.2 * center,
        "cloud": bt + 0.2 * center + 1.25 * lm,
    }
    for stage, value in expected.items():
        loss, sums = stage_loss(stage, outputs, batch, lm_coef=1.25, margin=0.3,
                                       center_coef=0.2)
        np.testing.assert_allclose(loss, value, rtol=1e-5, err_msg=stage)
        metrics = finalize_metrics(sums)
        if stage != "classic":
            np.testing.assert_allclose(metrics["lm_loss"], lm, rtol=1e-5)
        if stage in ("classic", "cloud"):
            np.testing.assert_allclose(metrics["bt_loss"], bt, rtol=1e-5)
            np.testing.assert_allclose(metrics["center"], center, rtol=1e-5)
            np.testing.assert_allclose(metrics["accuracy"], np.mean(r_c > r_r), rtol=1e-6)


def test_classic_stage_needs_no_logits():
    outputs, batch = _random_batch(4)
    loss, sums = stage_loss("classic", {"rewards": outputs["rewards"]}, batch)
    assert np.isfinite(loss) and "lm_tokens" not in sums


def test_unknown_stage_lists_stages():
    outputs, batch = _random_batch(5)
    with pytest.raises(ValueError, match="lm_pretrain, critique_sft, cloud, classic"):
        stage_loss("reward", outputs, batch)


def test_missing_output_names_key():
    _, batch = _random_batch(6)
    with pytest.raises(KeyError, match="outputs\\['rewards'\\]"):
        stage_loss("cloud", {"logits": jnp.zeros((8, 2, 5, 7))}, batch)


# lm_pretrain runs the same code as critique_sft.
@pytest.mark.parametrize("stage", ["critique_sft", "classic", "cloud"])
def test_micro_batch_sums_equal_full_batch_loss_and_grad(stage):
    outputs, batch = _random_batch(7)

    def loss_fn(out, b, normalizers=None):
        return losses.stage_loss(stage, out, b, lm_coef=0.75, margin=0.1, center_coef=0.05,
                                 normalizers=normalizers)[0]

    step = jax.jit(jax.value_and_grad(loss_fn))
    full_loss, full_grad = step(outputs, batch)
    normalizers = losses.loss_normalizers(stage, batch)
    acc_loss, acc_grad = 0.0, None
    for i in range(4):
        mb_out, mb = _slice(outputs, 2 * i, 2 * i + 2), _slice(batch, 2 * i, 2 * i + 2)
        loss, grad = step(mb_out, mb, normalizers)
        acc_loss += loss
        acc_grad = grad if acc_grad is None else jax.tree.map(
            lambda a, g: np.concatenate([a, g]), acc_grad, grad)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-5)
    for key in full_grad:
        np.testing.assert_allclose(acc_grad[key], full_grad[key], rtol=1e-5, atol=1e-7)


def test_lm_sums_then_divide_equals_full_batch_but_mean_of_means_does_not():
    outputs, batch = _random_batch(8)
    logits, targets, mask = outputs["logits"], batch["targets"], batch["loss_mask"]
    parts = [lm_loss(logits[i:i + 2], targets[i:i + 2], mask[i:i + 2]) for i in (0, 2, 4, 6)]
    accumulated = sum(s for s, _ in parts) / sum(c for _, c in parts)
    full = lm_loss_mean(logits, targets, mask)
    np.testing.assert_allclose(accumulated, full, rtol=1e-6)
    # The test is sensitive: averaging per-micro-batch means weights tokens unequally.
    mean_of_means = np.mean([s / max(c, 1) for s, c in parts])
    assert abs(mean_of_means - full) > 1e-3


def test_loss_config_validate():
    assert losses.LossConfig().validate().lm_coef == 1.25
    with pytest.raises(ConfigError, match="loss.lm_coef"):
        losses.LossConfig(lm_coef=-1.0).validate()
    # An infinite coefficient makes every loss infinite (each step non-finite).
    for key, value in (("lm_coef", math.nan), ("center_coef", math.nan), ("margin", math.nan),
                       ("margin", math.inf), ("lm_coef", math.inf), ("center_coef", math.inf)):
        with pytest.raises(ConfigError, match=f"loss.{key}"):
            losses.LossConfig(**{key: value}).validate()
