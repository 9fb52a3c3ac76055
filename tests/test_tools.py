"""tools/: the measuring aids of docs/BENCHMARKS.md."""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jaxlib
import pytest

from cloud_jax.model import cpu_kernels

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(platform.machine() != "x86_64" or jaxlib.__version__ != "0.10.2"
                    or shutil.which("nm") is None or cpu_kernels._compiler() is None,
                    reason="x86-64 Linux with jaxlib 0.10.2, nm and a C++ compiler")
def test_avx2_host_restricts_the_kernels_xla_and_torch(tmp_path):
    env = dict(os.environ, CLOUD_JAX_KERNEL_CACHE=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "scripts")]))
    for name in ("CLOUD_JAX_KERNEL_ARCH", "XLA_FLAGS", "ATEN_CPU_CAPABILITY"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "avx2_host.py"), "-m",
                           "avx2_probe"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    flags = re.search(r"YNNPACK arch flags (0x[0-9a-f]+) -> (0x[0-9a-f]+)", done.stdout)
    assert flags, done.stdout
    assert int(flags[2], 16) == int(flags[1], 16) & 0xFF
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kernels"] and result["vector_floats"] == 8
    assert "--xla_cpu_max_isa=AVX2" in result["xla_flags"] and result["aten"] == "avx2"
    assert result["dot_error"] < 1e-3


def test_avx2_host_says_how_to_call_it():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "avx2_host.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "usage: python tools/avx2_host.py -m MODULE" in done.stderr
