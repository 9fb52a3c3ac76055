"""The CPU decode kernels (cloud_jax/model/cpu_kernels.py) against XLA's attention and dot, their
use in the feature-major decode step, and their build, cache, switches and fallback."""

import dataclasses
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.model import cpu_kernels, with_shared_prefix
from cloud_jax.model import decode_step as ds
from cloud_jax.model.config import ModelConfig
from cloud_jax.model.config import RopeScalingConfig
from cloud_jax.model.layers import apply_rope, gqa_attention, rope_inv_freq, rope_tables
from cloud_jax.sampling.loop import prefill
from cloud_jax.sharding import SAMPLE_RULES
from model_helpers import random_params

pytestmark = pytest.mark.skipif(cpu_kernels._compiler() is None,
                                reason="no C++ compiler: the kernel cannot be built here")


@pytest.fixture(scope="module", autouse=True)
def built():
    for name in cpu_kernels.KERNELS:
        assert cpu_kernels.available(name), cpu_kernels.unavailable_reason(name)


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
    assert cpu_kernels.supports(q, k, v, prefix, True)
    want = jax.jit(lambda *a: gqa_attention(*a[:4], a[4], True))(q, k, v, mask, prefix)
    got = jax.jit(lambda *a: cpu_kernels.decode_attention(*a[:4], a[4], True))(
        q, k, v, mask, prefix)
    assert got.shape == want.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("p,s", [(512, 97), (40, 33), (16, 5)])
def test_keys_outside_the_attended_spans_are_not_read(p, s):
    # As in a decode: each group's prompt left-padded (its rows share the prefix mask), each
    # row's own slots filled up to its step; one row attends to nothing at all. The keys and
    # values outside what a row attends to are large, so reading them would show.
    groups, rows, kv, g, d = 2, 4, 2, 3, 64
    q, k, v, _, (pk, pv, _) = _inputs(7, groups, rows, kv, g, d, p, s, masked_row=False)
    b = groups * rows
    pads = [3 * p // 8, 0]  # group 0 left-padded
    filled = [s, 1, s // 2, 0, s - 1, 2, s // 3 + 1, 5]  # own slots per row; row 3 none
    pmask = np.zeros((b, 1, p), bool)
    mask = np.zeros((b, 1, s), bool)
    for row in range(b):
        pmask[row, 0, pads[row // rows]:] = True
        mask[row, 0, :min(filled[row], s)] = True
    pmask[3] = False  # row 3: nothing to attend to, so every value is averaged
    pk, pv = np.array(pk), np.array(pv)
    k, v = np.array(k), np.array(v)
    pk[0, :, :, :pads[0]] = 1e4
    pv[0, :, :pads[0]] = 1e4
    for row in range(b):
        if row != 3:
            k[row, :, :, filled[row]:] = 1e4
            v[row, :, filled[row]:] = 1e4
    prefix = (jnp.asarray(pk), jnp.asarray(pv), jnp.asarray(pmask))
    args = (q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), prefix)
    want = jax.jit(lambda *a: gqa_attention(*a[:4], a[4], True))(*args)
    got = jax.jit(lambda *a: cpu_kernels.decode_attention(*a[:4], a[4], True))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert np.abs(np.asarray(got)[3]).max() > 100  # row 3 averaged the large values too


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
        assert not cpu_kernels.supports(q_, k_, v_, prefix_, transposed), name
        lowered = jax.jit(lambda *a: cpu_kernels.decode_attention(*a, transposed)).lower(
            q_, k_, v_, mask_, prefix_).as_text()
        assert cpu_kernels.ATTENTION_TARGET not in lowered, name
        np.testing.assert_array_equal(
            np.asarray(cpu_kernels.decode_attention(q_, k_, v_, mask_, prefix_, transposed),
                       np.float32),
            np.asarray(gqa_attention(q_, k_, v_, mask_, prefix_, transposed), np.float32))


CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, tie_word_embeddings=True).validate()


@pytest.mark.parametrize("groups,rows,kv,g,d,p,s,start", [
    (2, 8, 4, 3, 64, 512, 97, 40),   # the bench's shape
    (1, 3, 1, 2, 16, 7, 5, 4),       # the last slot; lengths below a vector
    (3, 1, 2, 2, 128, 33, 17, 30),   # a start past the end writes the last slot, as XLA does
])
def test_the_fused_attention_writes_the_cache_and_attends(groups, rows, kv, g, d, p, s, start):
    rng = np.random.default_rng(d + s)
    b, h = groups * rows, kv * g

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    qkv = normal((h + 2 * kv) * d, b)
    k_cache, v_cache = normal(b, kv, d, s), normal(b, kv, s, d)
    pk, pv = normal(groups, kv, d, p), normal(groups, kv, p, d)
    positions = jnp.asarray(rng.integers(0, 1000, b), jnp.int32)
    cos, sin = rope_tables(positions[:, None], rope_inv_freq(d, 10000.0, RopeScalingConfig()))
    slot = min(start, s - 1)
    mask = jnp.asarray(np.arange(s)[None, :] <= slot - rng.integers(0, 3, (b, 1)))
    pmask = jnp.asarray(np.arange(p)[None, :] >= rng.integers(0, p // 2, (b, 1)))

    def reference(qkv, k_cache, v_cache):
        def heads(x, count):
            return jnp.transpose(x.reshape(count, d, b, 1), (2, 3, 0, 1))
        q = apply_rope(heads(qkv[:h * d], h), None, None, (cos, sin))
        k = apply_rope(heads(qkv[h * d:(h + kv) * d], kv), None, None, (cos, sin))
        v = heads(qkv[(h + kv) * d:], kv)
        k_cache = jax.lax.dynamic_update_slice(k_cache, jnp.transpose(k, (0, 2, 3, 1)),
                                               (0, 0, 0, start))
        v_cache = jax.lax.dynamic_update_slice(v_cache, jnp.swapaxes(v, 1, 2), (0, 0, start, 0))
        out = gqa_attention(q, k_cache, v_cache, mask[:, None], (pk, pv, pmask[:, None]), True)
        return jnp.transpose(out.reshape(b, h * d)), k_cache, v_cache

    def fused(qkv, k_cache, v_cache):
        return cpu_kernels.decode_attention_write(
            qkv, cos.reshape(b, d), sin.reshape(b, d), jnp.int32(start), k_cache, v_cache, mask,
            (pk, pv, pmask), h)

    want = jax.jit(reference)(qkv, k_cache, v_cache)
    lowered = jax.jit(fused).lower(qkv, k_cache, v_cache).as_text()
    assert cpu_kernels.ATTENTION_WRITE_TARGET in lowered
    got = jax.jit(fused, donate_argnums=(1, 2))(qkv, jnp.array(k_cache), jnp.array(v_cache))
    for name, a, e in zip(("out", "keys", "values"), got, want):
        assert a.shape == e.shape, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-5, atol=2e-5,
                                   err_msg=name)
    with pytest.raises(ValueError, match="does not hold 5 query heads"):
        cpu_kernels.decode_attention_write(qkv, cos.reshape(b, d), sin.reshape(b, d), 0,
                                           k_cache, v_cache, mask, (pk, pv, pmask), 5)


def _decode_step_text(cfg, table=False):
    params = random_params(cfg, 3)
    ids = jnp.asarray([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]], jnp.int32)
    _, cache = prefill(params, ids, (ids > 0).astype(jnp.int32), cfg=cfg, cache_len=5,
                       rules=tuple(SAMPLE_RULES))
    cache = with_shared_prefix(cfg, cache, 4, 6).with_keys_transposed()
    weights = ds.prepare_decode_weights(params, cfg)
    fed, live = jnp.asarray([1, 2, 3, 4], jnp.int32), jnp.ones((4,), bool)
    rope = ds.rope_table(cfg, 16) if table else None
    step = jax.jit(lambda w, c: ds.decode_step(params, w, cfg, fed, live, c, rope))
    return step.lower(weights, cache).as_text()


@pytest.mark.parametrize("table", [False, True])
def test_the_feature_major_step_calls_the_kernels(table):
    text = _decode_step_text(CFG, table)
    # With the loop's rope table the attention call also applies RoPE and writes the cache.
    calls = {cpu_kernels.ATTENTION_TARGET: 0 if table else CFG.num_layers,
             cpu_kernels.ATTENTION_WRITE_TARGET: CFG.num_layers if table else 0}
    for target, count in calls.items():
        assert text.count(f"custom_call @{target}(") == count, target
    # q/k/v, o, gate/up and down a layer, and the LM head: each one matrix (one block of rows).
    assert text.count(f"custom_call @{cpu_kernels.MATMUL_TARGET}(") == 4 * CFG.num_layers + 1
    weights = ds.prepare_decode_weights(random_params(CFG, 3), CFG)
    assert len(weights.lm_head) == 1 and all(len(w.qkv) == 1 for w in weights.layers)


def test_only_a_cpu_program_takes_them(monkeypatch):
    assert cpu_kernels.active("attention") and cpu_kernels.active("matmul")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not cpu_kernels.active("attention") and not cpu_kernels.active("matmul")
    assert not ds._kernel_matmul(CFG)


@pytest.mark.parametrize("value,attention,matmul", [
    ("0", False, False), ("none", False, False), ("attention", True, False),
    ("matmul", False, True), (" matmul , attention ", True, True), ("all", True, True)])
def test_the_environment_picks_the_kernels(monkeypatch, value, attention, matmul):
    monkeypatch.setenv("CLOUD_JAX_CPU_KERNELS", value)
    assert (cpu_kernels.available("attention"), cpu_kernels.available("matmul")) == (
        attention, matmul)
    for name, on in (("attention", attention), ("matmul", matmul)):
        assert (cpu_kernels.unavailable_reason(name) is None) == on
        if not on:
            assert "CLOUD_JAX_CPU_KERNELS" in cpu_kernels.unavailable_reason(name)
    # A new config, so the step is traced again rather than taken from jit's cache.
    cfg = dataclasses.replace(CFG, rms_norm_eps=1e-5 + len(value) * 1e-7).validate()
    text = _decode_step_text(cfg)
    assert (cpu_kernels.ATTENTION_TARGET in text) == attention
    assert (cpu_kernels.MATMUL_TARGET in text) == matmul


def test_an_unknown_kernel_name_is_an_error(monkeypatch):
    monkeypatch.setenv("CLOUD_JAX_CPU_KERNELS", "attention,flash")
    with pytest.raises(ValueError, match="unknown kernel.*flash.*attention, matmul"):
        cpu_kernels.available("matmul")
    with pytest.raises(ValueError, match="kernel 'flash'"):
        cpu_kernels.active("flash")


@pytest.mark.parametrize("out,inner,n", [
    (1280, 768, 16),   # the bench's q/k/v at 2 inputs x K=8
    (96, 64, 2),       # K = 1: two columns of one vector
    (37, 50, 17),      # a remainder of output rows (12-row blocks, then 4, then 1) and columns
    (5, 3, 1),         # tiny: a single column, rows below one block
    (70, 33, 40),      # two full vectors of columns and a partial third
    (200, 128, 32),    # two vectors of columns exactly
])
def test_the_matmul_kernel_gives_the_product(out, inner, n):
    rng = np.random.default_rng(out + n)
    w = jnp.asarray(rng.normal(size=(out, inner)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(inner, n)), jnp.float32)
    got = jax.jit(cpu_kernels.decode_matmul)(w, x)
    assert cpu_kernels.MATMUL_TARGET in jax.jit(cpu_kernels.decode_matmul).lower(w, x).as_text()
    want = np.asarray(w, np.float64) @ np.asarray(x, np.float64)
    assert got.shape == (out, n)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.sqrt(inner))


@pytest.mark.parametrize("prologue", ["none", "norm", "gated"])
@pytest.mark.parametrize("residual,transposed", [(False, False), (True, False), (False, True),
                                                 (True, True)])
@pytest.mark.parametrize("out,inner,n", [(768, 256, 16), (37, 50, 17), (5, 3, 1)])
def test_the_matmul_kernel_fuses_the_operations_around_the_product(prologue, residual,
                                                                   transposed, out, inner, n):
    rng = np.random.default_rng(out * n + len(prologue))
    w = rng.normal(size=(out, inner))
    x = rng.normal(size=(2 * inner if prologue == "gated" else inner, n))
    scale = rng.normal(size=inner)
    r = rng.normal(size=(n, out) if transposed else (out, n))
    if prologue == "norm":  # layers.rms_norm in float64
        xin = x / np.sqrt((x * x).mean(0, keepdims=True) + 1e-5) * scale[:, None]
    elif prologue == "gated":
        xin = x[:inner] / (1 + np.exp(-x[:inner])) * x[inner:]
    else:
        xin = x
    want = w @ xin
    want = (want.T if transposed else want) + (r if residual else 0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    kwargs = dict(norm=f32(scale) if prologue == "norm" else None, eps=1e-5,
                  gated=prologue == "gated", residual=f32(r) if residual else None,
                  transposed=transposed)
    call = jax.jit(lambda w, x: cpu_kernels.decode_matmul(w, x, **kwargs))
    assert cpu_kernels.MATMUL_TARGET in call.lower(f32(w), f32(x)).as_text()
    got = np.asarray(call(f32(w), f32(x)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * np.sqrt(inner))
    # bfloat16 goes to the same operations in XLA.
    bf = lambda a: None if a is None else a.astype(jnp.bfloat16)  # noqa: E731
    kwargs_bf = dict(kwargs, norm=bf(kwargs["norm"]), residual=bf(kwargs["residual"]))
    got_bf = cpu_kernels.decode_matmul(bf(f32(w)), bf(f32(x)), **kwargs_bf)
    assert got_bf.dtype == jnp.bfloat16 and got_bf.shape == want.shape
    np.testing.assert_allclose(np.asarray(got_bf, np.float32), want, rtol=0.1,
                               atol=0.1 * np.sqrt(inner))


def test_the_matmul_kernel_leaves_other_dtypes_to_xla_and_checks_shapes():
    w = jnp.ones((8, 4), jnp.bfloat16)
    x = jnp.ones((4, 3), jnp.bfloat16)
    lowered = jax.jit(cpu_kernels.decode_matmul).lower(w, x).as_text()
    assert cpu_kernels.MATMUL_TARGET not in lowered
    np.testing.assert_array_equal(np.asarray(cpu_kernels.decode_matmul(w, x), np.float32), 4.0)
    w, x = jnp.ones((8, 4)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"W \(8, 4\) takes x \[4, n\], got \(5, 3\)"):
        cpu_kernels.decode_matmul(w, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"takes x \[8, n\] \(the gated unit"):
        cpu_kernels.decode_matmul(w, x, gated=True)
    with pytest.raises(ValueError, match=r"expected W \[out, in\] and x \[in, n\]"):
        cpu_kernels.decode_matmul(w, jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"norm must be \[4\]"):
        cpu_kernels.decode_matmul(w, x, norm=jnp.ones((8,)))
    with pytest.raises(ValueError, match="exclusive"):
        cpu_kernels.decode_matmul(w, jnp.ones((8, 3)), norm=jnp.ones((4,)), gated=True)
    with pytest.raises(ValueError, match=r"residual must be \(3, 8\)"):
        cpu_kernels.decode_matmul(w, x, residual=jnp.ones((8, 3)), transposed=True)


def test_a_build_is_cached_and_rebuilt_for_a_new_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path))
    first = cpu_kernels.build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp
    assert [x.name for x in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_a_cached_build_is_readable_as_the_umask_allows(tmp_path, monkeypatch):
    """A cache shared by several users (a cache dir set up by one account, used by another) is
    only of use when the others can load its library: the file takes the umask's permissions, as
    any file the compiler writes, not those of a private temporary file (0600)."""
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path))
    old = os.umask(0o022)
    try:
        built = cpu_kernels.build()
    finally:
        os.umask(old)
    assert built.stat().st_mode & 0o777 == 0o755
    assert [x.name for x in tmp_path.iterdir()] == [built.name]  # no temporary files left


def test_without_a_compiler_decoding_warns_once_and_uses_xla(tmp_path, monkeypatch):
    saved = dict(cpu_kernels._state)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_kernels._state.clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*set CXX"):
            assert not cpu_kernels.available("matmul")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second ask does not warn again
            assert not cpu_kernels.available("matmul")
        assert "no C++ compiler" in cpu_kernels.unavailable_reason("matmul")
    finally:
        cpu_kernels._state.clear()
        cpu_kernels._state.update(saved)


def test_a_target_that_is_no_march_name_is_refused_before_the_compiler_runs(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CLOUD_JAX_KERNEL_ARCH", "native -o /tmp/x")
    with pytest.raises(RuntimeError, match="CLOUD_JAX_KERNEL_ARCH=.* is not a -march target"):
        cpu_kernels.build()
    assert os.listdir(tmp_path) == []


def test_the_loaded_library_is_built_for_this_cpu():
    """Without CLOUD_JAX_KERNEL_ARCH the library targets this CPU: 16-float vectors where it has
    AVX-512, else 8."""
    if os.environ.get("CLOUD_JAX_KERNEL_ARCH", "native") != "native":
        pytest.skip("running under a chosen target")
    flags = cpu_kernels._cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to say what this CPU has")
    assert cpu_kernels.vector_floats() == (16 if "avx512f" in flags else 8)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86-64 target")
def test_the_avx2_build_passes_the_kernel_and_decode_step_tests(tmp_path):
    """The kernels' 8-float-vector code (AVX2 hosts), built with CLOUD_JAX_KERNEL_ARCH=x86-64-v3
    on any x86-64 machine that runs it, through this file's tests and the decode step's."""
    if os.environ.get("CLOUD_JAX_KERNEL_ARCH"):
        pytest.skip("already running under a chosen target")
    root = Path(__file__).resolve().parent.parent
    native = cpu_kernels.build()  # this process's library (cached): another target, another file
    env = dict(os.environ, CLOUD_JAX_KERNEL_ARCH="x86-64-v3",
               CLOUD_JAX_KERNEL_CACHE=str(tmp_path / "kernels"))
    check = ("from cloud_jax.model import cpu_kernels; assert cpu_kernels.available('matmul'); "
             "print(cpu_kernels.vector_floats())")
    done = subprocess.run([sys.executable, "-c", check], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "8"
    built = [p.name for p in (tmp_path / "kernels").glob("*.so")]
    assert len(built) == 1 and built[0] != native.name
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_cpu_kernels.py", "tests/test_decode_step.py", "-k", "not avx2_build"],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


def test_a_library_built_beyond_this_cpu_is_not_registered(monkeypatch):
    """A library whose code uses an extension the CPU lacks (say AVX-512, built for another
    target) would stop the process at its first call: it is refused with a warning instead,
    and decoding takes XLA's operations."""
    saved = dict(cpu_kernels._state)
    library = cpu_kernels._state["library"]
    bits = library.CloudJaxKernelExtensions()
    flags = cpu_kernels._cpu_flags()
    if platform.machine() != "x86_64" or flags is None or not bits:
        pytest.skip("an x86-64 Linux build")
    assert all(name in flags for bit, name in cpu_kernels._EXTENSION_BITS.items() if bits & bit)
    lacking = flags - {name for bit, name in cpu_kernels._EXTENSION_BITS.items() if bits & bit}
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: lacking)
    cpu_kernels._state.clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"uses .*which this CPU lacks: unset "
                                                r"CLOUD_JAX_KERNEL_ARCH"):
            assert not cpu_kernels.available("matmul")
        assert cpu_kernels.vector_floats() is None
    finally:
        cpu_kernels._state.clear()
        cpu_kernels._state.update(saved)


def test_a_failed_build_says_what_the_compiler_said(tmp_path, monkeypatch):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx: error: unsupported option' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="unsupported option"):
        cpu_kernels.build(str(fake))
    assert os.listdir(tmp_path / "cache") == []


def test_cxx_may_carry_arguments_as_make_takes_it(tmp_path, monkeypatch):
    """CXX is a command, as make and CMake read it ("ccache g++", "g++ -march=haswell"): its
    program is looked up and its arguments come first; a CXX that names no program says so."""
    log = tmp_path / "args"
    fake = tmp_path / "fake-cxx"
    fake.write_text('#!/bin/sh\necho "$@" >> "%s"\nwhile [ "$1" != "-o" ]; do shift; done\n'
                    'touch "$2"\n' % log)
    fake.chmod(0o755)
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("CXX", "fake-cxx -DFROM_CXX=1")
    assert cpu_kernels._compiler() is not None
    built = cpu_kernels.build()
    assert built.exists()
    args = log.read_text().split()
    assert args[0] == "-DFROM_CXX=1" and "-O3" in args
    monkeypatch.setenv("CXX", "no-such-cxx -DFROM_CXX=1")
    assert cpu_kernels._compiler() is None
    with pytest.raises(RuntimeError, match="CXX='no-such-cxx -DFROM_CXX=1' names no program"):
        cpu_kernels.build()


def test_another_source_and_flags_build_another_library(tmp_path, monkeypatch):
    """build(source=, extra_flags=) (tools/attention_ab.py's two versions): the extra flags
    reach the compiler after the usual ones, with the source given, and the library is cached
    under its own name."""
    log = tmp_path / "args"
    fake = tmp_path / "fake-cxx"
    fake.write_text('#!/bin/sh\necho "$@" >> "%s"\nwhile [ "$1" != "-o" ]; do shift; done\n'
                    'touch "$2"\n' % log)
    fake.chmod(0o755)
    other = tmp_path / "other.cc"
    other.write_text("// another version\n")
    monkeypatch.setenv("CLOUD_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    plain = cpu_kernels.build(str(fake))
    varied = cpu_kernels.build(str(fake), extra_flags=("-DVARIANT=1",))
    moved = cpu_kernels.build(str(fake), source=other)
    assert len({plain, varied, moved}) == 3 and all(x.exists() for x in (plain, varied, moved))
    calls = log.read_text().splitlines()
    assert "-DVARIANT" not in calls[0] and str(cpu_kernels._SOURCE) in calls[0]
    assert calls[1].split().index("-DVARIANT=1") > calls[1].split().index("-shared")
    assert str(other) in calls[2] and str(cpu_kernels._SOURCE) not in calls[2]
    assert cpu_kernels.build(str(fake), extra_flags=("-DVARIANT=1",)) == varied  # cached
    assert len(log.read_text().splitlines()) == 3
