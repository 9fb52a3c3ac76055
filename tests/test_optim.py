"""Schedule and optimizer against hand-computed values and a numpy decoupled-AdamW reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.errors import ConfigError
from cloud_jax.training.optim import (OptimConfig, current_learning_rate, make_optimizer, make_schedule,
                             update_count, warmup_steps)

PEAK = 1e-3
FLOOR = 0.01 * PEAK


def _hand_schedule(step, total, warmup, peak=PEAK, floor=FLOOR):
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_schedule_values():
    schedule = make_schedule(OptimConfig(learning_rate=PEAK), total_steps=100)
    assert warmup_steps(OptimConfig(), 100) == 10
    # floor(ratio x steps) as written, not as binary floating point rounds it (0.29 * 100 is
    # 28.999999999999996 there); still strictly below total_steps.
    assert warmup_steps(OptimConfig(warmup_ratio=0.29), 100) == 29
    assert warmup_steps(OptimConfig(warmup_ratio=0.57), 100) == 57
    assert warmup_steps(OptimConfig(warmup_ratio=0.999), 100) == 99
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), PEAK / 2, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), PEAK, rtol=1e-6)           # end of warmup
    np.testing.assert_allclose(schedule(55), (PEAK + FLOOR) / 2, rtol=1e-6)  # middle of the cosine
    np.testing.assert_allclose(schedule(100), FLOOR, rtol=1e-6)         # end
    for step in (3, 17, 42, 99):
        np.testing.assert_allclose(schedule(step), _hand_schedule(step, 100, 10), rtol=1e-5)


def test_schedule_without_warmup_starts_at_peak():
    schedule = make_schedule(OptimConfig(learning_rate=PEAK, warmup_ratio=0.0), total_steps=4)
    np.testing.assert_allclose(schedule(0), PEAK, rtol=1e-6)
    np.testing.assert_allclose(schedule(4), FLOOR, rtol=1e-6)


def test_one_step_equals_hand_computed_adamw_with_decay_and_clip():
    # Gradient norm 5 is clipped to 1: g = [0.6, 0.8]. Adam's first bias-corrected step is
    # g / (|g| + eps). Decoupled decay removes wd * (lr_t / peak) * p = 0.01 * p at the peak,
    # not lr * wd * p as optax's own weight_decay argument would.
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.01, warmup_ratio=0.0, eps=1e-10)
    tx = make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([3.0, 4.0])}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = np.asarray(params["w"] + updates["w"])
    expected = np.array([
        1.0 - 0.1 * 0.6 / (0.6 + 1e-10) - 0.01 * 1.0,
        -2.0 - 0.1 * 0.8 / (0.8 + 1e-10) - 0.01 * -2.0,
    ])
    np.testing.assert_allclose(new, [0.89, -2.08], atol=1e-6)
    np.testing.assert_allclose(new, expected, atol=1e-6)


def _reference_decoupled_adamw(params, grads_seq, cfg, total):
    """Decoupled AdamW as the reference runs it, in float64 numpy."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    wd = cfg.resolved_weight_decay
    for step, grads in enumerate(grads_seq):
        grads = {k: np.asarray(g, np.float64) for k, g in grads.items()}
        norm = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads.values()))
        if cfg.grad_clip_norm > 0 and norm > cfg.grad_clip_norm:
            grads = {k: g * cfg.grad_clip_norm / norm for k, g in grads.items()}
        lr = _hand_schedule(step, total, int(cfg.warmup_ratio * total), cfg.learning_rate,
                            cfg.final_lr_ratio * cfg.learning_rate)
        for k, g in grads.items():
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g ** 2
            m_hat = m[k] / (1 - cfg.b1 ** (step + 1))
            v_hat = v[k] / (1 - cfg.b2 ** (step + 1))
            params[k] = (params[k] - lr * m_hat / (np.sqrt(v_hat) + cfg.eps)
                         - wd * (lr / cfg.learning_rate) * params[k])
    return params


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_several_steps_match_reference_decoupled_adamw(clip):
    total = 10
    cfg = OptimConfig(learning_rate=0.05, weight_decay=0.02, warmup_ratio=0.2,
                      grad_clip_norm=clip)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
              "bias": rng.normal(size=(2,)).astype(np.float32)}
    # Norms on both sides of the clip threshold, so clipping changes Adam's moment ratios.
    grads_seq = [{k: (rng.normal(size=p.shape) * scale).astype(np.float32)
                  for k, p in params.items()} for scale in (3.0, 0.1, 2.0, 0.05, 5.0, 0.3)]
    tx = make_optimizer(cfg, total)
    state = tx.init(params)
    update = jax.jit(tx.update)
    current = {k: jnp.asarray(v) for k, v in params.items()}
    for grads in grads_seq:
        updates, state = update(grads, state, current)
        current = jax.tree.map(jnp.add, current, updates)
    expected = _reference_decoupled_adamw(params, grads_seq, cfg, total)
    for k in params:
        np.testing.assert_allclose(current[k], expected[k], atol=1e-6, err_msg=k)


def test_bf16_first_moment_is_stored_in_bf16_and_tracks_the_fp32_reference():
    total = 10
    cfg = OptimConfig(learning_rate=0.05, weight_decay=0.02, warmup_ratio=0.2,
                      mu_dtype="bfloat16")
    rng = np.random.default_rng(1)
    params = {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}
    grads_seq = [{"kernel": (rng.normal(size=(8, 4)) * s).astype(np.float32)}
                 for s in (3.0, 0.1, 2.0, 0.05, 5.0, 0.3)]
    tx = make_optimizer(cfg, total)
    state = tx.init(params)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    assert adam.mu["kernel"].dtype == jnp.bfloat16 and adam.nu["kernel"].dtype == jnp.float32
    update = jax.jit(tx.update)
    current = {"kernel": jnp.asarray(params["kernel"])}
    for grads in grads_seq:
        updates, state = update(grads, state, current)
        current = jax.tree.map(jnp.add, current, updates)
    expected = _reference_decoupled_adamw(params, grads_seq, cfg, total)["kernel"]
    moved = np.abs(expected - params["kernel"]).max()
    # bf16 keeps 8 bits of the moment: the result is close to fp32 AdamW, but not equal to it.
    error = np.abs(np.asarray(current["kernel"]) - expected).max()
    assert 0 < error < 0.02 * moved, (error, moved)


@pytest.mark.parametrize("decay_all", [True, False])
def test_decay_mask(decay_all):
    # Zero gradients make Adam's step 0, so only decay moves a parameter: p <- p - 0.01 * p.
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.01, warmup_ratio=0.0,
                      decay_norms_and_biases=decay_all)
    params = {"mlp": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "input_norm": {"scale": jnp.ones((3, 2))},
              "embed": {"embedding": jnp.ones((4, 2))}}
    tx = make_optimizer(cfg, total_steps=10)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = jax.tree.map(jnp.add, params, updates)
    exempt = 1.0 if not decay_all else 0.99
    np.testing.assert_allclose(new["mlp"]["kernel"], 0.99, rtol=1e-6)
    np.testing.assert_allclose(new["embed"]["embedding"], 0.99, rtol=1e-6)
    np.testing.assert_allclose(new["mlp"]["bias"], exempt, rtol=1e-6)
    np.testing.assert_allclose(new["input_norm"]["scale"], exempt, rtol=1e-6)


def test_current_learning_rate_follows_updates():
    cfg = OptimConfig(learning_rate=PEAK)
    schedule = make_schedule(cfg, 100)
    tx = make_optimizer(cfg, 100)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    assert int(update_count(state)) == 0
    np.testing.assert_allclose(current_learning_rate(schedule, state), 0.0)
    update = jax.jit(tx.update)
    for _ in range(5):
        _, state = update({"w": jnp.ones(2)}, state, params)
    assert int(update_count(state)) == 5
    lr = jax.jit(lambda s: current_learning_rate(schedule, s))(state)
    np.testing.assert_allclose(lr, PEAK / 2, rtol=1e-6)


def test_weight_decay_defaults_to_learning_rate():
    assert OptimConfig(learning_rate=1e-6).resolved_weight_decay == 1e-6
    assert OptimConfig(learning_rate=1e-6, weight_decay=0.0).resolved_weight_decay == 0.0


@pytest.mark.parametrize("field, value, match", [
    ("warmup_ratio", 1.0, "optim.warmup_ratio"),
    ("learning_rate", 0.0, "optim.learning_rate"),
    ("grad_clip_norm", -1.0, "optim.grad_clip_norm"),
    ("b2", 1.0, "optim.b2"),
    ("mu_dtype", "float16", "optim.mu_dtype"),
    ("grad_clip_norm", float("nan"), "optim.grad_clip_norm"),
    ("weight_decay", float("nan"), "optim.weight_decay"),
    # Infinite: eps would silently zero every gradient step (only weight decay would act), a
    # rate or a decay would make every update non-finite.
    ("eps", float("inf"), "optim.eps=inf: must be a finite number > 0"),
    ("learning_rate", float("inf"), "optim.learning_rate=inf"),
    ("weight_decay", float("inf"), "optim.weight_decay=inf"),
])
def test_invalid_config_names_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        make_optimizer(OptimConfig(**{field: value}), total_steps=10)


def test_zero_total_steps_is_an_error():
    with pytest.raises(ConfigError, match="total_steps"):
        make_schedule(OptimConfig(), 0)
