"""`python -m cloud_jax aot`: slice names against Google's published shapes, the compiled figures
of a tiny config on a small topology, and the failures: figures over the HBM, the TPU compiler's
own out-of-memory refusal, libtpu missing. The same for NVIDIA GPUs through JAX's CUDA plugin:
names, a tiny config compiled for an H100 (cuDNN attention included), the memory budget, the
plugin missing."""

import dataclasses
import importlib.util
import re
import sys

import pytest

from cloud_jax.cli import aot
from cloud_jax.cli.common import run_command
from cloud_jax.errors import ConfigError
from cloud_jax.training.config import load_config
from cloud_jax.sharding import CHIPS, chip_of

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu not installed: pip install -r requirements-tpu.txt")
needs_cuda_plugin = pytest.mark.skipif(
    not aot.cuda_plugin_installed(),
    reason="JAX's CUDA plugin not installed: pip install -r requirements-gpu-aot.txt")


@pytest.fixture(autouse=True)
def _restore_libtpu_env(monkeypatch):
    # aot.main sets these for libtpu with setdefault; set here first, they are removed again after
    # each test instead of leaking into the rest of the session.
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_ACCELERATOR_TYPE", "v5e-4")):
        monkeypatch.setenv(key, value)


TINY = ["--config", "configs/tiny_cpu_cloud.yaml", "data.batch_pairs=8", "data.max_length=32"]


@pytest.mark.parametrize("name,chips,topology", [
    # cloud.google.com/tpu/docs/v5p, /v4 (sizes count TensorCores, 2 per chip), /v5e, /v6e.
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-16", 8, "v5p:2x2x2"), ("v5p-64", 32, "v5p:2x4x4"),
    ("v5p-128", 64, "v5p:4x4x4"), ("v5p-512", 256, "v5p:4x8x8"), ("v4-8", 4, "v4:2x2x1"),
    ("v4-32", 16, "v4:2x2x4"), ("v5e-1", 1, "v5e:1x1"), ("v5litepod-4", 4, "v5e:2x2"),
    ("v5e-8", 8, "v5e:2x4"), ("v5e-32", 32, "v5e:4x8"), ("v6e-256", 256, "v6e:16x16"),
])
def test_slice_names(name, chips, topology):
    sl = aot.parse_slice(name)
    assert (sl.chips, sl.topology) == (chips, topology)


@pytest.mark.parametrize("device_kind,chip", [
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5", "v5p"),
    ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"), ("NVIDIA H100 80GB HBM3", "H100"), ("cpu", None),
])
def test_the_chip_a_device_kind_names(device_kind, chip):
    # One table serves the training MFU (by device kind) and the slices above (by generation).
    found = chip_of(device_kind)
    assert (found.name if found else None) == chip
    if chip in CHIPS and CHIPS[chip].torus_dims:
        assert aot.parse_slice(f"{chip}-8").chip is found


@pytest.mark.parametrize("device_kind,peak", [
    # NVIDIA's data sheets, bf16 dense (half the sparse figure): the PCIe and NVL cards run
    # slower clocks than the SXM ones.
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
])
def test_the_mfu_peak_of_a_gpu_is_that_of_its_form_factor(device_kind, peak):
    from cloud_jax.training.metrics import peak_flops

    assert peak_flops(device_kind) == peak
    assert peak_flops(device_kind, configured=1e12) == 1e12


@pytest.mark.parametrize("name", ["v5p-6", "v5p-4", "v5e-2", "v7-8", "v5p", "tpu-8"])
def test_bad_slice_names(name):
    with pytest.raises(ConfigError, match="--topology"):
        aot.parse_slice(name)


@pytest.mark.parametrize("name,largest", [
    # cloud.google.com/tpu/docs: a v5e or v6e pod is 256 chips, a v4 pod 4096; the largest v5p
    # slice is 16x16x24, 6144 chips (v5p-12288), so the largest power of two here is v5p-8192.
    ("v5e-512", "v5e-256"), ("v5litepod-512", "v5e-256"), ("v6e-1024", "v6e-256"),
    ("v4-16384", "v4-8192"), ("v5p-16384", "v5p-8192"),
])
def test_a_slice_larger_than_the_generation_has_is_refused_naming_the_largest(name, largest):
    with pytest.raises(ConfigError, match=rf"--topology '{name}': .*largest .*{largest}\b"):
        aot.parse_slice(name)
    aot.parse_slice(largest)


def compile_tiny(capsys, topology: str, inputs: int) -> str:
    """aot of the tiny config with its sampling steps on ``topology``: what it printed, after the
    checks every target shares (the three steps named, each with its memory figures)."""
    rc = aot.main(TINY + ["--topology", topology, "--sample", "--prefix-len", "16",
                          "--num-samples", "2", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for step in ("train step (cloud, 8 pairs x 2 x 32 tokens",
                 f"sampling prefill ({inputs} inputs x 16",
                 f"sampling decode ({inputs} inputs x K=2, 4 new tokens)"):
        assert step in out
    assert out.count("memory per device: arguments") == 3
    assert len(re.findall(r", compiled in \d+\.\d s on this host:\n", out)) == 3
    return out


@needs_libtpu
def test_tiny_config_on_v5e_4(capsys):
    out = compile_tiny(capsys, "v5e-4", inputs=4)
    assert "v5e-4: topology v5e:2x2, 4 chip(s) (TPU v5 lite)" in out
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in out
    assert out.count("XLA FLOPs per device") == 3
    # By hand for the tiny model (d 64, 4 heads of 16, 2 KV heads, MLP 176, 2 layers, vocab 272):
    # weights 2 * (64*64*2 + 64*32*2 + 3*64*176) + 64*272 = 109568; per token
    # 3 * (2 * 109568 + 2*2*2*4*16 * 32) = 706560; 2 * 8 * 32 tokens -> 3.6176e8 FLOPs per step,
    # at 40% of 4 x 197 TFLOP/s: 1.148e-6 s.
    assert "model FLOPs per step: 3.618e+08" in out
    assert "1.148e-06 s per step" in out


@needs_libtpu
def test_does_not_fit(monkeypatch, capsys):
    small = dataclasses.replace(aot.CHIPS["v5e"], hbm_bytes=2**20)
    monkeypatch.setitem(aot.CHIPS, "v5e", small)
    rc = aot.main(TINY + ["--topology", "v5e-4"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "total " in captured.out and "of 1.00 MiB HBM" in captured.out
    assert "does not fit on v5e-4" in captured.err and "MiB over the 1.00 MiB HBM" in captured.err


@needs_libtpu
def test_programs_for_a_topology_stay_out_of_the_persistent_compilation_cache(tmp_path):
    """JAX cannot load a program compiled for a topology back from its persistent cache: a user
    with JAX_COMPILATION_CACHE_DIR set got "Error reading persistent compilation cache entry" from
    every `aot` run after the first. `aot` writes no entries, and puts the setting back for an
    in-process caller."""
    import os
    import subprocess

    import jax

    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    done = subprocess.run([sys.executable, "-m", "cloud_jax", "aot", *TINY, "--topology", "v5e-4"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "persistent compilation cache" not in done.stderr
    assert not cache.exists() or not any(cache.iterdir())

    before = jax.config.jax_enable_compilation_cache
    assert aot.main(TINY + ["--topology", "v5e-4"]) == 0
    assert jax.config.jax_enable_compilation_cache == before


@needs_libtpu
def test_compiler_refuses_out_of_memory(capsys):
    # 2048 pairs x 2 x 1024 tokens of fp32 logits alone are 17 GiB: more than a v5e chip holds.
    rc = aot.main(["--config", "configs/tiny_cpu_cloud.yaml", "data.batch_pairs=2048",
                   "data.max_length=1024", "--topology", "v5e-1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "does not fit: the TPU compiler needs" in captured.out
    assert "GiB over the 15.75 GiB HBM" in captured.err and "does not fit on v5e-1" in captured.err


def test_missing_libtpu(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now raises ImportError
    rc = aot.main(TINY + ["--topology", "v5p-8"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "libtpu is not installed" in err and "pip install -r requirements-tpu.txt" in err


@needs_libtpu
def test_sample_only_compiles_no_train_step(capsys):
    rc = aot.main(TINY + ["mesh.data=2", "mesh.tensor=2", "--topology", "v5e-4", "--sample-only",
                          "--prefix-len", "16", "--num-samples", "2", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "train step" not in out
    assert ("sampling prefill (2 inputs x 16 tokens, mesh {'data': 2, 'fsdp': 1, 'tensor': 2}, "
            "weights float32)") in out
    assert out.count("memory per device: arguments") == 2


@needs_libtpu
def test_batch_that_does_not_split_over_the_mesh_is_a_config_error(capsys):
    # 8 pairs over data 4 are 2 per device: 4 micro-batches cannot split them evenly.
    rc = run_command(aot.main, TINY + ["train.grad_accum_steps=4", "--topology", "v5e-4"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "data.batch_pairs=8 must be a multiple of train.grad_accum_steps=4" in captured.err
    assert "train step" not in captured.out


@needs_libtpu
def test_sample_inputs_that_do_not_split_over_the_mesh_are_a_config_error(capsys):
    # 3 inputs over data 4: said before compiling, not an IndivisibleError from the sharding.
    rc = run_command(aot.main, TINY + ["--topology", "v5e-4", "--sample", "--sample-inputs", "3",
                                       "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 2
    assert ("--sample-inputs 3 must be a multiple of the mesh's data x fsdp size 4"
            in captured.err)
    assert "train step" not in captured.out and "sampling" not in captured.out


@needs_libtpu
def test_a_mesh_that_leaves_hosts_sharing_rows_is_a_config_error(capsys):
    # v5e-16 is four hosts of four chips: tensor=16 puts every host on the same rows, which
    # training refuses (each host feeds only its own); aot says so before compiling.
    rc = run_command(aot.main, TINY + ["mesh.data=1", "mesh.tensor=16", "--topology", "v5e-16"])
    captured = capsys.readouterr()
    assert rc == 2 and "does not give each of the 4 processes its own rows" in captured.err
    assert "train step" not in captured.out


@needs_libtpu
@pytest.mark.parametrize("topology,tensor,fsdp", [("v5e-16", 4, 4), ("v5p-64", 4, 8),
                                                  ("v5p-128", 4, 16)])
def test_a_tensor_axis_that_fits_in_a_host_is_laid_out_within_hosts(topology, tensor, fsdp):
    """v5e-16 is four hosts of four chips, v5p-64 eight and v5p-128 sixteen (2x2x1 each):
    mesh.tensor=4 fits in one host. JAX's physical layout put the tensor axis along a torus ring
    that crosses two hosts, so the mesh was refused (the shipped 70B config on v5p-128 among
    them); the hosts' own chips make the tensor groups instead, each host one fsdp shard."""
    from cloud_jax.sharding import MeshConfig, check_batch_split_over_processes, make_mesh

    devices = aot.tpu_devices(aot.parse_slice(topology))
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=tensor), devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": fsdp, "tensor": tensor}
    check_batch_split_over_processes(mesh)
    for group in mesh.devices.reshape(-1, tensor):
        assert len({d.process_index for d in group}) == 1
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


# --- NVIDIA GPUs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,chips,topology,kind", [
    ("h100", 1, "1x1x1", "NVIDIA H100 80GB HBM3"), ("H100-8", 8, "1x1x8", "NVIDIA H100 80GB HBM3"),
    ("h200-2", 2, "1x1x2", "NVIDIA H200"), ("h200-16", 16, "1x2x8", "NVIDIA H200"),
    ("a100-4", 4, "1x1x4", "NVIDIA A100-SXM4-80GB"),
])
def test_gpu_names(name, chips, topology, kind):
    sl = aot.parse_slice(name)
    assert (sl.chips, sl.topology, sl.gpu.device_kind) == (chips, topology, kind)
    # The peak FLOP/s comes from the table the training MFU reads by device kind.
    assert sl.chip is chip_of(kind)


@pytest.mark.parametrize("name", ["h100-12", "h100-0", "h300", "b200-8"])
def test_bad_gpu_names(name):
    with pytest.raises(ConfigError, match="--topology"):
        aot.parse_slice(name)


def test_gpu_memory_budget_is_the_allocators_share_of_the_card():
    sl = aot.parse_slice("h100")
    assert sl.gpu.memory_bytes == 81559 * 2**20  # what the driver reports for an H100 80GB HBM3
    assert sl.memory_budget(0.75) == 0.75 * 81559 * 2**20
    assert aot.parse_slice("v5e-4").memory_budget(0.75) == CHIPS["v5e"].hbm_bytes


def test_gpu_target_description():
    text = aot.GPUS["H200"].target_config((9, 1, 2), (12, 8, 1))
    for field in ("cuda_compute_capability { major: 9 minor: 0 }", "core_count: 132",
                  f"device_memory_size: {143771 * 2**20}", "memory_bandwidth: 4800000000000",
                  'platform_name: "CUDA"', "dnn_version_info { major: 9 minor: 1 patch: 2 }",
                  'device_description_str: "NVIDIA H200"',
                  # Without a CUDA version XLA takes the card for an older driver's and keeps
                  # library calls and loops out of its command buffers.
                  'runtime_version: "12.8.1"', 'driver_version: "12.8.1"',
                  "runtime_version { major: 12 minor: 8 patch: 1 }"):
        assert field in text


@needs_cuda_plugin
def test_the_plugins_cuda_and_cudnn_versions_are_read():
    # Read from the plugin (its module moved once; the fallbacks hid that the read failed).
    versions = aot._plugin_versions()
    assert versions is not None
    v = int(versions.cudnn_get_version())
    assert aot._cudnn_version() == (v // 10000, v // 100 % 100, v % 100)
    assert aot._cuda_version()[0] == 12 and aot._cuda_version() >= (12, 3, 0)


THUNKS_HOST_LOOP = """\
000: kCommandBuffer [source       | next=016 (1) ]
    001: kCustomKernel [source | sink] loop_broadcast_fusion grid: [9, 1, 1]
016: kWhile         [prev=000 (1)  | next=000 (1) ]
condition:
    017: kCustomKernel [source       | next=018 (1)] input_reduce_fusion
  body:
    000: kCommandBuffer [source | sink]
        019: kCustomKernel [source        | next=020 (3) ] loop_xor_fusion
"""
THUNKS_DEVICE_LOOPS = """\
000: kCommandBuffer [source | sink]
    015: kCopy [source | sink] kCopy
    016: kWhile        [prev=015 (1)  | next=398 (1) ]
condition:
        017: kCustomKernel [source       | next=018 (1)] input_reduce_fusion
      body:
        019: kCustomKernel [source        | next=020 (3) ] loop_xor_fusion
    431: kWhile        [prev=430 (1)  | next=831 (1) ]
condition:
        432: kCustomKernel [source       | next=433 (1)] input_reduce_fusion
      body:
        434: kCustomKernel [source        | next=435 (3) ] loop_xor_fusion
900: kWhile [prev=431 (1) | sink]
condition:
    901: kCustomKernel [source | sink] input_reduce_fusion
"""


def test_loop_drivers_reads_which_loops_run_in_command_buffers():
    # Shapes of the GPU compiler's dumps (a decode compiled for an H100 without and with
    # --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL), cut short.
    assert aot.loop_drivers(THUNKS_HOST_LOOP) == (0, 1)
    assert aot.loop_drivers(THUNKS_DEVICE_LOOPS) == (2, 1)
    assert aot.loop_drivers("") == (0, 0)


@needs_cuda_plugin
def test_tiny_config_on_h100(capsys):
    out = compile_tiny(capsys, "h100", inputs=1)
    assert ("h100: topology 1x1x1, 1 chip(s) (NVIDIA H100 80GB HBM3), 59.74 GiB HBM (75% of "
            "79.65 GiB) and 989 TFLOP/s bf16 per chip") in out
    assert out.count("of 59.74 GiB HBM (75% of the card's 79.65 GiB)") == 3
    # The same model FLOPs as on the TPU (test_tiny_config_on_v5e_4), over one H100's peak.
    assert "model FLOPs per step: 3.618e+08" in out
    assert re.search(r"sampling decode .*\n(  .*\n)*  1 loop\(s\), \d+ operations launched per "
                     r"iteration", out)


@needs_cuda_plugin
def test_cudnn_attention_compiles_for_the_gpu(monkeypatch):
    """The cuDNN path (bench train's GPU preset) compiled by the GPU compiler: its attention
    becomes cuDNN's fused calls, forward and backward, one each per layer."""
    from cloud_jax.model.config import ModelConfig

    assert ModelConfig().attention_impl == "xla"
    devices = aot.gpu_devices(aot.parse_slice("h100"))
    cfg = load_config("configs/tiny_cpu_cloud.yaml", TINY[2:] + [
        "model.dtype=bfloat16", "model.attention_impl=cudnn"])
    captured = {}
    original = aot._compile

    def keep(name, fn, **kw):
        compiled, res = original(name, fn, **kw)
        captured["text"] = compiled.as_text()
        return compiled, res

    monkeypatch.setattr(aot, "_compile", keep)
    res = aot.compile_train(cfg, devices)
    assert res.memory["total"] > 0
    calls = re.findall(r'custom_call_target="(__cudnn\$fmha[A-Za-z]*)"', captured["text"])
    layers = cfg.model.num_layers
    assert len([c for c in calls if c.endswith("Backward")]) == layers
    assert len([c for c in calls if not c.endswith("Backward")]) == layers


@needs_cuda_plugin
def test_gpu_step_over_the_memory_budget(capsys):
    rc = aot.main(TINY + ["--topology", "h100", "--gpu-memory-fraction", "0.0000001"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "does not fit on h100" in captured.err
    assert "over the 0.01 MiB HBM" in captured.err


@needs_cuda_plugin
def test_decode_checked_every_c_steps_launches_c_steps_per_iteration(capsys):
    """The decode loop's operations per iteration at steps_per_check 1 and 3: the GPU compiler
    keeps the 3 steps in one iteration (checked once), so it launches more per iteration."""
    counts = {}
    for c in (1, 3):
        rc = aot.main(TINY + ["--topology", "h100", "--sample-only", "--prefix-len", "16",
                              "--num-samples", "2", "--max-new-tokens", "5",
                              "--steps-per-check", str(c)])
        out = capsys.readouterr().out
        assert rc == 0, out
        counts[c] = [int(n) for n in re.findall(r"(\d+) operations launched per iteration", out)]
    assert "checked every 3 steps" in out
    assert counts[1] and counts[3] and min(counts[3]) > max(counts[1])



@needs_cuda_plugin
def test_decode_phases_are_the_loops_compiled(capsys):
    """--decode-phases P compiles P decode loops (64 new tokens: 4 by default, else P)."""
    loops = {}
    for phases in (None, 1, 2):
        extra = [] if phases is None else ["--decode-phases", str(phases)]
        rc = aot.main(TINY + ["--topology", "h100", "--sample-only", "--prefix-len", "16",
                              "--num-samples", "2", "--max-new-tokens", "64"] + extra)
        out = capsys.readouterr().out
        assert rc == 0, out
        loops[phases] = int(re.search(r"(\d+) loop\(s\), \d+(-\d+)? operations launched",
                                      out).group(1))
        # XLA's defaults keep loops out of command buffers: the host drives each of them.
        assert ("loops in command buffers (CUDA graphs, run by the device): 0; driven by the "
                f"host (condition read back before each iteration): {loops[phases]}") in out
    assert "64 new tokens, 2 phases)" in out
    assert loops == {None: 4, 1: 1, 2: 2}


@needs_cuda_plugin
def test_xla_flags_that_put_loops_in_command_buffers_are_reported(tmp_path):
    """With loops and conditionals allowed in command buffers the decode runs as one CUDA graph:
    no loop is left to the host (the GPU benches' sample_32_graphs measures what it is worth).
    A dump the user asked for is read, not redirected."""
    import os
    import subprocess

    dump = tmp_path / "dump"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL "
                         f"--xla_dump_to={dump}")
    done = subprocess.run(
        [sys.executable, "-m", "cloud_jax", "aot", *TINY, "--topology", "h100", "--sample-only",
         "--prefix-len", "16", "--num-samples", "2", "--max-new-tokens", "64"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("loops in command buffers (CUDA graphs, run by the device): 4; driven by the host "
            "(condition read back before each iteration): 0") in done.stdout
    assert any(p.name.endswith("jit_decode.thunk_sequence_after_thunk_passes.txt")
               for p in dump.iterdir())


def _no_jax_plugins_package(name, *a):
    # What find_spec does for a submodule whose package is missing: a JAX install with no plugin
    # at all (`make venv`, without `make venv-gpu-aot`) has no `jax_plugins` namespace.
    raise ModuleNotFoundError(f"No module named '{name.split('.')[0]}'")


@pytest.mark.parametrize("no_plugin", ["plugin_missing", "jax_plugins_missing"])
def test_missing_cuda_plugin(monkeypatch, capsys, no_plugin):
    real = importlib.util.find_spec
    missing = (lambda name, *a: None) if no_plugin == "plugin_missing" else _no_jax_plugins_package
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        missing(name, *a) if name.startswith("jax_plugins") else real(name, *a)))
    assert not aot.cuda_plugin_installed()
    rc = aot.main(TINY + ["--topology", "h100"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "CUDA plugin is not installed" in err and "requirements-gpu-aot.txt" in err


@pytest.mark.parametrize("flag,value", [("--gpu-memory-fraction", "0"),
                                        ("--gpu-memory-fraction", "1.5"),
                                        ("--steps-per-check", "0"),
                                        ("--decode-phases", "0"),
                                        ("--num-samples", "0"),
                                        ("--max-new-tokens", "0"),
                                        ("--prefix-len", "-5"),
                                        ("--sample-inputs", "-1")])
def test_bad_gpu_flags(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        aot.main(TINY + ["--topology", "h100", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@needs_libtpu
def test_shapes_past_the_models_positions_are_a_config_error(capsys):
    # Training refuses a data.max_length above model.max_position_embeddings: so does aot, before
    # compiling a train step no run would take.
    rc = run_command(aot.main, TINY + ["model.max_position_embeddings=16", "--topology", "v5e-4"])
    captured = capsys.readouterr()
    assert rc == 2
    assert ("data.max_length=32 is more than model.max_position_embeddings=16 (the model "
            "section sets)" in captured.err)
    assert "train step" not in captured.out
    # A prefill, its critique and the critique's end-of-turn token must fit the positions too.
    rc = run_command(aot.main, TINY + ["model.max_position_embeddings=16", "--topology", "v5e-4",
                                       "--sample-only", "--prefix-len", "12",
                                       "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 2
    assert ("--prefix-len 12, --max-new-tokens 4 and the critique's end-of-turn token need 17 "
            "positions, more than model.max_position_embeddings=16" in captured.err)
    assert "sampling" not in captured.out
    # Without --prefix-len, the prefill is data.max_length held to what the positions leave.
    assert aot.sample_prefix_len(load_config("configs/tiny_cpu_cloud.yaml", [
        "data.max_length=32", "model.max_position_embeddings=24"]), 0, 4) == 19
    assert aot.sample_prefix_len(load_config("configs/tiny_cpu_cloud.yaml", [
        "data.max_length=32"]), 0, 4) == 32


def _documented_aot_commands() -> list[tuple[str, str]]:
    """(where, arguments) of every `python -m cloud_jax aot --config ...` line of README.md,
    docs/*.md and aot's own help, continuation lines joined, optional `[...]` parts left out and
    the GA placeholder of docs/TPU.md given a value."""
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for path in ["README.md", aot.__file__] + sorted(glob.glob(os.path.join(root, "docs", "*.md"))):
        with open(os.path.join(root, path), encoding="utf-8") as f:
            text = f.read().replace("\\\n", " ")
        for m in re.finditer(r"python -m cloud_jax aot (--config [^\n`|#]*)", text):
            args = re.sub(r" \[[^\]]*\]", "", m.group(1)).replace("=GA", "=1").strip()
            found.append((os.path.relpath(path, root), args))
    return sorted(set(found))


@pytest.mark.parametrize("where,args", _documented_aot_commands())
def test_documented_aot_commands_pass_the_checks_before_compiling(where, args, monkeypatch,
                                                                   capsys):
    """Each documented command gets through the config, mesh, batch and host checks it would
    meet (exit status 0 with the compiler stubbed out): none is refused as a config error. The
    help's sampling example once gave v5e-8 a 4-device mesh, and docs/TPU.md's 70B v5e rows a
    tensor group across two hosts."""
    import shlex

    gpu = re.search(r"--topology ([ah]\d+)", args)
    if gpu and not aot.cuda_plugin_installed():
        pytest.skip("JAX's CUDA plugin not installed")
    if not gpu and importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu not installed")
    monkeypatch.setattr(aot, "_compile", lambda name, fn, loops=False, **figures:
                        (None, aot.Result(name, **figures)))
    # The sampling checks run before compile_sample, which has none of its own to add.
    monkeypatch.setattr(aot, "compile_sample", lambda *a, **k: [])
    rc = run_command(aot.main, shlex.split(args))
    assert rc == 0, f"{where}: python -m cloud_jax aot {args}\n{capsys.readouterr().err}"
