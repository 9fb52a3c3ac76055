"""The decode step's attention as one CPU kernel per layer (``cpu_attention.cc``, an XLA FFI call).

    attention = cpu_attention.decode_attention if cpu_attention.active() else None
    out, layer_cache = attend(cfg, q, k, v, positions, info, layer_cache, prefix, rope, attention)

XLA's CPU backend runs a decode step's attention (one new token per row over a shared prefix and
the row's own cache) as ~20 small operations a layer, one after another on one core, with thread
hand-offs between them: on a 2-core host about a quarter of the step (docs/BENCHMARKS.md). The
kernel computes the same values in one call a layer: scores against the prefix and own keys, the
masked softmax over both, the weighted values, split by (prefix group, key/value head) over XLA's
intra-op thread pool.

The feature-major decode layout (CPU, one device) uses it when it applies: one new token per
row, fp32, a shared prefix, keys stored [.., head_dim, slots]. Anything else goes to
:func:`cloud_jax.model.layers.gqa_attention`, which gives the same values (tests hold them
equal).

The source is compiled once per machine with the system C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) against the FFI headers that jaxlib ships, and cached under
``$CLOUD_JAX_KERNEL_CACHE`` (default ``~/.cache/cloud_jax/kernels``), keyed by the source,
jaxlib's version, the compiler and the CPU. Without a compiler, or when the build fails, one
warning says why and decoding takes XLA's attention. ``CLOUD_JAX_CPU_ATTENTION=0`` turns the
kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from cloud_jax.model.layers import _MASK_VALUE, gqa_attention

__all__ = ["active", "available", "build", "decode_attention", "supports", "unavailable_reason"]

TARGET = "cloud_jax_decode_attention"
_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-w")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str (and the library), once the first check ran


def _enabled() -> bool:
    return os.environ.get("CLOUD_JAX_CPU_ATTENTION", "1").strip().lower() not in (
        "0", "false", "no", "off")


def _compiler() -> Optional[str]:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags where Linux lists
    them, else the platform's description."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in text.splitlines()
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "cpu family",
                                               "model")]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    root = os.environ.get("CLOUD_JAX_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cloud_jax" / "kernels"


def build(compiler: Optional[str] = None) -> Path:
    """The compiled kernel library (built now unless a cached build matches). Raises
    RuntimeError with the compiler's message when there is no compiler or the build fails."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    include = jax.ffi.include_dir()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, jaxlib.__version__.encode(), compiler.encode(), " ".join(_FLAGS).encode(),
        _cpu_identity().encode()])).hexdigest()[:20]
    out = _cache_dir() / f"cpu_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a unique name, then renamed: concurrent builds (test workers) never see a
    # partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, "-I", include, str(_SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA (tried once per process; a
    failure warns once and returns False)."""
    if not _enabled():
        return False
    with _lock:
        if "ok" not in _state:
            try:
                if platform.system() == "Windows":
                    raise RuntimeError("not built on Windows")
                library = ctypes.cdll.LoadLibrary(str(build()))
                jax.ffi.register_ffi_target(
                    TARGET, jax.ffi.pycapsule(library.CloudJaxDecodeAttention), platform="cpu")
                _state.update(ok=True, reason="", library=library)  # the handle keeps it loaded
            except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
                _state.update(ok=False, reason=str(e))
                warnings.warn(f"the fused CPU decode attention is unavailable, so decoding uses "
                              f"XLA's attention (the same values, slower): {e}", RuntimeWarning,
                              stacklevel=2)
        return _state["ok"]


def active() -> bool:
    """Whether a decode step traced now takes the kernel: it is :func:`available` and the
    default backend is the CPU (the kernel is a CPU custom call; the feature-major layout can
    also be asked for on other backends)."""
    return jax.default_backend() == "cpu" and available()


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` returned False (None when it did not, or was not asked)."""
    if not _enabled():
        return "turned off by CLOUD_JAX_CPU_ATTENTION"
    return _state.get("reason") or None


def supports(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, prefix,
             keys_transposed: bool) -> bool:
    """Whether :func:`decode_attention` computes this call itself (else it defers to
    :func:`~cloud_jax.model.layers.gqa_attention`)."""
    if prefix is None or not keys_transposed or q_bthd.shape[1] != 1:
        return False
    pk, pv, _ = prefix
    return all(x.dtype == jnp.float32 for x in (q_bthd, k_bksd, v_bksd, pk, pv)) and (
        q_bthd.shape[0] % pk.shape[0] == 0)


def decode_attention(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array,
                     mask_bts: jax.Array, prefix=None, keys_transposed: bool = False) -> jax.Array:
    """:func:`~cloud_jax.model.layers.gqa_attention` (same arguments, same values) through the
    kernel where :func:`supports` holds; the caller checks :func:`active` first."""
    if not supports(q_bthd, k_bksd, v_bksd, prefix, keys_transposed):
        return gqa_attention(q_bthd, k_bksd, v_bksd, mask_bts, prefix, keys_transposed)
    pk, pv, pmask_btp = prefix
    b, _, h, d = q_bthd.shape
    kv = k_bksd.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((b, kv, h // kv, d), jnp.float32))
    out = call(q_bthd.reshape(b, kv, h // kv, d), pk, pv, k_bksd, v_bksd,
               pmask_btp[:, 0].astype(jnp.int32), mask_bts[:, 0].astype(jnp.int32),
               scale=np.float32(1.0 / np.sqrt(d)), mask_value=np.float32(_MASK_VALUE))
    return out.reshape(b, 1, h, d)
