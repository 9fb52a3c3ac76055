"""Model invariants: cached decode = full forward, scan = unrolled, padding side, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.model.config import ModelConfig
from cloud_jax.model import (CLoudModel, init_cache, init_params, last_attended_index,
                             stack_layers, unstack_layers)
from cloud_jax.model.params import init_reward_head
from cloud_jax.sharding import MeshConfig, make_mesh

CFG = ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, sliding_window=None)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _full(params, ids, mask, cfg=CFG):
    return CLoudModel(cfg).apply({"params": params}, ids, mask,
                                 reward_index_b=last_attended_index(mask))


def test_reward_head_alone_equals_the_whole_models_head(params):
    """A pretrained backbone's head starts at random (checkpoints/hf.py): init_reward_head must
    give the very numbers init_params gives for the same seed, sharded or not."""
    for mesh in (None, make_mesh(MeshConfig())):
        head = init_reward_head(CFG, jax.random.key(0), mesh)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     head, params["reward_head"])
    other = init_reward_head(CFG, jax.random.key(1))
    assert not np.array_equal(other["dense"]["kernel"], params["reward_head"]["dense"]["kernel"])


def test_cached_decode_equals_full_forward(params):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 53, (2, 10)))
    # Row 1 is left-padded by 3: its cache slots 0..2 stay invalid throughout.
    mask = jnp.asarray(np.array([[1] * 10, [0] * 3 + [1] * 7]))
    full = _full(params, ids, mask).logits
    model = CLoudModel(CFG)
    cache = init_cache(CFG, 2, 16)
    out = model.apply({"params": params}, ids[:, :6], mask[:, :6], cache=cache)
    got = [out.logits]
    cache = out.cache
    for t in range(6, 10):
        out = model.apply({"params": params}, ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
        cache = out.cache
        got.append(out.logits)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    attended = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(got[attended], np.asarray(full)[attended], atol=1e-5, rtol=0)
    assert int(cache.end) == 10


def test_padding_side_does_not_change_results(params):
    ids = jnp.asarray([[7, 8, 9, 10, 0, 0], [0, 0, 7, 8, 9, 10]])
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    out = _full(params, ids, mask)
    np.testing.assert_allclose(out.logits[0, :4], out.logits[1, 2:], atol=1e-5)
    np.testing.assert_allclose(out.rewards[0], out.rewards[1], atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_layers_equals_unrolled(params, remat):
    ids = jnp.asarray([[3, 4, 5, 6, 7]])
    mask = jnp.ones_like(ids)
    want = _full(params, ids, mask)
    scan_cfg = dataclasses.replace(CFG, scan_layers=True, remat=remat)
    stacked = stack_layers(params, CFG.num_layers)
    got = _full(stacked, ids, mask, scan_cfg)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
    np.testing.assert_allclose(got.rewards, want.rewards, atol=1e-6)
    back = unstack_layers(stacked, CFG.num_layers)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


def test_gradients_flow_through_both_heads(params):
    ids = jnp.asarray([[3, 4, 5, 6]])
    mask = jnp.ones_like(ids)

    def loss(p):
        out = _full(p, ids, mask)
        return out.logits.sum() * 1e-3 + out.rewards.sum()

    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
    assert float(jnp.abs(grads["reward_head"]["dense"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["layers_0"]["mlp"]["up_proj"]["kernel"]).sum()) > 0


def test_bf16_compute_keeps_fp32_logits_and_reward(params):
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    ids = jnp.asarray([[3, 4, 5, 6]])
    out = _full(params, ids, jnp.ones_like(ids), cfg)
    assert out.logits.dtype == jnp.float32 and out.rewards.dtype == jnp.float32
    ref = _full(params, ids, jnp.ones_like(ids))
    np.testing.assert_allclose(out.logits, ref.logits, atol=5e-2)


def test_reward_dropout_is_active_only_in_training(params):
    cfg = dataclasses.replace(CFG, reward_dropout=0.5)
    ids = jnp.asarray([[3, 4, 5, 6]])
    mask = jnp.ones_like(ids)
    idx = last_attended_index(mask)
    model = CLoudModel(cfg)
    det = model.apply({"params": params}, ids, mask, reward_index_b=idx).rewards
    np.testing.assert_allclose(det, _full(params, ids, mask).rewards, atol=1e-6)
    r1 = model.apply({"params": params}, ids, mask, reward_index_b=idx, deterministic=False,
                     rngs={"dropout": jax.random.key(1)}).rewards
    assert not np.allclose(r1, det)


def test_shared_prefix_decode_equals_full_forward(params):
    """K rows per input read one cached prompt segment; results equal a full forward per row."""
    from cloud_jax.model import with_shared_prefix

    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(1, 53, (2, 6)))
    pmask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6])  # input 0 left-padded
    k, steps = 3, 4
    new = jnp.asarray(rng.integers(1, 53, (2 * k, steps)))
    model = CLoudModel(CFG)
    prefill = model.apply({"params": params}, prompts, pmask, cache=init_cache(CFG, 2, 6))
    cache = with_shared_prefix(CFG, prefill.cache, 2 * k, steps)
    got = []
    for t in range(steps):
        out = model.apply({"params": params}, new[:, t:t + 1], jnp.ones((2 * k, 1), jnp.int32),
                          cache=cache)
        cache = out.cache
        got.append(np.asarray(out.logits[:, 0]))
    got = np.stack(got, axis=1)
    full_ids = jnp.concatenate([jnp.repeat(prompts, k, axis=0), new], axis=1)
    full_mask = jnp.concatenate([jnp.repeat(pmask, k, axis=0), jnp.ones_like(new)], axis=1)
    want = np.asarray(_full(params, full_ids, full_mask).logits[:, 6:])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", [1, 4, 5])
def test_blockwise_causal_attention_equals_one_square(params, block):
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(1, 53, (2, 13)))
    mask = jnp.asarray([[1] * 13, [0] * 4 + [1] * 9])
    whole = _full(params, ids, mask, dataclasses.replace(CFG, causal_block_size=0))
    got = _full(params, ids, mask, dataclasses.replace(CFG, causal_block_size=block))
    attended = np.asarray(mask).astype(bool)  # pad queries see no key: their output is arbitrary
    np.testing.assert_allclose(np.asarray(got.logits)[attended],
                               np.asarray(whole.logits)[attended], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.rewards, whole.rewards, atol=1e-6, rtol=0)


def test_fused_attention_equals_ours_over_the_same_mask():
    """jax.nn.dot_product_attention (its XLA version; cuDNN's computes the same on a GPU) over
    our mask: grouped heads, causal, left and right padding."""
    from cloud_jax.model.layers import attention_mask, fused_attention, gqa_attention

    rng = np.random.default_rng(3)
    b, t, h, kv, d = 2, 9, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))
    valid = jnp.asarray([[1] * 7 + [0] * 2, [0] * 3 + [1] * 6])
    slots = jnp.arange(t)
    pos = jnp.broadcast_to(slots, (b, t))
    mask = attention_mask(slots, slots, valid, pos, pos, None)
    want = gqa_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask)
    got = fused_attention(q, k, v, mask, "xla")
    seen = np.asarray(valid).astype(bool)  # a padding query before every key sees none
    seen[0] = True  # row 0's trailing pads still see its tokens
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], atol=1e-5, rtol=0)


def test_the_cudnn_path_trains_like_ours_and_leaves_cached_forwards_alone(params, monkeypatch):
    """model.attention_impl=cudnn on this CPU, with the library's call made in its XLA version:
    the same logits, reward and gradients as the default path (bf16), and only cache-free
    forwards take it."""
    calls = []
    original = jax.nn.dot_product_attention

    def as_xla(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    fused = dataclasses.replace(cfg, attention_impl="cudnn")
    ids = jnp.asarray([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0]])
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2])

    def loss(p, c):
        out = _full(p, ids, mask, c)
        return out.logits[mask.astype(bool)].mean() + out.rewards.sum(), out

    (want_loss, want), want_grads = jax.value_and_grad(loss, has_aux=True)(params, cfg)
    assert calls == []
    (got_loss, got), got_grads = jax.value_and_grad(loss, has_aux=True)(params, fused)
    assert calls == ["cudnn"] * CFG.num_layers
    np.testing.assert_allclose(got.rewards, want.rewards, atol=2e-2)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=2e-2)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=5e-2 * float(np.abs(np.asarray(w)).max()) + 1e-6)
    calls.clear()
    CLoudModel(fused).apply({"params": params}, ids, mask, cache=init_cache(fused, 2, 8))
    assert calls == []  # a cached forward keeps our attention


def test_attention_impl_is_checked():
    from cloud_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="attention_impl='flash': expected xla or cudnn"):
        dataclasses.replace(CFG, attention_impl="flash").validate()
    with pytest.raises(ConfigError, match="needs model.dtype bfloat16 or float16"):
        dataclasses.replace(CFG, attention_impl="cudnn").validate()
    dataclasses.replace(CFG, attention_impl="cudnn", dtype="bfloat16").validate()
