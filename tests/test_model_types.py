"""The model's typed pytrees (cache, mask info, output) and the named scopes a profile shows."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cloud_jax.model import (CLoudModel, KVCache, LayerKV, MaskInfo, ModelOutput, PrefixSegment,
                             init_cache, init_params, last_attended_index, with_shared_prefix)
from cloud_jax.model.config import ModelConfig
from cloud_jax.sharding import SAMPLE_RULES, MeshConfig, make_mesh

CFG = ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2)
KV = PartitionSpec("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")
SLOTS = PartitionSpec("cache_batch", "cache_length")


def test_cache_logical_axes_follow_its_structure():
    cache = with_shared_prefix(CFG, init_cache(CFG, 2, 6), 4, 3)
    assert isinstance(cache, KVCache) and isinstance(cache.prefix, PrefixSegment)
    layers = tuple(LayerKV(k=KV, v=KV) for _ in range(CFG.num_layers))
    want = KVCache(layers=layers, valid=SLOTS, pos=SLOTS, end=PartitionSpec(),
                   prefix=PrefixSegment(layers=layers, valid=SLOTS, pos=SLOTS))
    assert cache.logical_axes() == want
    assert cache.prefix.layers[0].k.shape == (2, 2, 6, 8)
    assert cache.layers[0].k.shape == (4, 2, 3, 8)
    assert init_cache(CFG, 2, 6).logical_axes() == KVCache(
        layers=layers, valid=SLOTS, pos=SLOTS, end=PartitionSpec())


def test_cache_shardings_of_an_abstract_cache():
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    abstract = jax.eval_shape(lambda: init_cache(CFG, 2, 6))
    shardings = abstract.shardings(mesh, SAMPLE_RULES)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))


def test_mask_info_axes_leave_absent_parts_out():
    mask = jnp.ones((2, 5), jnp.int32)
    info = MaskInfo.uncached(mask, jnp.cumsum(mask, axis=1) - 1)
    axes = info.logical_axes()
    assert axes.k_valid == SLOTS and axes.q_slot == PartitionSpec("activation_length")
    assert axes.cache_end is None and axes.prefix_valid is None


def test_output_holds_what_was_asked_for():
    params = init_params(CFG, jax.random.key(0))
    ids = jnp.asarray([[3, 4, 5, 6]])
    mask = jnp.ones_like(ids)
    model = CLoudModel(CFG)
    out = model.apply({"params": params}, ids, mask)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (1, 4, CFG.vocab_size)
    assert out.rewards is None and out.lm is None and out.cache is None
    out = model.apply({"params": params}, ids, mask, reward_index_b=last_attended_index(mask),
                      return_logits=False, cache=init_cache(CFG, 1, 8))
    assert out.logits is None and out.rewards.shape == (1,)
    assert isinstance(out.cache, KVCache) and int(out.cache.end) == 4
    np.testing.assert_array_equal(out.cache.valid[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_profile_scopes_name_each_block():
    params = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)

    def fwd(p, i, m):
        return CLoudModel(CFG).apply({"params": p}, i, m, reward_index_b=last_attended_index(m))

    text = jax.jit(fwd).lower(params, ids, ids).as_text(debug_info=True)
    scopes = set()
    for name in re.findall(r'loc\("([^"]+)"', text):
        scopes.update(name.split("/"))
    for block in ("embed", "layers_0", "layers_1", "attention", "mlp", "final_norm", "lm_head",
                  "reward_head"):
        assert block in scopes, block
