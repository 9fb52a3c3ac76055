"""``python -m cloud_jax aot``: compile the real steps for a TPU slice or NVIDIA GPUs on a CPU host.

    python -m cloud_jax aot --config configs/llama3_8b_cloud.yaml --topology v5p-64 [key=value ...]
    python -m cloud_jax aot --config configs/llama3_8b_cloud.yaml --topology v5e-32 --sample
    python -m cloud_jax aot --config configs/llama3_8b_cloud.yaml --topology v5e-4 --sample-only \
        mesh.fsdp=1 mesh.tensor=4                  # sampling on its own mesh
    python -m cloud_jax aot --config configs/llama3_8b_cloud.yaml --topology h100-8 --sample

With ``libtpu`` installed (``pip install -r requirements-tpu.txt``) JAX describes the devices of
any TPU topology without owning one; the train step of the config's stage (and with ``--sample``
the self-consistency prefill and decode) are lowered onto a mesh of those devices and compiled by
the TPU compiler. Printed per step: per-device memory (arguments, outputs, temporaries, total
against the chip's HBM), FLOPs, and the step time implied at ``--mfu`` of the slice's peak.
Exit status 1 when a step does not fit in HBM (after printing its figures) or libtpu is missing;
2 for a config error, such as a batch that does not split evenly over the mesh.

With JAX's CUDA plugin installed (``pip install -r requirements-gpu-aot.txt``) the same holds for
NVIDIA GPUs: ``--topology h100`` (one card), ``h100-8`` (eight in one host), ``h100-16`` (two hosts
of eight); also ``h200``, ``a100``. The plugin's compiler takes the card's description (compute
capability, SMs, memory, caches: :data:`GPUS`, from NVIDIA's data sheets) in place of a device, so
the figures are the GPU compiler's own, short of autotuning, which needs the card. A step fits
when its total is within ``--gpu-memory-fraction`` of the card's memory: JAX's allocator takes 75%
of it by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``). For a loop (the sampling decode) the
report adds the operations each iteration launches: on a GPU one kernel each, or more; and on a
GPU, which loops run inside XLA's command buffers (CUDA graphs, the device running the loop) and
which the host drives (it reads each iteration's condition before launching the next), read from
the compiler's own thunk sequence. ``XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL``
asks XLA to put loops in command buffers too.

Peak bf16 FLOP/s per chip and the slice shapes are from Google's Cloud TPU system-architecture
pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e); the HBM a program may use per chip is the
TPU compiler's own limit (see ``cloud_jax.sharding.CHIPS``), which it also enforces: a step it
refuses for memory is reported like one whose figures exceed the table. v4 and v5p names count
TensorCores (two per chip, one JAX device per chip in megacore mode), v5e and v6e names count
chips.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from cloud_jax.cli import check_counts
from cloud_jax.training.config import Config, load_config
from cloud_jax.errors import ConfigError
from cloud_jax.model import mesh_context, param_shapes, param_shardings
from cloud_jax.cli.bench.profile import loop_kernels
from cloud_jax.sampling import Temperature
from cloud_jax.sampling.loop import DECODE_PHASES, decode, prefill
from cloud_jax.sharding import (CHIPS, SAMPLE_RULES, TRAIN_RULES, Chip,
                                check_batch_split_over_processes, make_mesh)
from cloud_jax.training.loop import check_batch_layout, check_positions
from cloud_jax.training.step import (DEVICE_KEYS, StepBuilder, memory_figures,
                                     model_flops_per_token)

INSTALL_HINT = ("libtpu is not installed: `pip install -r requirements-tpu.txt` (the libtpu "
                "release matching this JAX) into this environment, then run again")
GPU_INSTALL_HINT = ("JAX's CUDA plugin is not installed: `pip install -r requirements-gpu-aot.txt` "
                    "(the plugin release matching this JAX, and cuDNN) into this environment, "
                    "then run again")


_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# The most chips one slice of a generation holds, from the same pages: a v4 pod is 4096 chips, a
# v5e or v6e pod 256; the largest v5p slice is 16x16x24, 6144 chips of its 8960-chip pod.
_MOST_CHIPS = {"v4": 4096, "v5p": 6144, "v5e": 256, "v6e": 256}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """What XLA's GPU compiler reads off a card (its ``GpuTargetConfigProto``), for compiling on a
    host without one. Figures from NVIDIA's data sheets and CUDA's per-architecture limits;
    ``memory_bytes`` is the total the driver reports (nvidia-smi's MiB x 2**20)."""

    device_kind: str
    compute_capability: tuple[int, int]
    sms: int
    memory_bytes: int
    bandwidth: float  # HBM bytes/s
    l2_bytes: int
    clock_ghz: float  # boost clock
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    fp32_units_per_sm: int

    def target_config(self, cudnn: tuple[int, int, int], cuda: tuple[int, int, int]) -> str:
        """The ``GpuTargetConfigProto`` in text format, for cuDNN ``cudnn`` and a CUDA runtime and
        driver of version ``cuda``.

        The CUDA version decides what XLA's runtime may put in its command buffers (CUDA graphs):
        from 12.3 on, library calls (cuBLAS, cuDNN, custom calls), conditionals and, where XLA's
        flags ask for them, loops run on the device; a description without one reads as an
        older driver, and the compiled program would not be the one a card runs."""
        major, minor = self.compute_capability
        version = ".".join(map(str, cuda))
        info = {
            "threads_per_block_limit": 1024, "threads_per_warp": 32,
            "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_core": self.shared_memory_per_sm,
            "threads_per_core_limit": 2048, "core_count": self.sms,
            "fpus_per_core": self.fp32_units_per_sm, "block_dim_limit_x": 2**31 - 1,
            "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
            "memory_bandwidth": int(self.bandwidth), "l2_cache_size": self.l2_bytes,
            "clock_rate_ghz": self.clock_ghz, "device_memory_size": self.memory_bytes,
            "shared_memory_per_block_optin": self.shared_memory_per_block_optin,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
            "runtime_version": f'"{version}"', "driver_version": f'"{version}"',
        }
        fields = " ".join(f"{k}: {v}" for k, v in info.items())
        return (f"gpu_device_info {{ cuda_compute_capability {{ major: {major} minor: {minor} }} "
                f"{fields} }} platform_name: \"CUDA\" dnn_version_info {{ major: {cudnn[0]} "
                f"minor: {cudnn[1]} patch: {cudnn[2]} }} device_description_str: "
                f"\"{self.device_kind}\" runtime_version {{ major: {cuda[0]} minor: {cuda[1]} "
                f"patch: {cuda[2]} }}")


# Keyed like CHIPS (whose peak FLOP/s the report uses).
GPUS = {
    "H100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 81559 * 2**20, 3.35e12, 50 * 2**20,
                    1.98, 228 * 1024, 227 * 1024, 128),
    "H200": GpuSpec("NVIDIA H200", (9, 0), 132, 143771 * 2**20, 4.8e12, 50 * 2**20, 1.98,
                    228 * 1024, 227 * 1024, 128),
    "A100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 81920 * 2**20, 2.039e12, 40 * 2**20,
                    1.41, 164 * 1024, 163 * 1024, 64),
}
GPUS_PER_HOST = 8
DEFAULT_GPU_MEMORY_FRACTION = 0.75  # JAX's allocator on a GPU, unless told otherwise


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    chips: int
    shape: tuple[int, ...]
    gpu: Optional[GpuSpec] = None

    @property
    def topology(self) -> str:
        if self.gpu is not None:  # partitions x hosts x GPUs per host, as XLA's GPU topology
            hosts = max(1, self.chips // GPUS_PER_HOST)
            return f"1x{hosts}x{self.chips // hosts}"
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    def memory_budget(self, gpu_memory_fraction: float) -> float:
        """Bytes one program may use per device."""
        if self.gpu is not None:
            return self.gpu.memory_bytes * gpu_memory_fraction
        return self.chip.hbm_bytes


def _shape(chips: int, dims: int) -> tuple[int, ...]:
    # The published slice shapes grow by doubling the last of the smallest sides: 2x2x1, 2x2x2,
    # 2x2x4, 2x4x4, 4x4x4, ... and 2x2, 2x4, 4x4, 4x8, ...
    shape = [1] * dims if chips == 1 else [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    return tuple(shape)


def parse_gpus(name: str) -> Optional[Slice]:
    """``h100`` / ``h100-8`` / ``h200-16`` -> that many cards (up to 8 per host); None when the
    name is not a GPU's."""
    m = re.fullmatch(r"([a-z]\d+)(?:-(\d+))?", name.strip().lower())
    if not m or m.group(1).upper() not in GPUS:
        return None
    key, n = m.group(1).upper(), int(m.group(2) or 1)
    if n < 1 or not (n <= GPUS_PER_HOST or n % GPUS_PER_HOST == 0):
        raise ConfigError(f"--topology {name!r}: 1 to {GPUS_PER_HOST} GPUs in one host, or whole "
                          f"hosts of {GPUS_PER_HOST} (e.g. {m.group(1)}-16)")
    return Slice(name, CHIPS[key], n, (n,), GPUS[key])


def parse_slice(name: str) -> Slice:
    """``v5p-64`` / ``v5e-16`` / ``v5litepod-16`` / ``v4-8`` / ``v6e-256`` -> its chips and
    topology shape; ``h100``, ``h100-8``, ``h200``, ``a100``: NVIDIA GPUs (:func:`parse_gpus`)."""
    gpus = parse_gpus(name)
    if gpus is not None:
        return gpus
    m = re.fullmatch(r"(v\w+?)-(\d+)", name.strip().lower())
    gen = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or gen not in CHIPS or not CHIPS[gen].torus_dims:
        tpus = ", ".join(k for k, chip in CHIPS.items() if chip.torus_dims)
        gpus_names = ", ".join(k.lower() for k in GPUS)
        raise ConfigError(f"--topology {name!r}: expected <generation>-<size> with generation one "
                          f"of {tpus} (e.g. v5p-64, v5e-16), or GPUs: {gpus_names}, optionally "
                          f"-<count> (e.g. h100-8)")
    chip, size = CHIPS[gen], int(m.group(2))
    chips, rest = divmod(size, chip.cores_in_name)
    if rest or not (chips == 1 or chips >= 4 and chips & (chips - 1) == 0):
        unit = "TensorCores (2 per chip)" if chip.cores_in_name == 2 else "chips"
        raise ConfigError(f"--topology {name!r}: the size counts {unit}; expected 1 or 4, 8, 16, "
                          f"... chips")
    most = _MOST_CHIPS[chip.name]
    if chips > most:
        largest = 1 << (most.bit_length() - 1)  # the largest power of two within it
        raise ConfigError(
            f"--topology {name!r}: a {chip.name} slice has at most {most} chips; the largest "
            f"given here is {chip.name}-{largest * chip.cores_in_name} ({largest} chips)")
    return Slice(name, chip, chips, _shape(chips, chip.torus_dims))


def tpu_devices(sl: Slice) -> list:
    """Compile-only devices of the slice; a RuntimeError with install advice without libtpu."""
    try:
        import libtpu  # noqa: F401  (only its presence matters: JAX loads it for the topology)
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    from jax.experimental import topologies

    # libtpu reads these when it loads; set, it neither looks for TPU metadata nor warns that
    # this host is not a TPU VM (the topology itself comes from the arguments below), and
    # compile-only processes, which own no chip, do not lock each other out.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", sl.name)
    kwargs: dict[str, Any] = {}
    if sl.chip.cores_in_name == 2:
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as on a real v4 / v5p VM
    if sl.chips == 1:
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    return topologies.get_topology_desc(sl.topology, "tpu", **kwargs).devices


def _plugin_versions():
    """JAX's CUDA plugin's module of library versions, or None."""
    try:
        from jax_cuda12_plugin import _versions

        return _versions
    except ImportError:
        return None


def _cudnn_version() -> tuple[int, int, int]:
    """The installed cuDNN's version, for the target description (9.8.0 when it cannot be
    read)."""
    try:
        v = int(_plugin_versions().cudnn_get_version())
        return v // 10000, v // 100 % 100, v % 100
    except Exception:  # noqa: BLE001 - no cuDNN library: the compile may still succeed
        return 9, 8, 0


def _cuda_version() -> tuple[int, int, int]:
    """The CUDA version JAX's CUDA plugin was built for (12.9.0 when it cannot be read), taken
    as the card's runtime and driver: a card that runs this plugin has a CUDA 12 driver, and
    what XLA decides by the version (command buffers) asks only for 12.3 or newer."""
    try:
        v = int(_plugin_versions().cuda_runtime_build_version())
        return v // 1000, v % 1000 // 10, 0
    except Exception:  # noqa: BLE001 - an older plugin: its own CUDA 12 release
        return 12, 9, 0


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (``jax_plugins.xla_cuda12``) is installed. Where no JAX plugin
    is, the ``jax_plugins`` namespace itself is missing and ``find_spec`` of the plugin raises
    ModuleNotFoundError instead of returning None: that is "not installed" too."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ImportError:
        return False


def gpu_devices(sl: Slice) -> list:
    """Compile-only devices of ``sl.chips`` GPUs described by ``sl.gpu``; a RuntimeError with
    install advice without JAX's CUDA plugin."""
    if not cuda_plugin_installed():
        raise RuntimeError(GPU_INSTALL_HINT)
    from jax.experimental import topologies

    # The plugin checks its CUDA libraries against a driver when it loads; a host without a GPU
    # has none, and compiling needs none.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        topo = topologies.get_topology_desc(
            "", "cuda", target_config=sl.gpu.target_config(_cudnn_version(), _cuda_version()),
            topology=sl.topology)
    except NotImplementedError as err:  # the plugin did not register (its own error was logged)
        raise RuntimeError(f"JAX's CUDA plugin did not load ({err}): {GPU_INSTALL_HINT}") from None
    return topo.devices


def xla_flops(compiled) -> Optional[float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


@dataclasses.dataclass
class Result:
    name: str
    memory: Optional[dict[str, int]] = None
    xla_flops: Optional[float] = None
    model_flops: Optional[float] = None  # whole slice, per step
    loop_kernels: Optional[list[int]] = None  # operations per iteration of each loop
    pallas_calls: Optional[int] = None  # Pallas (Triton) kernel calls in a GPU program
    # A GPU program's loops: (inside command buffers, driven by the host), where it could be read.
    loop_drivers: Optional[tuple[int, int]] = None
    compile_s: Optional[float] = None  # tracing, lowering and compiling, on this host
    decode_attention: str = ""  # a decode's: XLA's or the Pallas kernel (with its call count)
    refused: str = ""  # the TPU compiler's out-of-memory message, when it refused the step

    def fits(self, hbm: float) -> bool:
        return not self.refused and (self.memory is None or self.memory["total"] <= hbm)

    def overshoot(self, hbm: float) -> str:
        if self.memory is not None:
            return (f"{_gib(self.memory['total'])} per device is "
                    f"{_gib(self.memory['total'] - hbm)} over the {_gib(hbm)} HBM")
        m = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", self.refused)
        if m:  # the TPU compiler's refusal
            need, have = float(m.group(1)), float(m.group(2))
            return (f"the TPU compiler needs {need:.2f} GiB per device, {need - have:.2f} GiB "
                    f"over the {have:.2f} GiB HBM")
        return f"the TPU compiler refused it: {self.refused}"


def loop_drivers(thunks: str) -> tuple[int, int]:
    """(loops inside a command buffer, loops the host drives) in XLA's GPU thunk sequence (the
    text it dumps as ``*.thunk_sequence_after_thunk_passes.txt``): one thunk a line, ``NNN:
    kKind``, nested thunks indented more than their parent. A ``kWhile`` under a
    ``kCommandBuffer`` runs as a conditional node of a CUDA graph, on the device; one that is not
    is XLA's while thunk, which copies the condition to the host before every iteration."""
    on_device = by_host = 0
    open_thunks: list[tuple[int, str]] = []  # (indent, kind) of the thunks enclosing this line
    for line in thunks.splitlines():
        m = re.match(r"( *)\d+: (k\w+)", line)
        if not m:
            continue  # "condition:", "body:" and other labels
        indent, kind = len(m.group(1)), m.group(2)
        while open_thunks and open_thunks[-1][0] >= indent:
            open_thunks.pop()
        if kind == "kWhile":
            if any(k == "kCommandBuffer" for _, k in open_thunks):
                on_device += 1
            else:
                by_host += 1
        open_thunks.append((indent, kind))
    return on_device, by_host


def _thunk_sequence(lowered) -> tuple[Any, Optional[str]]:
    """(the compiled program, its thunk sequence after XLA's thunk passes or None): compiled
    with XLA's dump of this program into a temporary folder, or into the folder that
    ``XLA_FLAGS``' ``--xla_dump_to`` already names (the user's dump is kept whole)."""
    named = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    with tempfile.TemporaryDirectory() as scratch:
        folder = named.group(1) if named else scratch
        start = time.time()
        compiled = (lowered.compile() if named
                    else lowered.compile(compiler_options={"xla_dump_to": folder}))
        # Without a pass that changed the sequence, XLA dumps only the one before the passes.
        for suffix in ("thunk_sequence_after_thunk_passes.txt", "thunk_sequence.txt"):
            found = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffix)
                     and os.path.getmtime(os.path.join(folder, f)) >= start]
            if found:
                with open(max(found, key=os.path.getmtime)) as f:
                    return compiled, f.read()
    return compiled, None


def _compile(name: str, lower_and_compile, loops: bool = False,
             **figures) -> tuple[Any, Result]:
    """(compiled or None, its Result); the compiler's out-of-memory refusal becomes a Result.
    ``loops``: also count the operations per iteration of the program's loops; where
    ``lower_and_compile`` returns (compiled, GPU thunk sequence), which of them run on the
    device."""
    start = time.perf_counter()
    try:
        compiled = lower_and_compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return None, Result(name, refused=str(err).splitlines()[0], **figures)
    thunks = None
    if isinstance(compiled, tuple):
        compiled, thunks = compiled
    text = (compiled.as_text() or "") if loops else None
    return compiled, Result(
        name, memory_figures(compiled), xla_flops(compiled),
        loop_kernels=loop_kernels(compiled, text) if loops else None,
        # Pallas's Triton kernels are custom calls of this target in a GPU program.
        pallas_calls=text.count('custom_call_target="__gpu$xla.gpu.triton"') if loops else None,
        loop_drivers=loop_drivers(thunks) if thunks is not None else None,
        compile_s=time.perf_counter() - start, **figures)


def report(res: Result, sl: Slice, mfu: float,
           gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION) -> list[str]:
    took = f", compiled in {res.compile_s:.1f} s on this host" if res.compile_s else ""
    lines = [f"{res.name}{took}:"]
    hbm = sl.memory_budget(gpu_memory_fraction)
    if res.refused:
        lines.append(f"  does not fit: {res.overshoot(hbm)}")
    elif res.memory is None:
        lines.append("  memory: the compiler gave no memory analysis")
    else:
        m = res.memory
        lines.append(f"  memory per device: arguments {_gib(m['argument'])}, outputs "
                     f"{_gib(m['output'])} ({_gib(m['alias'])} aliased to donated arguments), "
                     f"temporaries {_gib(m['temp'])}, code {_gib(m['generated_code'])}")
        of_card = (f" ({gpu_memory_fraction:.0%} of the card's {_gib(sl.gpu.memory_bytes)})"
                   if sl.gpu is not None else "")
        lines.append(f"  total {_gib(m['total'])} of {_gib(hbm)} HBM{of_card} "
                     f"({100 * m['total'] / hbm:.1f}%)")
    if res.loop_kernels:
        counts = sorted(set(res.loop_kernels))
        span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        lines.append(f"  {len(res.loop_kernels)} loop(s), {span} operations launched per "
                     "iteration")
    if res.loop_drivers is not None:
        on_device, by_host = res.loop_drivers
        lines.append(f"  loops in command buffers (CUDA graphs, run by the device): {on_device}; "
                     f"driven by the host (condition read back before each iteration): "
                     f"{by_host}")
    if res.decode_attention:
        lines.append(f"  decode attention: {res.decode_attention}")
    if res.xla_flops is not None:
        # XLA counts a loop body (scanned layers, the decode loop) once, not per iteration.
        lines.append(f"  XLA FLOPs per device (loop bodies counted once): {res.xla_flops:.4g}")
    if res.model_flops is not None:
        seconds = res.model_flops / (sl.chips * sl.chip.peak_flops * mfu)
        lines.append(f"  model FLOPs per step: {res.model_flops:.4g} "
                     f"({res.model_flops / sl.chips:.4g} per chip); at {mfu:.0%} MFU of "
                     f"{sl.chips} x {sl.chip.peak_flops / 1e12:.0f} TFLOP/s: "
                     f"{seconds:.4g} s per step")
    return lines


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compile_train(cfg: Config, devices: Sequence) -> Result:
    """The jitted train step of ``cfg.train.stage`` on ``cfg.mesh`` over ``devices``."""
    if cfg.train.total_steps == 0:
        # 0 means "count the data"; the schedule's length changes no shape or buffer.
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_steps=1))
    mesh = make_mesh(cfg.mesh, devices)
    # The check training runs first: a batch that does not split evenly is a config error there,
    # and would otherwise surface here as a sharding failure inside the compiler.
    check_batch_layout(cfg, mesh)
    # As is a data.max_length above the positions of the model section, which builds the model
    # compiled here (an init_from checkpoint is not read).
    check_positions(dataclasses.replace(cfg, init_from=""), cfg.model)
    # And, on a slice of several hosts, that each host feeds its own rows, as training requires.
    check_batch_split_over_processes(mesh, TRAIN_RULES)
    builder = StepBuilder(cfg, mesh, TRAIN_RULES, cfg.model)
    p, t = cfg.data.batch_pairs, cfg.data.max_length
    shapes = {"input_ids": (p, 2, t), "attention_mask": (p, 2, t), "positions": (p, 2, t),
              "targets": (p, 2, t), "loss_mask": (p, 2, t), "reward_index": (p, 2),
              "pair_valid": (p,)}
    batch = {k: _abstract(shapes[k], jnp.float32 if k == "loss_mask" else jnp.int32,
                          builder.batch_shardings[k]) for k in DEVICE_KEYS}
    flops = model_flops_per_token(cfg.model, t, cfg.train.stage) * 2 * p * t
    m = cfg.model
    _, res = _compile(f"train step ({cfg.train.stage}, {p} pairs x 2 x {t} tokens, mesh "
                      f"{dict(mesh.shape)}, grad_accum_steps {cfg.train.grad_accum_steps}, "
                      f"remat {m.remat}, scan_layers {m.scan_layers}, weights {m.param_dtype})",
                      lambda: builder.train_step().compiled_for(builder.abstract_state(), batch),
                      model_flops=flops)
    return res


def compile_sample(cfg: Config, devices: Sequence, *, inputs: int, prefix_len: int,
                   num_samples: int, max_new_tokens: int,
                   steps_per_check: int = 1,
                   decode_phases: int = DECODE_PHASES) -> list[Result]:
    """Self-consistency scoring: the prefill of ``inputs`` prefixes, then the decode of
    ``num_samples`` critiques each, with the sampling rules (weights not split over fsdp).
    ``steps_per_check``, ``decode_phases``: the decode's
    (:func:`cloud_jax.sampling.loop.decode`)."""
    model_cfg = dataclasses.replace(cfg.model, scan_layers=False)  # sampling runs unrolled
    mesh = make_mesh(cfg.mesh, devices)
    rules = tuple(SAMPLE_RULES)
    params = jax.tree.map(lambda s, sh: _abstract(s.shape, s.dtype, sh),
                          param_shapes(model_cfg), param_shardings(model_cfg, mesh, rules))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(dict(rules)["batch"]))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ids = _abstract((inputs, prefix_len), jnp.int32, rows)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), inputs))
    keys = _abstract(keys.shape, keys.dtype, rows)
    stops = _abstract((4,), jnp.int32, rep)
    with mesh_context(mesh, rules):
        pre, pre_res = _compile(
            f"sampling prefill ({inputs} inputs x {prefix_len} tokens, mesh "
            f"{dict(mesh.shape)}, weights {model_cfg.param_dtype})",
            lambda: prefill.lower(params, ids, ids, cfg=model_cfg, cache_len=prefix_len,
                                  rules=rules).compile())
        if pre is None:
            return [pre_res]  # the decode reads the prefill's cache: nothing to compile it on
        logits, cache = jax.tree.map(lambda s, sh: _abstract(s.shape, s.dtype, sh),
                                     pre.out_info, pre.output_shardings)
        checks = f", checked every {steps_per_check} steps" if steps_per_check > 1 else ""
        if decode_phases != DECODE_PHASES:
            checks += f", {decode_phases} phase{'s' if decode_phases > 1 else ''}"

        def lower_decode():
            return decode.lower(params, cache, logits, keys, stops, cfg=model_cfg, rules=rules,
                                method=Temperature(1.0), num_samples=num_samples,
                                max_new_tokens=max_new_tokens, pad_id=0,
                                steps_per_check=steps_per_check, decode_phases=decode_phases)

        on_gpu = devices[0].platform in ("cuda", "gpu")
        _, dec_res = _compile(
            f"sampling decode ({inputs} inputs x K={num_samples}, {max_new_tokens} new "
            f"tokens{checks})",
            (lambda: _thunk_sequence(lower_decode())) if on_gpu
            else lambda: lower_decode().compile(),
            loops=True)
    if dec_res.pallas_calls is not None:
        impl = model_cfg.decode_attention_impl
        dec_res.decode_attention = (
            f"the Pallas kernel (model.decode_attention_impl={impl}), {dec_res.pallas_calls} "
            f"call(s) in the program (one a layer in each phase's loop)" if dec_res.pallas_calls
            else f"XLA's (model.decode_attention_impl={impl})")
    return [pre_res, dec_res]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/X.yaml")
    parser.add_argument("--topology", required=True,
                        help="TPU slice: v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips); "
                             "NVIDIA GPUs: h100, h200, a100, or h100-N for N of them")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="utilisation of the slice's peak bf16 FLOP/s for the step time")
    parser.add_argument("--sample", action="store_true",
                        help="also compile the self-consistency prefill and decode")
    parser.add_argument("--sample-only", action="store_true",
                        help="compile only the prefill and decode (a sampling mesh or dtype "
                             "given as overrides then leaves the train step alone)")
    parser.add_argument("--sample-inputs", type=int, default=0,
                        help="inputs per sampling batch, a multiple of data x fsdp; 0: one "
                             "per data x fsdp shard")
    parser.add_argument("--prefix-len", type=int, default=0,
                        help="prefill tokens per input; 0: data.max_length, or what "
                             "model.max_position_embeddings leaves after --max-new-tokens + 1 "
                             "where that is less")
    parser.add_argument("--num-samples", type=int, default=8, help="K critiques per input")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="critique budget")
    parser.add_argument("--steps-per-check", type=int, default=1, metavar="C",
                        help="decode steps between two checks of whether every row has ended")
    parser.add_argument("--decode-phases", type=int, default=DECODE_PHASES, metavar="P",
                        help="loops the decode grows its critiques' cache in, each compiled on "
                             "its own (default %(default)s; 1 compiles fastest)")
    parser.add_argument("--gpu-memory-fraction", type=float,
                        default=DEFAULT_GPU_MEMORY_FRACTION,
                        help="share of a GPU's memory a program may use (JAX's allocator: 0.75 "
                             "unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu}: must be in (0, 1]")
    if not 0 < args.gpu_memory_fraction <= 1:
        parser.error(f"--gpu-memory-fraction {args.gpu_memory_fraction}: must be in (0, 1]")
    if args.steps_per_check < 1:
        parser.error(f"--steps-per-check {args.steps_per_check}: give a whole number >= 1")
    if args.decode_phases < 1:
        parser.error(f"--decode-phases {args.decode_phases}: give a whole number >= 1")
    check_counts(parser, args, 1, "num_samples", "max_new_tokens")
    check_counts(parser, args, 0, "prefix_len", "sample_inputs")
    with _without_compilation_cache():
        return _run(args)


@contextlib.contextmanager
def _without_compilation_cache():
    """Every program here is compiled for a topology this host does not have, and JAX cannot load
    such a program back from its persistent compilation cache: a later run would warn "Error
    reading persistent compilation cache entry ... PjRtCompiler must be constructed with a
    Client" and compile again, and each run would write entries nothing can read. A process
    decides at its first compile whether it uses the cache, so this holds where `aot` runs as
    its own command; the setting is put back afterwards."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def sample_prefix_len(cfg: Config, prefix_len: int, max_new_tokens: int) -> int:
    """The prefill tokens per input to compile the sampler for: ``prefix_len`` (0:
    data.max_length, or fewer where the model's positions allow fewer, as scoring holds it).
    A ConfigError where a prefill, its critique and the critique's end-of-turn token would run
    past model.max_position_embeddings."""
    positions = cfg.model.max_position_embeddings
    room = positions - max_new_tokens - 1
    if room < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} and the critique's end-of-turn "
                          f"token leave no prefill room in model.max_position_embeddings="
                          f"{positions}: lower --max-new-tokens (to at most {positions - 2})")
    if prefix_len > room:
        raise ConfigError(f"--prefix-len {prefix_len}, --max-new-tokens {max_new_tokens} and the "
                          f"critique's end-of-turn token need {prefix_len + max_new_tokens + 1} "
                          f"positions, more than model.max_position_embeddings={positions}: "
                          f"lower --prefix-len (to at most {room}) or --max-new-tokens")
    return prefix_len or min(cfg.data.max_length, room)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sl = parse_slice(args.topology)
    try:
        devices = gpu_devices(sl) if sl.gpu is not None else tpu_devices(sl)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    budget = sl.memory_budget(args.gpu_memory_fraction)
    of_card = (f" ({args.gpu_memory_fraction:.0%} of {_gib(sl.gpu.memory_bytes)})"
               if sl.gpu is not None else "")
    print(f"{sl.name}: topology {sl.topology}, {sl.chips} chip(s) ({devices[0].device_kind}), "
          f"{_gib(budget)} HBM{of_card} and {sl.chip.peak_flops / 1e12:.0f} TFLOP/s bf16 "
          f"per chip; config {args.config}", flush=True)
    sampling = args.sample or args.sample_only
    if sampling:
        # The sampling batch is split over data x fsdp (SAMPLE_RULES): checked before anything
        # compiles, as the train batch is, not left to fail inside the compiler.
        data_fsdp = math.prod(make_mesh(cfg.mesh, devices).shape[a] for a in ("data", "fsdp"))
        if args.sample_inputs % data_fsdp:
            raise ConfigError(f"--sample-inputs {args.sample_inputs} must be a multiple of the "
                              f"mesh's data x fsdp size {data_fsdp}, over which the sampling "
                              "batch is split")
        prefix_len = sample_prefix_len(cfg, args.prefix_len, args.max_new_tokens)
    results = []
    if not args.sample_only:
        results.append(compile_train(cfg, devices))
    if sampling:
        results += compile_sample(
            cfg, devices, inputs=args.sample_inputs or data_fsdp,
            prefix_len=prefix_len, num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens, steps_per_check=args.steps_per_check,
            decode_phases=args.decode_phases)
    for res in results:
        print("\n".join(report(res, sl, args.mfu, args.gpu_memory_fraction)), flush=True)
    over = [r for r in results if not r.fits(budget)]
    for r in over:
        print(f"error: {r.name} does not fit on {sl.name}: {r.overshoot(budget)}; "
              "use a larger slice, more remat, grad accumulation or a smaller batch",
              file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
