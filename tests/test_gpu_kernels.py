"""The Pallas decode attention (cloud_jax.model.gpu_kernels) against XLA's: the kernel alone
through Pallas's interpreter, a whole decode with model.decode_attention_impl=pallas, the
shapes it declines, and (with JAX's CUDA plugin) the kernel compiled by Triton for an H100."""

import dataclasses
import importlib.util
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.errors import ConfigError
from cloud_jax.model import gpu_kernels
from cloud_jax.model.config import ModelConfig
from cloud_jax.model.layers import gqa_attention
from cloud_jax.sampling import TopK, sample
from cloud_jax.training.config import load_config

needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
    reason="JAX's CUDA plugin not installed: pip install -r requirements-gpu-aot.txt")


def attention_inputs(inputs=2, rows=8, kv=2, group=2, d=16, prefix=40, own=37,
                     dtype=jnp.float32, seed=0):
    """q [B, 1, H, D], own k/v [B, KV, S, D], own mask [B, 1, S] and the prefix segment, with
    random masks (every row keeps at least one prefix key, as a decode's rows do)."""
    rng = np.random.default_rng(seed)
    b, h = inputs * rows, kv * group

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    pmask = rng.random((b, 1, prefix)) < 0.7
    pmask[:, :, 0] = True
    return (normal(b, 1, h, d), normal(b, kv, own, d), normal(b, kv, own, d),
            jnp.asarray(rng.random((b, 1, own)) < 0.6),
            (normal(inputs, kv, prefix, d), normal(inputs, kv, prefix, d), jnp.asarray(pmask)))


@pytest.mark.parametrize("shape", [
    dict(),                                          # both segments end in a partial block
    dict(rows=4, group=4, prefix=16, own=16),        # one block each, exactly
    dict(rows=16, group=1, d=32, prefix=300, own=70),  # several prefix blocks (64 keys each)
    dict(inputs=3, rows=2, group=8, prefix=129, own=20),
    dict(inputs=4, rows=1, group=4, prefix=50, own=17),  # K = 1: 4 query rows a program
    dict(inputs=3, rows=1, group=1, prefix=33, own=300),  # one row: several own blocks
])
def test_kernel_equals_xla_attention(shape):
    q, k, v, mask, prefix = attention_inputs(**shape)
    want = gqa_attention(q, k, v, mask, prefix)
    got = gpu_kernels.decode_attention(q, k, v, mask, prefix, interpret=True)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)


def test_kernel_in_bfloat16_and_with_fully_masked_blocks():
    q, k, v, mask, (pk, pv, pmask) = attention_inputs(prefix=70, own=40, dtype=jnp.bfloat16,
                                                      seed=1)
    # Keys 16.. of the prefix and all but the first own slot masked: whole blocks without a key.
    pmask = pmask.at[:, :, 16:].set(False)
    mask = mask.at[:, :, 1:].set(False).at[:, :, 0].set(True)
    want = gqa_attention(q, k, v, mask, (pk, pv, pmask)).astype(jnp.float32)
    got = gpu_kernels.decode_attention(q, k, v, mask, (pk, pv, pmask), interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want),
                               atol=3e-2, rtol=0)


def test_supported_shapes_and_blocks():
    assert gpu_kernels.supported(8, 4, 64, 1024, 257)      # the GPU bench: 32 x K = 8, Llama 1B
    assert gpu_kernels.blocks(8, 1024, 257) == (64, 16)
    assert gpu_kernels.blocks(1, 40, 300) == (32, 128)
    assert gpu_kernels.supported(1, 4, 64, 1024, 257)      # K = 1 (Triton pads the 4 rows)
    assert not gpu_kernels.supported(3, 4, 64, 1024, 257)  # K = 3: not a power of two
    assert not gpu_kernels.supported(8, 3, 64, 192, 97)    # SmolLM2: 3 query heads per KV head
    assert not gpu_kernels.supported(8, 4, 48, 1024, 257)  # head size not a power of two
    assert not gpu_kernels.supported(8, 4, 64, 1024, 12)   # own cache under one block
    q, k, v, mask, prefix = attention_inputs(rows=3, group=2)
    with pytest.raises(ValueError, match="K=3, G=2"):
        gpu_kernels.decode_attention(q, k, v, mask, prefix)


def test_transposed_keys_or_a_mesh_of_several_devices_keep_xla(monkeypatch):
    """The kernel reads keys [.., S, D] on one device: a cache of transposed keys (the CPU's
    feature-major step) or a decode split over a mesh (a Pallas call is not partitioned) keeps
    XLA's attention, with a warning naming why."""
    import types

    from cloud_jax.model import layers

    q, k, v, mask, prefix = attention_inputs(seed=2)
    assert layers._pallas_decode(q, k, prefix, False)
    transposed = (jnp.swapaxes(prefix[0], 2, 3), jnp.swapaxes(prefix[1], 2, 3), prefix[2])
    with pytest.warns(UserWarning, match="this cache stores them transposed"):
        assert not layers._pallas_decode(q, jnp.swapaxes(k, 2, 3), transposed, True)
    monkeypatch.setattr(jax.sharding, "get_abstract_mesh",
                        lambda: types.SimpleNamespace(size=4))
    with pytest.warns(UserWarning, match="a mesh of 4"):
        assert not layers._pallas_decode(q, k, prefix, False)


def test_config_names_the_implementation():
    assert ModelConfig().decode_attention_impl == "xla"
    ModelConfig(decode_attention_impl="pallas").validate()
    with pytest.raises(ConfigError, match="decode_attention_impl='triton'"):
        ModelConfig(decode_attention_impl="triton").validate()


# hidden 64 over 4 heads: head size 16; 2 KV heads of 2 query heads; K = 8 rows per input.
CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2)
PALLAS = dataclasses.replace(CFG, decode_attention_impl="pallas")
PREFIXES = [[1, 5, 9, 2, 7, 3, 3, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 2],
            [3, 4, 5, 6, 7, 8, 9, 10, 11], [20]]


@pytest.fixture(scope="module")
def params():
    from cloud_jax.model import param_shapes

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                        param_shapes(CFG))


def test_decode_with_the_kernel_gives_the_same_critiques(params):
    """A whole decode (sampled, K = 8, rows ending at different steps; and greedy, K = 1) with
    the kernel in every step's attention: the same tokens, lengths and rewards as with XLA's
    attention."""
    settings = dict(max_new_tokens=20, stop_ids=(62,), num_samples=8, method=TopK(20, 1.5),
                    seed=3, budgets=[20, 9, 20], decode_layout="standard")
    xla = sample(CFG, params, PREFIXES, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel takes every step: no fallback warning
        pallas = sample(PALLAS, params, PREFIXES, **settings)
    assert len(set(xla.lengths.ravel().tolist())) > 2
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)
    np.testing.assert_array_equal(pallas.lengths, xla.lengths)
    np.testing.assert_allclose(pallas.rewards, xla.rewards, atol=1e-5, rtol=0)
    # A second decode compiles nothing (jax 0.11's interpreter, imported inside the first trace,
    # would change every jit's cache key once: gpu_kernels loads it ahead).
    from cloud_jax.sampling import loop

    compiled = loop.decode._cache_size(), loop.prefill._cache_size()
    again = sample(PALLAS, params, PREFIXES, **settings)
    assert (loop.decode._cache_size(), loop.prefill._cache_size()) == compiled
    np.testing.assert_array_equal(again.tokens, pallas.tokens)
    # K = 1, greedy: 2 query rows a program.
    greedy = dict(max_new_tokens=20, stop_ids=(62,), decode_layout="standard")
    np.testing.assert_array_equal(sample(PALLAS, params, PREFIXES, **greedy).tokens,
                                  sample(CFG, params, PREFIXES, **greedy).tokens)


def test_a_shape_the_kernel_declines_keeps_xla_with_a_warning(params):
    settings = dict(max_new_tokens=20, stop_ids=(62,), num_samples=3, seed=3,
                    method=TopK(20, 1.5), decode_layout="standard")
    with pytest.warns(UserWarning, match="does not take K=3 rows per input x G=2"):
        pallas = sample(PALLAS, params, PREFIXES, **settings)
    xla = sample(CFG, params, PREFIXES, **settings)
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)


@needs_cuda_plugin
def test_kernel_compiles_for_an_h100_in_one_call_a_layer(capsys):
    """`aot --topology h100` with the kernel: Triton compiles it (no GPU needed), one call per
    layer in each decode iteration, and the iteration launches fewer operations than XLA's."""
    from cloud_jax.cli import aot

    def decode_ops(*overrides):
        # Overrides before and after the flags (the command reads them intermixed).
        rc = aot.main(["--config", "configs/tiny_cpu_cloud.yaml", "data.max_length=32",
                       "--topology", "h100",
                       "--sample-only", "--prefix-len", "16", "--num-samples", "8",
                       "--max-new-tokens", "16", "--decode-phases", "1", *overrides])
        out = capsys.readouterr().out
        assert rc == 0, out
        return int(re.search(r"(\d+) operations launched per iteration", out).group(1))

    texts = []
    original = aot._compile

    def keep(name, fn, **kw):
        compiled, res = original(name, fn, **kw)
        texts.append(compiled.as_text())
        return compiled, res

    xla = decode_ops()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "_compile", keep)
        pallas = decode_ops("model.decode_attention_impl=pallas")
    assert pallas < xla
    triton = [t.count('custom_call_target="__gpu$xla.gpu.triton"') for t in texts]
    assert triton[-1] == 2  # the decode: one kernel per layer (2 layers), prefill none
    assert sum(triton[:-1]) == 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed: pip install -r requirements-tpu.txt")
def test_a_program_compiled_for_a_tpu_keeps_xla_attention(capsys, monkeypatch):
    """With model.decode_attention_impl=pallas, a decode compiled for a TPU (one chip) takes
    XLA's attention (the kernel is Triton's): the same program as with xla, operation for
    operation, where the interpreter's would differ."""
    from cloud_jax.cli import aot

    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_ACCELERATOR_TYPE", "v5e-1")):
        monkeypatch.setenv(key, value)

    def decode_ops(impl):
        rc = aot.main(["--config", "configs/tiny_cpu_cloud.yaml", "--topology", "v5e-1",
                       "--sample-only", "--prefix-len", "16", "--num-samples", "8",
                       "--max-new-tokens", "16", "--decode-phases", "1",
                       f"model.decode_attention_impl={impl}"])
        out = capsys.readouterr().out
        assert rc == 0, out
        return re.search(r"sampling decode .*\n(  .*\n)*?  (\d+ loop\(s\), \d+ operations)",
                         out).group(2)

    with warnings.catch_warnings():
        # Taken on one chip: no warning that it was declined.
        warnings.filterwarnings("error", message="model.decode_attention_impl")
        assert decode_ops("pallas") == decode_ops("xla")


def test_the_model_commands_and_init_from_keep_the_choice(tmp_path):
    """--decode-attention-impl (score, critique, evaluate, serve) reaches the loaded model, and
    a run's model.decode_attention_impl (like attention_impl) applies to weights it loads with
    init_from instead of the checkpoint's default."""
    import argparse

    from cloud_jax.cli.common import add_model_args, load_model
    from cloud_jax.training import loop
    from model_helpers import tiny_reward_model

    ckpt = tiny_reward_model(0).save_pretrained(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    for flag, want in (([], "xla"), (["--decode-attention-impl", "pallas"], "pallas")):
        rm = load_model(parser.parse_args(["--checkpoint", str(ckpt), *flag]))
        assert rm.config.decode_attention_impl == want
    # A run that starts from those weights (init_from) computes as its model section says.
    arch = ["model.vocab_size=264", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2"]
    for impl in ("xla", "pallas"):
        cfg = load_config("configs/tiny_cpu_cloud.yaml", arch + [
            f"init_from={ckpt}", f"model.decode_attention_impl={impl}"])
        _, model_cfg = loop._initial_params(cfg, None)
        assert model_cfg.decode_attention_impl == impl
