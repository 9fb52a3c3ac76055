"""The Pallas decode attention (cloud_jax.model.gpu_kernels) against XLA's: the kernel alone
through Pallas's interpreter, a whole decode with model.decode_attention_impl=pallas, the
shapes it declines, and (with JAX's CUDA plugin) the kernel compiled by Triton for an H100."""

import contextlib
import dataclasses
import importlib.util
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.cli.aot import cuda_plugin_installed
from cloud_jax.errors import ConfigError
from cloud_jax.model import gpu_kernels
from cloud_jax.model.config import ModelConfig
from cloud_jax.model.layers import gqa_attention
from cloud_jax.sampling import TopK, sample
from cloud_jax.training.config import load_config

needs_cuda_plugin = pytest.mark.skipif(
    not cuda_plugin_installed(),
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
    dict(inputs=2, rows=8, group=3, d=64, prefix=40, own=37),  # G = 3 (SmolLM2): padded to 4
    dict(inputs=2, rows=2, group=7, kv=1, prefix=20, own=18),  # G = 7 (Qwen2.5-7B): to 8
    dict(inputs=2, rows=32, group=1, prefix=20, own=23),  # 4 slots of 32 rows a block
    dict(rows=8, own=12),                            # own blocks of 8 slots (x 8 rows)
])
@pytest.mark.parametrize("parts", [1, None, 3])
def test_kernel_equals_xla_attention(shape, parts):
    """Each (input, KV head) in one program, in the parts :func:`gpu_kernels.splits` chooses for
    these few programs (up to 16), and in 3 (parts of unequal size, some with no prefix
    block)."""
    q, k, v, mask, prefix = attention_inputs(**shape)
    want = gqa_attention(q, k, v, mask, prefix)
    got = gpu_kernels.decode_attention(q, k, v, mask, prefix, interpret=True, parts=parts)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)


def test_splits_keep_about_128_programs():
    assert gpu_kernels.splits(32 * 8, 1024) == 1  # the GPU bench: 256 programs already
    assert gpu_kernels.splits(16 * 8, 1024) == 1  # 128: enough
    assert gpu_kernels.splits(8 * 8, 1024) == 2   # sample_8: 64 programs -> 128
    assert gpu_kernels.splits(1 * 8, 1024) == 16  # one request: at most the 16 blocks
    assert gpu_kernels.splits(2, 40) == 2         # a 40-slot prompt: 2 blocks of 32
    assert gpu_kernels.splits(300, 1024) == 1


def test_kernel_in_bfloat16_and_with_fully_masked_blocks():
    q, k, v, mask, (pk, pv, pmask) = attention_inputs(prefix=70, own=40, dtype=jnp.bfloat16,
                                                      seed=1)
    # Keys 16.. of the prefix and all but the first own slot masked: whole blocks without a key.
    pmask = pmask.at[:, :, 16:].set(False)
    mask = mask.at[:, :, 1:].set(False).at[:, :, 0].set(True)
    want = gqa_attention(q, k, v, mask, (pk, pv, pmask)).astype(jnp.float32)
    for parts in (1, None):
        got = gpu_kernels.decode_attention(q, k, v, mask, (pk, pv, pmask), interpret=True,
                                           parts=parts)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want),
                                   atol=3e-2, rtol=0)


def test_supported_shapes_and_blocks():
    assert gpu_kernels.supported(8, 4, 64, 1024, 257)      # the GPU bench: 32 x K = 8, Llama 1B
    assert gpu_kernels.blocks(8, 1024, 257) == (64, 16)
    assert gpu_kernels.blocks(1, 40, 300) == (32, 128)
    assert gpu_kernels.blocks(32, 40, 300) == (32, 4)      # 128 own keys a block at any K
    assert gpu_kernels.supported(1, 4, 64, 1024, 257)      # K = 1 (Triton pads the 4 rows)
    assert gpu_kernels.supported(8, 3, 64, 192, 97)        # SmolLM2: G = 3, computed as 4
    assert [gpu_kernels.padded_group(g) for g in (1, 2, 3, 5, 7, 8)] == [1, 2, 4, 8, 8, 8]
    assert gpu_kernels.supported(8, 8, 128, 1024, 257)     # 8 x 8 x 128 = 8192: the limit
    assert not gpu_kernels.supported(16, 8, 128, 1024, 257)  # 16 x 8 x 128: past it
    assert not gpu_kernels.supported(1, 16, 512, 1024, 257)  # head size over 256
    assert not gpu_kernels.supported(3, 4, 64, 1024, 257)  # K = 3: not a power of two
    assert not gpu_kernels.supported(8, 4, 48, 1024, 257)  # head size not a power of two
    assert gpu_kernels.supported(8, 4, 64, 1024, 12)       # 8 slots x 8 rows: a 64-key block
    assert not gpu_kernels.supported(1, 4, 64, 1024, 12)   # one row's 8 slots: under a block
    assert not gpu_kernels.supported(1, 4, 64, 12, 257)    # prefix under one block
    q, k, v, mask, prefix = attention_inputs(rows=3, group=2)
    with pytest.raises(ValueError, match="K=3, G=2"):
        gpu_kernels.decode_attention(q, k, v, mask, prefix)


def test_transposed_keys_keep_xla():
    """The kernel reads keys [.., S, D]: a cache of transposed keys (the CPU's feature-major
    step) keeps XLA's attention, with a warning naming why."""
    from cloud_jax.model import layers

    q, k, v, mask, prefix = attention_inputs(seed=2)
    assert layers._pallas_decode(q, k, prefix, False) is gpu_kernels.decode_attention
    transposed = (jnp.swapaxes(prefix[0], 2, 3), jnp.swapaxes(prefix[1], 2, 3), prefix[2])
    with pytest.warns(UserWarning, match="this cache stores them transposed"):
        assert layers._pallas_decode(q, jnp.swapaxes(k, 2, 3), transposed, True) is None


def test_decode_on_a_mesh_runs_the_kernel_per_shard():
    """On 8 fake CPU devices (a subprocess: the device count is set before JAX starts): a
    decode on a data x fsdp x tensor = 2 x 2 x 2 mesh runs the kernel on each device's inputs
    and KV heads (shard_map) and gives the critiques of XLA's attention on one device; on a
    mesh whose tensor axis (4) does not split the 2 KV heads it keeps XLA's, with a warning,
    and gives them too."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=path)  # cloud_jax from this tree, installed or not
    script = os.path.join(root, "tests", "scripts", "pallas_decode_on_mesh.py")
    proc = subprocess.run([sys.executable, script], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("2x2x2", "tensor_4"):
        assert result[name]["tokens_equal"] and result[name]["lengths_equal"], result
        assert result[name]["rewards_diff"] <= 1e-5, result
    assert result["2x2x2"]["warnings"] == []
    assert len(result["tensor_4"]["warnings"]) == 1
    assert "2 KV head(s) do not split over the 4 shards of mesh axes tensor" in \
        result["tensor_4"]["warnings"][0]


def test_config_names_the_implementation():
    assert ModelConfig().decode_attention_impl == "xla"
    ModelConfig(decode_attention_impl="pallas").validate()
    ModelConfig(decode_attention_impl="auto").validate()
    with pytest.raises(ConfigError, match="decode_attention_impl='triton'.*xla, pallas or auto"):
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


def test_a_model_of_three_query_heads_per_kv_head_takes_the_kernel():
    """SmolLM2's grouping (G = 3: 6 heads over 2 KV heads here): the kernel computes 4 query
    heads per KV head, the fourth's queries zeros, and the decode gives XLA's critiques."""
    from cloud_jax.model import param_shapes

    cfg = dataclasses.replace(CFG, hidden_size=96, num_heads=6, num_kv_heads=2)
    rng = np.random.default_rng(1)
    weights = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                           param_shapes(cfg))
    settings = dict(max_new_tokens=16, stop_ids=(62,), num_samples=4, method=TopK(20, 1.5),
                    seed=5, decode_layout="standard")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pallas = sample(dataclasses.replace(cfg, decode_attention_impl="pallas"), weights,
                        PREFIXES, **settings)
    xla = sample(cfg, weights, PREFIXES, **settings)
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)
    np.testing.assert_allclose(pallas.rewards, xla.rewards, atol=1e-5, rtol=0)


def test_auto_off_a_gpu_is_xla_attention_without_the_interpreter(params):
    """decode_attention_impl=auto on the CPU: XLA's attention, silently. Its kernel branch is
    Triton's code (interpret=False), which cannot run on a CPU: the decode running at all says
    that branch was not compiled here, where "pallas" would have run the interpreter."""
    from cloud_jax.model import layers

    q, k, v, mask, prefix = attention_inputs(seed=4)
    kernel = layers._pallas_decode(q, k, prefix, False, "auto")
    assert kernel.func is gpu_kernels.decode_attention and kernel.keywords == {"interpret": False}
    settings = dict(max_new_tokens=12, stop_ids=(62,), num_samples=3, method=TopK(20, 1.5),
                    seed=3, decode_layout="standard")
    auto = dataclasses.replace(CFG, decode_attention_impl="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # K = 3 is declined without a word under auto
        got = sample(auto, params, PREFIXES, **settings)
        got8 = sample(auto, params, PREFIXES, **{**settings, "num_samples": 8})
    np.testing.assert_array_equal(got.tokens, sample(CFG, params, PREFIXES, **settings).tokens)
    np.testing.assert_array_equal(
        got8.tokens, sample(CFG, params, PREFIXES, **{**settings, "num_samples": 8}).tokens)


def test_a_shape_the_kernel_declines_keeps_xla_with_a_warning(params):
    settings = dict(max_new_tokens=20, stop_ids=(62,), num_samples=3, seed=3,
                    method=TopK(20, 1.5), decode_layout="standard")
    with pytest.warns(UserWarning, match="does not take K=3 rows per input x G=2"):
        pallas = sample(PALLAS, params, PREFIXES, **settings)
    xla = sample(CFG, params, PREFIXES, **settings)
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)


@contextlib.contextmanager
def compiled_texts():
    """The text of each program `aot` compiles inside the block, in order."""
    from cloud_jax.cli import aot

    texts, original = [], aot._compile

    def keep(name, fn, **kw):
        compiled, res = original(name, fn, **kw)
        texts.append(compiled.as_text())
        return compiled, res

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "_compile", keep)
        yield texts


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
        impl = next((o.split("=")[1] for o in overrides if "decode_attention_impl" in o), "xla")
        said = ("XLA's" if impl == "xla" else
                "the Pallas kernel (model.decode_attention_impl=" + impl + "), 2 call(s)")
        assert f"decode attention: {said}" in out
        return int(re.search(r"(\d+) operations launched per iteration", out).group(1))

    xla = decode_ops()
    with compiled_texts() as texts:
        pallas = decode_ops("model.decode_attention_impl=pallas")
        auto = decode_ops("model.decode_attention_impl=auto")
    assert pallas < xla and auto == pallas
    triton = [t.count('custom_call_target="__gpu$xla.gpu.triton"') for t in texts]
    assert triton == [0, 2, 0, 2]  # each decode: one kernel per layer (2 layers); prefills none


@needs_cuda_plugin
def test_kernel_on_eight_gpus_compiles_per_shard_without_gathering_the_cache(capsys):
    """`aot --topology h100-8` on a 2 x 2 x 2 mesh: one Triton call per layer in the decode
    (each GPU its shard) and the same collectives as XLA's attention, none gathering a cache."""
    from cloud_jax.cli import aot

    with compiled_texts() as texts:
        for impl in ("xla", "pallas"):
            rc = aot.main(["--config", "configs/tiny_cpu_cloud.yaml", "data.max_length=32",
                           "--topology", "h100-8", "--sample-only", "--prefix-len", "16",
                           "--num-samples", "8", "--max-new-tokens", "16", "--sample-inputs",
                           "8", "--decode-phases", "1", f"model.decode_attention_impl={impl}",
                           "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
            assert rc == 0, capsys.readouterr().out
    xla, pallas = texts[1], texts[3]  # each run: the prefill, then the decode

    def collectives(text):
        return sorted(re.findall(r"(all-gather|all-reduce|all-to-all|collective-permute|"
                                 r"reduce-scatter)-start\(", text))

    assert pallas.count('custom_call_target="__gpu$xla.gpu.triton"') == 2
    assert xla.count('custom_call_target="__gpu$xla.gpu.triton"') == 0
    assert collectives(pallas) == collectives(xla)


@needs_cuda_plugin
@pytest.mark.parametrize("topology", ["h100", "a100"])
def test_every_shape_at_the_limits_compiles_for_a_gpu(topology):
    """Triton compiles the kernel, in bf16, at the shapes :func:`gpu_kernels.supported` takes at
    its limits (K x G x head size = 8192, head size 256, many rows, G = 3) for an H100 and for an
    A100 (less shared memory); a shape past them would ask for more than a program may hold."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from cloud_jax.cli import aot

    device = aot.gpu_devices(aot.parse_slice(topology))[0]
    mesh = Mesh(np.array([device]), ("x",))
    on_gpu = NamedSharding(mesh, PartitionSpec())

    def spec(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_gpu)

    attention = jax.jit(lambda *a, parts: gpu_kernels.decode_attention(
        *a, interpret=False, parts=parts), static_argnames="parts")
    for k, g, d in [(8, 8, 128), (8, 16, 64), (8, 4, 256), (64, 1, 128), (512, 1, 16),
                    (8, 3, 64), (16, 4, 128)]:
        n, kv, p, s = 4, 2, 1024, 257
        assert gpu_kernels.supported(k, g, d, p, s)
        args = (spec(n * k, 1, kv * g, d), spec(n * k, kv, s, d), spec(n * k, kv, s, d),
                spec(n * k, 1, s, dtype=jnp.bool_),
                (spec(n, kv, p, d), spec(n, kv, p, d), spec(n * k, 1, p, dtype=jnp.bool_)))
        for parts in (1, None):  # one program per (input, KV head), or 16 (8 programs here)
            with jax.set_mesh(mesh):  # jax 0.11's Triton lowering reads the card from the mesh
                compiled = attention.lower(*args, parts=parts).compile()
            assert compiled.as_text().count("__gpu$xla.gpu.triton") == 1, (k, g, d, parts)
    with pytest.raises(Exception, match="Shared memory size limit exceeded"):
        # Past the limit (K x G x head size 16384): why supported() declines it.
        with pytest.MonkeyPatch.context() as mp, jax.set_mesh(mesh):
            mp.setattr(gpu_kernels, "MAX_QUERY_ELEMENTS", 16384)
            n, kv, p, s, k, g, d = 4, 2, 1024, 257, 8, 8, 256
            attention.lower(spec(n * k, 1, kv * g, d), spec(n * k, kv, s, d),
                            spec(n * k, kv, s, d), spec(n * k, 1, s, dtype=jnp.bool_),
                            (spec(n, kv, p, d), spec(n, kv, p, d),
                             spec(n * k, 1, p, dtype=jnp.bool_)), parts=1).compile()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed: pip install -r requirements-tpu.txt")
def test_a_program_compiled_for_a_tpu_keeps_xla_attention(capsys, monkeypatch):
    """With model.decode_attention_impl=pallas (or auto), a decode compiled for a TPU (one chip)
    takes XLA's attention (the kernel is Triton's): the same program as with xla, operation for
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
        assert f"decode attention: XLA's (model.decode_attention_impl={impl})" in out
        return re.search(r"sampling decode .*\n(  .*\n)*?  (\d+ loop\(s\), \d+ operations)",
                         out).group(2)

    with warnings.catch_warnings():
        # Taken on one chip: no warning that it was declined.
        warnings.filterwarnings("error", message="model.decode_attention_impl")
        assert decode_ops("pallas") == decode_ops("xla") == decode_ops("auto")


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
