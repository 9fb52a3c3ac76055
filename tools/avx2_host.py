"""Run a command as this project would run on an AVX2-only x86 host (no AVX-512), on a machine
that has AVX-512: a measuring aid for the benchmarks (docs/BENCHMARKS.md), not for production.

    python tools/avx2_host.py -m cloud_jax bench sample --repeats 2

What it restricts, before JAX starts:
- the CPU decode kernels: built with ``CLOUD_JAX_KERNEL_ARCH=x86-64-v3`` (AVX2 + FMA);
- XLA's generated code: ``--xla_cpu_max_isa=AVX2``;
- transformers' reference (PyTorch): ``ATEN_CPU_CAPABILITY=avx2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``,
  ``ONEDNN_MAX_CPU_ISA=AVX2``;
- XLA's library dots (YNNPACK, which picks its kernels from the CPU at run time and has no
  switch): the architecture flags it caches on first use are masked to the bits below AVX-512
  (bits 0-7 in jaxlib 0.10.2's build: SSE to AVX2/FMA; 8 and up: AVX-512 variants and AMX). The
  flags' address comes from the library's symbol table (``nm``); another jaxlib version is
  refused, as its bits may differ.

What it cannot change: the caches, memory and clock of this machine, which an AVX2-only host
(older or smaller parts) does not share. Numbers taken this way say how the code paths compare,
not what an AVX2 machine would measure.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import shutil
import subprocess
import sys

_YNN_FLAGS = "ynn::get_supported_arch_flags()::flags"
_KEEP_BITS = 0xFF  # jaxlib 0.10.2: bits 0-7 are SSE2 .. AVX2/FMA3
_JAXLIB = "0.10.2"


def _restrict_environment() -> None:
    # Named on the bench's host line and in its record (cloud_jax.cli.bench.host).
    os.environ["CLOUD_JAX_EMULATED_HOST"] = "an AVX2-only x86 host (tools/avx2_host.py)"
    os.environ.setdefault("CLOUD_JAX_KERNEL_ARCH", "x86-64-v3")
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_max_isa" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_max_isa=AVX2".strip()
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def _mask_ynn_arch_flags() -> None:
    import jax
    import jax.numpy as jnp
    import jaxlib

    if jaxlib.__version__ != _JAXLIB:
        raise SystemExit(f"error: the YNNPACK flag bits are known for jaxlib {_JAXLIB} only "
                         f"(this is {jaxlib.__version__})")
    x = jnp.ones((64, 64), jnp.float32)
    jax.block_until_ready(x @ x)  # YNNPACK reads the CPU's features once, here
    maps = [line.split() for line in open("/proc/self/maps") if "libjax_common.so" in line]
    if not maps:
        raise SystemExit("error: libjax_common.so is not loaded in this process")
    path = maps[0][-1]
    base = min(int(m[0].split("-")[0], 16) - int(m[2], 16) for m in maps)
    if shutil.which("nm") is None:
        raise SystemExit("error: nm (binutils) is needed to find YNNPACK's flags")
    symbols = subprocess.run(["nm", "-C", path], capture_output=True, text=True, check=True)
    found = [parts[0] for parts in (line.split(maxsplit=2) for line in symbols.stdout.splitlines())
             if len(parts) == 3 and parts[2] == _YNN_FLAGS]
    if len(found) != 1:
        raise SystemExit(f"error: {_YNN_FLAGS} not found in {path}")
    flags = ctypes.c_uint64.from_address(base + int(found[0], 16))
    before = flags.value
    flags.value = before & _KEEP_BITS
    print(f"[avx2 host] kernels -march={os.environ['CLOUD_JAX_KERNEL_ARCH']}, XLA max ISA AVX2, "
          f"YNNPACK arch flags {before:#x} -> {flags.value:#x}, torch AVX2", flush=True)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: python tools/avx2_host.py -m MODULE [ARGS ...]")
    _restrict_environment()
    _mask_ynn_arch_flags()
    module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
