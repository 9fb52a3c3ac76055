"""The feature-major decode step against the model's own forward, the phased decode cache, the
two-level categorical draw and the choice of layout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.model import init_cache, with_shared_prefix
from cloud_jax.model import decode_step as ds
from cloud_jax.model.config import ModelConfig
from cloud_jax.model.layers import rope_inv_freq, rope_tables
from cloud_jax.sampling import Temperature, sample
from cloud_jax.sampling.loop import phase_lengths, prefill
from cloud_jax.sampling.methods import _categorical
from cloud_jax.sharding import SAMPLE_RULES
from model_helpers import random_params

BASE = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2)
CONFIGS = {
    "untied": BASE,
    "tied_bias_window": dataclasses.replace(BASE, tie_word_embeddings=True, attention_bias=True,
                                            sliding_window=3),
    "one_kv_head_wide_heads": dataclasses.replace(BASE, num_kv_heads=1, head_dim=16,
                                                  rope_theta=500.0),
}


def _prefilled(cfg, params, rows_per_input=3, own_slots=5):
    ids = jnp.asarray([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    _, cache = prefill(params, ids, mask, cfg=cfg, cache_len=ids.shape[1],
                       rules=tuple(SAMPLE_RULES))
    return with_shared_prefix(cfg, cache, 2 * rows_per_input, own_slots)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_feature_major_steps_equal_the_model_forward(name, blocks):
    """Three decode steps (the last with a finished row) give the same logits, rewards and cache
    in both layouts; the feature-major cache holds its keys transposed."""
    cfg = CONFIGS[name].validate()
    params = random_params(cfg, 7)
    weights = ds.prepare_decode_weights(params, cfg, blocks=blocks)
    assert all(len(m) == blocks for m in (weights.layers[0].qkv, weights.lm_head))
    std = _prefilled(cfg, params)
    fm = std.with_keys_transposed()
    table = ds.rope_table(cfg, 16)
    rng = np.random.default_rng(0)
    for step in range(3):
        fed = jnp.asarray(rng.integers(1, cfg.vocab_size, 6), jnp.int32)
        live = jnp.asarray([True] * 5 + [step < 2])
        want_logits, want_rewards, std = ds.decode_step(params, None, cfg, fed, live, std)
        got_logits, got_rewards, fm = ds.decode_step(params, weights, cfg, fed, live, fm, table)
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(got_rewards), np.asarray(want_rewards),
                                   rtol=1e-5, atol=1e-5)
    for a, b in zip(std.layers, fm.layers):
        assert b.keys_transposed and not a.keys_transposed
        np.testing.assert_allclose(np.asarray(jnp.swapaxes(b.k, 2, 3)), np.asarray(a.k),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(b.v), np.asarray(a.v), rtol=1e-5, atol=1e-5)
    assert int(fm.end) == int(std.end) == 3
    np.testing.assert_array_equal(np.asarray(fm.valid), np.asarray(std.valid))


def test_feature_major_in_bfloat16_matches_the_first_step_closely():
    cfg = dataclasses.replace(BASE, dtype="bfloat16").validate()
    params = random_params(cfg, 3)
    cache = _prefilled(cfg, params)
    fed, live = jnp.arange(1, 7, dtype=jnp.int32), jnp.ones(6, bool)
    want = ds.decode_step(params, None, cfg, fed, live, cache)
    got = ds.decode_step(params, ds.prepare_decode_weights(params, cfg), cfg, fed, live,
                         cache.with_keys_transposed())
    assert got[0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=0.05, rtol=0.05)


def test_rope_table_rows_are_the_rotary_tables():
    cfg = CONFIGS["one_kv_head_wide_heads"]
    cos, sin = ds.rope_table(cfg, 40)
    positions = jnp.asarray([[0, 7, 39]])
    want_cos, want_sin = rope_tables(positions, rope_inv_freq(16, cfg.rope_theta,
                                                              cfg.rope_scaling))
    np.testing.assert_allclose(np.asarray(cos[positions[0]]), np.asarray(want_cos[0, :, 0]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin[positions[0]]), np.asarray(want_sin[0, :, 0]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_sampling_in_both_layouts_gives_the_same_critiques(penalty):
    """Temperature sampling with budgets, over enough steps to run every phase of the decode
    cache: the same tokens and (to rounding) the same rewards in both layouts."""
    cfg = CONFIGS["tied_bias_window"].validate()
    params = jax.tree.map(lambda x: 3 * x, random_params(cfg, 11))
    prefixes = [[5, 6, 7, 8, 9], [10, 11, 12], [3] * 20]
    kwargs = dict(max_new_tokens=70, stop_ids=(1,), num_samples=2, method=Temperature(1.0),
                  seed=5, budgets=[70, 33, 64], repetition_penalty=penalty)
    std = sample(cfg, params, prefixes, decode_layout="standard", **kwargs)
    fm = sample(cfg, params, prefixes, decode_layout="feature_major", **kwargs)
    prepared = sample(cfg, params, prefixes,
                      decode_weights=ds.prepare_decode_weights_jit(params, cfg=cfg), **kwargs)
    assert std.lengths.max() > phase_lengths(71)[0]  # the decode went past its first phase
    for out in (fm, prepared):
        np.testing.assert_array_equal(out.tokens, std.tokens)
        np.testing.assert_array_equal(out.lengths, std.lengths)
        np.testing.assert_allclose(out.rewards, std.rewards, rtol=1e-5, atol=1e-5)


def test_phases_of_the_decode_cache():
    assert phase_lengths(129) == [33, 65, 97, 129]
    assert phase_lengths(257) == [65, 129, 193, 257]
    assert phase_lengths(63) == [63] and phase_lengths(1) == [1]
    assert phase_lengths(129, 1) == [129] and phase_lengths(129, 2) == [65, 129]
    assert phase_lengths(65, 100) == list(range(1, 66))  # at most one loop a slot
    with pytest.raises(ValueError, match="decode_phases=0"):
        phase_lengths(129, 0)
    cfg = BASE.validate()
    cache = init_cache(cfg, 4, 5)
    grown = cache.grown(9).with_keys_transposed().grown(12)
    assert grown.valid.shape == (4, 12) and grown.layers[0].v.shape == (4, 2, 12, 8)
    assert grown.layers[0].k.shape == (4, 2, 8, 12)
    with pytest.raises(ValueError, match="cannot shrink"):
        cache.grown(3)


def test_transposed_keys_name_their_logical_axes():
    cache = init_cache(BASE, 2, 4).with_keys_transposed()
    axes = cache.logical_axes().layers[0]
    assert tuple(axes.k) == ("cache_batch", "cache_kv_heads", "cache_head_dim", "cache_length")
    assert tuple(axes.v) == ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")


def test_the_layout_choice(monkeypatch):
    cfg = BASE.validate()
    assert ds.decode_layout(cfg) == "feature_major"  # the tests run on CPU
    mesh = jax.make_mesh((1,), ("data",))
    assert ds.decode_layout(cfg, mesh) == "feature_major"
    monkeypatch.setattr(ds, "_memory_bytes", lambda: 8 * ds.prepared_bytes(cfg) - 1)
    assert ds.decode_layout(cfg) == "standard"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(ds, "_memory_bytes", lambda: None)
    assert ds.decode_layout(cfg) == "standard"


def test_bad_layout_requests_are_clear_errors():
    cfg = BASE.validate()
    params = random_params(cfg, 1)
    with pytest.raises(ValueError, match="decode layout 'fast'"):
        sample(cfg, params, [[1, 2]], max_new_tokens=2, stop_ids=(0,), decode_layout="fast")
    with pytest.raises(ValueError, match="feature_major layout, not standard"):
        sample(cfg, params, [[1, 2]], max_new_tokens=2, stop_ids=(0,), decode_layout="standard",
               decode_weights=ds.prepare_decode_weights(params, cfg))
    with pytest.raises(ValueError, match="blocks=0"):
        ds.prepare_decode_weights(params, cfg, blocks=0)
    with pytest.raises(ValueError, match="unrolled layers"):
        ds.prepare_decode_weights(params, dataclasses.replace(cfg, scan_layers=True))


def test_the_two_level_draw_follows_the_distribution_over_many_blocks():
    """A vocabulary of 1000 entries (four blocks of 256, the last one partial), a third of them
    at -inf, mass at the block edges: frequencies match, and -inf entries are never drawn."""
    rng = np.random.default_rng(0)
    probs = rng.random(1000) ** 4
    probs[rng.random(1000) < 0.3] = 0.0
    probs[[255, 256, 999]] = [3.0, 3.0, 2.0]
    probs /= probs.sum()
    n = 100_000
    keys = jax.random.split(jax.random.key(1), n)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 1000))
    freq = np.bincount(np.asarray(jax.jit(_categorical)(logits, keys)), minlength=1000) / n
    assert freq[probs == 0].sum() == 0
    np.testing.assert_allclose(freq, probs, atol=0.006)
    np.testing.assert_allclose(freq[[255, 256, 999]], probs[[255, 256, 999]], rtol=0.05)


def test_the_two_level_draw_with_all_mass_on_one_entry():
    keys = jax.random.split(jax.random.key(2), 8)
    for hot in (0, 255, 256, 700, 999):
        logits = jnp.full((8, 1000), -jnp.inf).at[:, hot].set(0.0)
        assert (np.asarray(_categorical(logits, keys)) == hot).all()
