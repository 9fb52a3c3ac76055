"""What machine a benchmark ran on: the CPU model, its vector extensions and the JAX backend.

The same benchmark differs by 2x between an AVX-512 host and an AVX2-only one, so every bench
prints this line and puts the fields in its JSON.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

import jax

# The extensions that decide how fast XLA's CPU matmuls and reductions run, in order of age.
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[Optional[str], set[str]]:
    model, flags = None, set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and model is None:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def host_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """``cpu_model``, ``vector_extensions`` (those of VECTOR_EXTENSIONS this CPU has),
    ``cpu_count``, ``backend`` and ``devices`` (the accelerator kinds when not CPU)."""
    model, flags = _cpuinfo(cpuinfo_path)
    return {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown",
        "vector_extensions": [ext for ext in VECTOR_EXTENSIONS if ext in flags],
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": sorted({d.device_kind for d in jax.devices()}),
    }


def host_line(info: dict) -> str:
    ext = " ".join(info["vector_extensions"]) or "unknown"
    return (f"host: {info['cpu_model']} ({info['cpu_count']} cores; {ext}); "
            f"{info['backend']}: {', '.join(info['devices'])}")


def write_record(path: str, command: str, result: dict) -> None:
    """One measurement as docs/measurements/ keeps it: ``{"date", "machine", "command",
    "result"}``, the result being the bench's JSON line."""
    import datetime
    import json
    from pathlib import Path

    info = {k: result[k] for k in ("cpu_model", "vector_extensions", "cpu_count", "backend",
                                   "devices") if k in result}
    machine = (f"{', '.join(info['devices'])} ({info['backend']}); host {info['cpu_model']}, "
               f"{info['cpu_count']} cores" if info else "unknown")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine, "command": command, "result": result}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1) + "\n")
