"""Run through tools/avx2_host.py: prints one JSON line with what the process runs under (the
kernel library's vector width, XLA's flags, torch's ISA switches) and a dot's error against
NumPy (XLA's library dots on the restricted kernels)."""

import json
import os

import jax.numpy as jnp
import numpy as np

from cloud_jax.cli.bench.host import host_info, host_line
from cloud_jax.model import cpu_kernels

rng = np.random.default_rng(0)
a, b = rng.normal(size=(128, 256)).astype(np.float32), rng.normal(size=(256, 96)).astype(np.float32)
dot_error = float(np.max(np.abs(np.asarray(jnp.asarray(a) @ jnp.asarray(b)) - a.astype(np.float64) @ b)))
print(json.dumps({
    "kernels": cpu_kernels.available("matmul"),
    "vector_floats": cpu_kernels.vector_floats(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "aten": os.environ.get("ATEN_CPU_CAPABILITY"),
    "dot_error": dot_error,
    "host_line": host_line(host_info()),
}))
