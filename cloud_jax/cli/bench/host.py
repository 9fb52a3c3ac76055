"""What machine a benchmark ran on: the CPU model, its vector extensions, how busy it was and the
JAX backend.

The same benchmark differs by 2x between an AVX-512 host and an AVX2-only one, and by 10-20%
between a quiet and a shared one, so every bench prints this line and puts the fields in its JSON.
Virtual machines often name every Xeon "Intel(R) Xeon(R) Processor"; the x86 family and model
numbers (``cpu_signature``) tell the generations apart.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

import jax

# Set by a tool that runs a bench restricted to an older host's code paths (tools/avx2_host.py);
# printed on the host line and recorded, so such a run is never taken for the host's own.
EMULATED_HOST_VARIABLE = "CLOUD_JAX_EMULATED_HOST"

# The environment variables that change what a run measures, recorded with it where set.
RECORDED_ENVIRONMENT = (EMULATED_HOST_VARIABLE, "CLOUD_JAX_KERNEL_ARCH", "JAX_PLATFORMS",
                        "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_CLIENT_MEM_FRACTION",
                        "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_DEFAULT_MATMUL_PRECISION",
                        "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                        "OMP_NUM_THREADS", "OMP_WAIT_POLICY")

# The extensions that decide how fast XLA's CPU matmuls and reductions run, in order of age.
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[Optional[str], set[str], Optional[str]]:
    """(model name, flags, "family F model M") of the first processor listed."""
    model, flags, numbers = None, set(), {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and model is None:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
                elif key in ("cpu family", "model") and key not in numbers:
                    numbers[key] = value.strip()
    except OSError:
        pass
    signature = None
    if numbers.get("cpu family") and numbers.get("model"):
        signature = f"family {numbers['cpu family']} model {numbers['model']}"
    return model, flags, signature


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes), None where the OS does not report one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_times(path: str) -> Optional[tuple[int, int]]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat's first line."""
    try:
        with open(path, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 5 or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return sum(ticks) - idle, sum(ticks)


def _own_cpu_seconds() -> float:
    """CPU seconds this process has used (all its threads)."""
    t = os.times()
    return t.user + t.system


def cpu_busy(interval: float = 0.3, path: str = "/proc/stat") -> Optional[float]:
    """The share of all cores that other work kept busy over ``interval`` seconds (0.5 = one
    core of two): this process's own threads, such as JAX finishing work it was given, are not
    counted. The load average trails by a minute, so it still counts a bench that has just
    finished; this does not. None where the OS does not report it."""
    import time

    first, own = _cpu_times(path), _own_cpu_seconds()
    if first is None:
        return None
    time.sleep(interval)
    second, own = _cpu_times(path), _own_cpu_seconds() - own
    if second is None or second[1] <= first[1]:
        return None
    ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = (second[0] - first[0]) / ticks_per_s - own
    return round(max(others, 0.0) / ((second[1] - first[1]) / ticks_per_s), 3)


def host_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """``cpu_model``, ``cpu_signature`` (x86 family and model numbers, else None),
    ``vector_extensions`` (those of VECTOR_EXTENSIONS this CPU has), ``cpu_count``,
    ``load_average`` (1 minute, when the bench starts), ``cpu_busy`` (the share of the cores
    other work used in the moment this is called: call it before the bench's own work),
    ``backend``, ``devices`` (the accelerator kinds when not CPU) and ``emulated_host`` (what a
    tool that restricts the run, such as tools/avx2_host.py, says it emulates, from
    ``CLOUD_JAX_EMULATED_HOST``; else None: the CPU's own extensions are listed either way)."""
    model, flags, signature = _cpuinfo(cpuinfo_path)
    return {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown",
        "cpu_signature": signature,
        "vector_extensions": [ext for ext in VECTOR_EXTENSIONS if ext in flags],
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "cpu_busy": cpu_busy(),
        "backend": jax.default_backend(),
        "devices": sorted({d.device_kind for d in jax.devices()}),
        "emulated_host": os.environ.get(EMULATED_HOST_VARIABLE) or None,
    }


# The names JAX reads for the share of a GPU its memory pool may take (the second is deprecated;
# setting both is an error).
_MEM_FRACTION_NAMES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def select_backend(backend: Optional[str]) -> None:
    """Call before anything asks JAX for a device (JAX reads its GPU memory settings when it
    first creates a GPU client). The benches run torch on JAX's device, so unless the user set
    them: JAX takes GPU memory as its arrays need it instead of 75% of the device at start
    (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), up to 90% of it (``XLA_CLIENT_MEM_FRACTION``).

    With ``backend`` (``cpu``, ``gpu`` or ``tpu``) this also makes sure JAX runs there: ``cpu``
    and ``tpu`` pin ``jax_platforms``; ``gpu`` is checked instead of pinned, because JAX expands
    the platform name "gpu" to every GPU platform (cuda, rocm, oneapi) and fails on the first
    whose plugin is not installed. A backend JAX cannot give is a clear error (SystemExit)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not any(os.environ.get(name) for name in _MEM_FRACTION_NAMES):
        os.environ["XLA_CLIENT_MEM_FRACTION"] = "0.90"
    if backend is None:
        return
    if backend != "gpu":
        jax.config.update("jax_platforms", backend)
    try:
        found = jax.default_backend()
    except RuntimeError as err:
        raise SystemExit(f"error: --backend {backend}: JAX has no such device here ({err})")
    if found != backend:
        kinds = ", ".join(sorted({d.device_kind for d in jax.devices()}))
        raise SystemExit(f"error: --backend {backend}: JAX found no {backend} here, only {found} "
                         f"({kinds}); install a JAX build for it (jax[cuda13] for an NVIDIA GPU)")


def first_line(err: BaseException) -> str:
    """The first line of an exception's text ("" when it has none): a framework's out-of-memory
    message goes on for lines of allocator statistics."""
    return next(iter(str(err).splitlines()), "")


def host_line(info: dict) -> str:
    ext = " ".join(info["vector_extensions"]) or "unknown"
    signature = f", {info['cpu_signature']}" if info.get("cpu_signature") else ""
    load, used = info.get("load_average"), info.get("cpu_busy")
    busy = ""
    if load is not None:
        busy = f"; load average {load:.2f}"
    if used is not None:
        busy += f"; {used:.0%} of the cores busy at start"
    # The share of the cores in use as the bench starts decides; the load average, which trails
    # by a minute, only where that share is unknown.
    if (used is not None and used >= 0.25) or (
            used is None and load is not None and info.get("cpu_count")
            and load >= 0.5 * info["cpu_count"]):
        busy += " (busy: other work shares the cores, timings will be noisy)"
    emulated = (f"; emulating {info['emulated_host']}, not measuring this host's own code paths"
                if info.get("emulated_host") else "")
    return (f"host: {info['cpu_model']}{signature} ({info['cpu_count']} cores; {ext}{busy}"
            f"{emulated}); {info['backend']}: {', '.join(info['devices'])}")


# The packages a measurement depends on, recorded with it (an accelerator's image has its own).
RECORDED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "torch")


def package_versions() -> dict:
    """{distribution: version} of RECORDED_PACKAGES installed, plus Python's."""
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_record(path: str, command: str, result: dict) -> None:
    """One measurement as docs/measurements/ keeps it: ``{"date", "machine", "command",
    "versions", "environment", "result"}``, the result being the bench's JSON line and
    ``environment`` the variables of RECORDED_ENVIRONMENT that were set. Written atomically
    (through a temporary file): ``path`` holds the whole new record or what it held before."""
    import datetime
    import json

    from cloud_jax import storage

    info = {k: result[k] for k in ("cpu_model", "vector_extensions", "cpu_count", "backend",
                                   "devices") if k in result}
    machine = (f"{', '.join(info['devices'])} ({info['backend']}); host {info['cpu_model']}, "
               f"{info['cpu_count']} cores" if info else "unknown")
    if result.get("emulated_host"):
        machine += f", emulating {result['emulated_host']}"
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine, "command": command, "versions": package_versions(),
           "environment": {name: os.environ[name] for name in RECORDED_ENVIRONMENT
                           if os.environ.get(name)},
           "result": result}
    # Whole or not at all: a bench stopped by its time limit while rewriting its record (bench
    # sample writes it twice) leaves the first one, which a reader can still load.
    storage.write_text_atomic(path, json.dumps(out, indent=1) + "\n")
