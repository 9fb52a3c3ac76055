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
