"""The CPU decode attention kernel (cloud_jax/model/cpu_attention.py) against XLA's attention, its
use in the feature-major decode step, and its build, cache and fallback."""

import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.model import cpu_attention, with_shared_prefix
from cloud_jax.model import decode_step as ds
from cloud_jax.model.config import ModelConfig
from cloud_jax.model.layers import gqa_attention
from cloud_jax.sampling.loop import prefill
from cloud_jax.sharding import SAMPLE_RULES
from model_helpers import random_params

pytestmark = pytest.mark.skipif(cpu_attention._compiler() is None,
                                reason="no C++ compiler: the kernel cannot be built here")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_attention.available(), cpu_attention.unavailable_reason()


def _inputs(seed, groups, rows_per_group, kv, g, d, p, s, masked_row=True):
    rng = np.random.default_rng(seed)
    b = groups * rows_per_group

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q = normal(b, 1, kv * g, d)
    pk, pv = normal(groups, kv, d, p), normal(groups, kv, p, d)
    k, v = normal(b, kv, d, s), normal(b, kv, s, d)
    pmask = rng.random((b, 1, p)) < 0.8
    mask = rng.random((b, 1, s)) < 0.6
    if masked_row:
        pmask[0] = False  # a row that sees only its own keys
        pmask[-1], mask[-1] = False, False  # a row that sees nothing: XLA averages every value
    return q, k, v, jnp.asarray(mask), (pk, pv, jnp.asarray(pmask))


@pytest.mark.parametrize("groups,rows_per_group,kv,g,d,p,s", [
    (2, 8, 4, 3, 64, 512, 97),    # the bench's shape: 2 inputs x K=8, 12 heads, 4 KV heads
    (1, 1, 2, 4, 128, 40, 1),     # one row, head_dim 128, one own slot
    (3, 2, 1, 5, 48, 33, 17),     # a head_dim without its own kernel; odd lengths
    (2, 3, 2, 1, 8, 5, 5),        # tiny: every loop's remainder path
    (1, 4, 2, 2, 64, 16, 32),     # lengths at the vector width
])
def test_the_kernel_gives_xla_attention_values(groups, rows_per_group, kv, g, d, p, s):
    q, k, v, mask, prefix = _inputs(0, groups, rows_per_group, kv, g, d, p, s)
    assert cpu_attention.supports(q, k, v, prefix, True)
    want = jax.jit(lambda *a: gqa_attention(*a[:4], a[4], True))(q, k, v, mask, prefix)
    got = jax.jit(lambda *a: cpu_attention.decode_attention(*a[:4], a[4], True))(
        q, k, v, mask, prefix)
    assert got.shape == want.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)


def test_calls_it_does_not_cover_go_to_xla_attention():
    q, k, v, mask, prefix = _inputs(1, 2, 2, 2, 2, 16, 8, 4, masked_row=False)
    cases = {
        "keys not transposed": (q, jnp.swapaxes(k, 2, 3), v, mask,
                                (jnp.swapaxes(prefix[0], 2, 3), prefix[1], prefix[2]), False),
        "two new tokens": (jnp.concatenate([q, q], 1), k, v, jnp.concatenate([mask, mask], 1),
                           (prefix[0], prefix[1], jnp.concatenate([prefix[2]] * 2, 1)), True),
        "no prefix": (q, k, v, mask, None, True),
        "bfloat16": (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                     mask, tuple(x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
                                 for x in prefix), True),
    }
    for name, (q_, k_, v_, mask_, prefix_, transposed) in cases.items():
        assert not cpu_attention.supports(q_, k_, v_, prefix_, transposed), name
        lowered = jax.jit(lambda *a: cpu_attention.decode_attention(*a, transposed)).lower(
            q_, k_, v_, mask_, prefix_).as_text()
        assert cpu_attention.TARGET not in lowered, name
        np.testing.assert_array_equal(
            np.asarray(cpu_attention.decode_attention(q_, k_, v_, mask_, prefix_, transposed),
                       np.float32),
            np.asarray(gqa_attention(q_, k_, v_, mask_, prefix_, transposed), np.float32))


CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, tie_word_embeddings=True).validate()


def _decode_step_text(cfg):
    params = random_params(cfg, 3)
    ids = jnp.asarray([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]], jnp.int32)
    _, cache = prefill(params, ids, (ids > 0).astype(jnp.int32), cfg=cfg, cache_len=5,
                       rules=tuple(SAMPLE_RULES))
    cache = with_shared_prefix(cfg, cache, 4, 6).with_keys_transposed()
    weights = ds.prepare_decode_weights(params, cfg)
    fed, live = jnp.asarray([1, 2, 3, 4], jnp.int32), jnp.ones((4,), bool)
    step = jax.jit(lambda w, c: ds.decode_step(params, w, cfg, fed, live, c))
    return step.lower(weights, cache).as_text()


def test_the_feature_major_step_calls_the_kernel_once_a_layer():
    assert _decode_step_text(CFG).count(f"custom_call @{cpu_attention.TARGET}(") == CFG.num_layers


def test_only_a_cpu_program_takes_it(monkeypatch):
    assert cpu_attention.active()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not cpu_attention.active()


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("CLOUD_JAX_CPU_ATTENTION", "0")
    assert not cpu_attention.available()
    assert "CLOUD_JAX_CPU_ATTENTION" in cpu_attention.unavailable_reason()
    # A new config, so the step is traced again rather than taken from jit's cache.
    cfg = dataclasses.replace(CFG, rms_norm_eps=1e-5).validate()
    assert cpu_attention.TARGET not in _decode_step_text(cfg)


def test_a_build_is_cached_and_rebuilt_for_a_new_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path))
    first = cpu_attention.build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_attention.build() == first and first.stat().st_mtime_ns == stamp
    assert [x.name for x in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_without_a_compiler_decoding_warns_once_and_uses_xla(tmp_path, monkeypatch):
    saved = dict(cpu_attention._state)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_attention._state.clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*set CXX"):
            assert not cpu_attention.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second ask does not warn again
            assert not cpu_attention.available()
        assert "no C++ compiler" in cpu_attention.unavailable_reason()
    finally:
        cpu_attention._state.clear()
        cpu_attention._state.update(saved)


def test_a_failed_build_says_what_the_compiler_said(tmp_path, monkeypatch):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx: error: unsupported option' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="unsupported option"):
        cpu_attention.build(str(fake))
    assert os.listdir(tmp_path / "cache") == []
