"""The feature-major decode step's CPU kernels (``cpu_kernels.cc``, XLA FFI calls).

    attention = cpu_kernels.decode_attention if cpu_kernels.active("attention") else None
    out, layer_cache = attend(cfg, q, k, v, positions, info, layer_cache, prefix, rope, attention)
    y_on = cpu_kernels.decode_matmul(w_oi, x_in)   # W[out, in] . x[in, rows], fp32
    x_dn = cpu_kernels.decode_matmul(w_down, gate_up, gated=True, residual=x_dn)  # fused

XLA's CPU backend runs a decode step (a few rows, one new token each) well below what the machine
can do in two places (docs/BENCHMARKS.md):

- **attention** over a shared prefix and each row's own cache: ~20 small operations a layer, one
  after another on one core, with thread hand-offs between them. The kernel computes the same
  values in one call a layer (scores against the prefix and own keys, the masked softmax over
  both, the weighted values), split by (prefix group, key/value head) over XLA's intra-op thread
  pool.
- **matmul**, the weight products ``W[out, in] . x[in, rows]`` at a few rows: XLA's dot kernels
  tile the output for many columns and reach about a third of the host's bandwidth at 16 rows.
  The kernel keeps each output row's values in vector registers, reads every weight once as a
  broadcast multiply-add and streams the weight rows with a prefetch ahead, a block of rows per
  task over the same thread pool.

Both also take in the small operations around them that XLA would run as separate steps with a
thread hand-off each: the attention reads only the keys a row attends to (the span of its mask)
and, in its fused form (:func:`decode_attention_write`), applies the rotary embedding to the q/k/v
product and writes the new keys and values into the caches itself; the matmul applies the RMS norm
to its input, or the gated unit ``silu(gate) * up``, adds the residual to its output and can write
the output transposed (the logits [rows, vocab]).

The feature-major decode layout (CPU, one device) uses them where they apply: attention for one
new token per row in fp32 over a shared prefix with keys stored [.., head_dim, slots]; matmul for
fp32 2-D operands. Anything else goes to XLA (:func:`cloud_jax.model.layers.gqa_attention`, an
einsum), which gives the same values (tests hold them equal).

The source is compiled once per machine with the system C++ compiler (``$CXX``, a command with
any arguments as make takes it, else ``c++``,
``g++`` or ``clang++``) against the FFI headers that jaxlib ships, and cached under
``$CLOUD_JAX_KERNEL_CACHE`` (default ``~/.cache/cloud_jax/kernels``), keyed by the source,
jaxlib's version, the compiler, its flags and the CPU. It targets this CPU (``-march=native``);
``CLOUD_JAX_KERNEL_ARCH`` names another ``-march`` target, e.g. ``x86-64-v3`` (AVX2 and FMA, no
AVX-512) to run the 8-float-vector code on an AVX-512 machine, or a library that also runs on
older CPUs of a mixed fleet; a library using an extension this CPU lacks (AVX2, FMA, AVX-512F)
is not loaded. Without a compiler, when the build fails or the library is refused, one warning
says why and decoding takes XLA's operations. ``CLOUD_JAX_CPU_KERNELS`` picks the kernels
used: unset or ``all`` both, ``0`` (or ``none``, ``off``) none, else a comma-separated list of
``attention`` and ``matmul``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
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

from cloud_jax.model.layers import _MASK_VALUE, gqa_attention, rms_norm

__all__ = ["KERNELS", "active", "available", "build", "decode_attention",
           "decode_attention_write", "decode_matmul",
           "enabled_kernels", "supports", "unavailable_reason", "vector_floats"]

ATTENTION_TARGET = "cloud_jax_decode_attention"  # the kernels' XLA custom-call targets
ATTENTION_WRITE_TARGET = "cloud_jax_decode_attention_write"
MATMUL_TARGET = "cloud_jax_decode_matmul"
KERNELS = ("attention", "matmul")
_SYMBOLS = {ATTENTION_TARGET: "CloudJaxDecodeAttention",
            ATTENTION_WRITE_TARGET: "CloudJaxDecodeAttentionWrite",
            MATMUL_TARGET: "CloudJaxDecodeMatmul"}
_ENV = "CLOUD_JAX_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_ARCH_ENV = "CLOUD_JAX_KERNEL_ARCH"
_ARCH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str (and the library), once the first check ran


def enabled_kernels() -> tuple[str, ...]:
    """The kernels ``CLOUD_JAX_CPU_KERNELS`` allows (all of :data:`KERNELS` when unset)."""
    value = os.environ.get(_ENV, "all").strip().lower()
    if value in ("", "1", "all", "true", "yes", "on"):
        return KERNELS
    if value in ("0", "none", "false", "no", "off"):
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise ValueError(f"{_ENV}={os.environ[_ENV]!r}: unknown kernel(s) {', '.join(unknown)}; "
                         f"expected all, none, or a comma-separated list of {', '.join(KERNELS)}")
    return names


def _check(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected one of {', '.join(KERNELS)}")


def _compiler_command() -> Optional[list[str]]:
    """The compiler's command: ``$CXX`` (a program and its arguments, as make takes it, e.g.
    ``ccache g++``), else the first of ``c++``, ``g++``, ``clang++`` found; None when there is
    none."""
    cxx = os.environ.get("CXX", "").strip()
    try:
        words = shlex.split(cxx)
    except ValueError:  # unbalanced quotes: taken as one name, which no program has
        words = [cxx]
    for name in words[:1] or ["c++", "g++", "clang++"]:
        found = shutil.which(name)
        if found:
            return [found, *words[1:]]
    return None


def _compiler() -> Optional[str]:
    command = _compiler_command()
    return None if command is None else shlex.join(command)


def _arch() -> str:
    """The ``-march`` target: ``CLOUD_JAX_KERNEL_ARCH``, else ``native``."""
    return os.environ.get(_ARCH_ENV, "").strip() or "native"


def _flags() -> tuple[str, ...]:
    """The compiler's flags, ``-march`` from :func:`_arch`."""
    arch = _arch()
    if not set(arch) <= _ARCH_CHARS:
        raise RuntimeError(f"{_ARCH_ENV}={arch!r} is not a -march target name (e.g. native, "
                           f"x86-64-v3, haswell)")
    return ("-O3", f"-march={arch}", "-std=c++17", "-fPIC", "-shared", "-w")


_EXTENSION_BITS = {1: "avx2", 2: "fma", 4: "avx512f"}  # CloudJaxKernelExtensions's bits


def _cpu_flags() -> Optional[frozenset[str]]:
    """The CPU's feature flags as Linux lists them, or None where it does not."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = [line.split(":", 1)[1].split() for line in text.splitlines()
             if line.split(":")[0].strip() in ("flags", "Features") and ":" in line]
    return frozenset(flags[0]) if flags else None


def _check_extensions(bits: int) -> None:
    """Raise RuntimeError when the library uses x86 extensions the CPU lacks (a -march target
    from CLOUD_JAX_KERNEL_ARCH beyond this CPU), before any of its code runs."""
    flags = _cpu_flags()
    if flags is None:
        return
    missing = [name for bit, name in _EXTENSION_BITS.items() if bits & bit and name not in flags]
    if missing:
        raise RuntimeError(f"the kernel library built for -march={_arch()} uses {', '.join(missing)}, "
                           f"which this CPU lacks: unset {_ARCH_ENV} or name a target this CPU "
                           f"runs (e.g. x86-64-v3 needs avx2 and fma)")


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


def build(compiler: Optional[str] = None, source: Optional[Path] = None,
          extra_flags: tuple[str, ...] = ()) -> Path:
    """The compiled kernel library (built now unless a cached build matches). Raises
    RuntimeError with the compiler's message when there is no compiler or the build fails.

    ``source`` (default ``cpu_kernels.cc``) and ``extra_flags`` (e.g. ``("-DNAME=1",)``, after
    the usual flags) build another version of the kernels, cached apart: how
    ``tools/attention_ab.py`` compares two versions in one process."""
    command = [compiler] if compiler else _compiler_command()
    if command is None:
        named = (f": CXX={os.environ['CXX']!r} names no program on PATH"
                 if os.environ.get("CXX", "").strip() else "")
        raise RuntimeError(f"no C++ compiler found{named} (set CXX, or install g++ or clang++)")
    compiler = shlex.join(command)
    include = jax.ffi.include_dir()
    source_path = Path(source) if source is not None else _SOURCE
    code = source_path.read_bytes()
    flags = _flags() + tuple(extra_flags)
    key = hashlib.sha256(b"\0".join([
        code, jaxlib.__version__.encode(), compiler.encode(), " ".join(flags).encode(),
        _cpu_identity().encode()])).hexdigest()[:20]
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built in a unique directory, then renamed: concurrent builds (test workers) never see a
    # partial file. The compiler creates the file itself, so it takes the umask's permissions
    # (a cache shared between users stays loadable), not a private temporary file's 0600.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as work:
        tmp = os.path.join(work, out.name)
        cmd = [*command, *flags, "-I", include, str(source_path), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    return out


def available(kernel: str) -> bool:
    """Whether ``kernel`` (one of :data:`KERNELS`) is allowed by ``CLOUD_JAX_CPU_KERNELS`` and the
    library is built, loaded and registered with XLA (tried once per process; a failure warns
    once and returns False)."""
    _check(kernel)
    if kernel not in enabled_kernels():
        return False
    with _lock:
        if "ok" not in _state:
            try:
                if platform.system() == "Windows":
                    raise RuntimeError("not built on Windows")
                library = ctypes.cdll.LoadLibrary(str(build()))
                _check_extensions(library.CloudJaxKernelExtensions())
                for target, symbol in _SYMBOLS.items():
                    jax.ffi.register_ffi_target(
                        target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
                _state.update(ok=True, reason="", library=library)  # the handle keeps it loaded
            except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
                _state.update(ok=False, reason=str(e))
                warnings.warn(f"the CPU decode kernels are unavailable, so decoding uses XLA's "
                              f"operations (the same values, slower): {e}", RuntimeWarning,
                              stacklevel=2)
        return _state["ok"]


def active(kernel: str) -> bool:
    """Whether a decode step traced now takes ``kernel``: it is :func:`available` and the
    default backend is the CPU (the kernels are CPU custom calls; the feature-major layout can
    also be asked for on other backends)."""
    return jax.default_backend() == "cpu" and available(kernel)


def vector_floats() -> Optional[int]:
    """The floats a vector register holds in the loaded kernel library (16 built for AVX-512, 8
    for AVX2 or older), or None when no library is loaded."""
    library = _state.get("library")
    return int(library.CloudJaxKernelVectorFloats()) if library is not None else None


def unavailable_reason(kernel: str) -> Optional[str]:
    """Why :func:`available` returned False for ``kernel`` (None when it did not, or was not
    asked)."""
    _check(kernel)
    if kernel not in enabled_kernels():
        return f"turned off by {_ENV}"
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
    kernel where :func:`supports` holds; the caller checks ``active("attention")`` first."""
    if not supports(q_bthd, k_bksd, v_bksd, prefix, keys_transposed):
        return gqa_attention(q_bthd, k_bksd, v_bksd, mask_bts, prefix, keys_transposed)
    pk, pv, pmask_btp = prefix
    b, _, h, d = q_bthd.shape
    kv = k_bksd.shape[1]
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct((b, kv, h // kv, d), jnp.float32))
    out = call(q_bthd.reshape(b, kv, h // kv, d), pk, pv, k_bksd, v_bksd,
               pmask_btp[:, 0].astype(jnp.int32), mask_bts[:, 0].astype(jnp.int32),
               scale=np.float32(1.0 / np.sqrt(d)), mask_value=np.float32(_MASK_VALUE))
    return out.reshape(b, 1, h, d)


def decode_attention_write(qkv_fn: jax.Array, cos_nd: jax.Array, sin_nd: jax.Array,
                           start: jax.Array, k_nksd: jax.Array, v_nksd: jax.Array,
                           mask_ns: jax.Array, prefix, num_heads: int,
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The feature-major decode step's attention for one new token per row in one call, from the
    q/k/v product: the rotary embedding of the queries and new keys (``cos_nd``, ``sin_nd``:
    each row's :func:`~cloud_jax.model.layers.rope_tables` [N, head_dim]), the new keys and
    values written into the caches at slot ``start`` (as ``dynamic_update_slice``; the caches'
    buffers are reused), and :func:`decode_attention` over the shared prefix and the caches.

    ``qkv_fn`` [(H + 2 KV) head_dim, N] fp32; caches: keys [N, KV, head_dim, S], values
    [N, KV, S, head_dim]; ``mask_ns`` [N, S]; ``prefix`` (keys [G, KV, head_dim, P], values
    [G, KV, P, head_dim], mask [N, P]). Returns the output [H head_dim, N] (feature-major) and
    the two caches. CPU and fp32 only: the caller checks ``active("attention")``."""
    pk, pv, pmask_np = prefix
    n = qkv_fn.shape[1]
    kv, d = k_nksd.shape[1], k_nksd.shape[2]
    if qkv_fn.shape[0] != (num_heads + 2 * kv) * d or num_heads % kv:
        raise ValueError(f"decode_attention_write: q/k/v product {qkv_fn.shape} does not hold "
                         f"{num_heads} query heads and {kv} key/value heads of size {d}")
    if any(x.dtype != jnp.float32 for x in (qkv_fn, cos_nd, sin_nd, k_nksd, v_nksd, pk, pv)):
        raise ValueError("decode_attention_write: fp32 operands only")
    call = jax.ffi.ffi_call(
        ATTENTION_WRITE_TARGET,
        (jax.ShapeDtypeStruct((num_heads * d, n), jnp.float32),
         jax.ShapeDtypeStruct(k_nksd.shape, jnp.float32),
         jax.ShapeDtypeStruct(v_nksd.shape, jnp.float32)),
        input_output_aliases={6: 1, 7: 2})
    return call(qkv_fn, cos_nd, sin_nd, jnp.asarray(start, jnp.int32).reshape(()), pk, pv,
                k_nksd, v_nksd, pmask_np.astype(jnp.int32), mask_ns.astype(jnp.int32),
                scale=np.float32(1.0 / np.sqrt(d)), mask_value=np.float32(_MASK_VALUE))


def decode_matmul(w_oi: jax.Array, x_in: jax.Array, *, norm: Optional[jax.Array] = None,
                  eps: float = 1e-6, gated: bool = False, residual: Optional[jax.Array] = None,
                  transposed: bool = False) -> jax.Array:
    """``residual + W[out, in] . f(x)`` -> [out, n] ([n, out] with ``transposed``), where f is
    the identity, the RMS norm over x's features with scale ``norm`` [in] and ``eps``
    (:func:`~cloud_jax.model.layers.rms_norm`), or with ``gated`` the gated unit
    ``silu(x[:in]) * x[in:]`` of an x of 2 * in features. Through the kernel (one call: the
    operations around the product run inside it) for fp32 operands, else the same operations
    in XLA; the caller checks ``active("matmul")`` first. ``residual`` has the output's shape."""
    if w_oi.ndim != 2 or x_in.ndim != 2:
        raise ValueError(f"decode_matmul: expected W [out, in] and x [in, n], got "
                         f"{w_oi.shape} and {x_in.shape}")
    o, i = w_oi.shape
    n = x_in.shape[1]
    if x_in.shape[0] != (2 * i if gated else i):
        raise ValueError(f"decode_matmul: W {w_oi.shape} takes x [{2 * i if gated else i}, n]"
                         f"{' (the gated unit: twice its inputs)' if gated else ''}, got "
                         f"{x_in.shape}")
    if norm is not None and gated:
        raise ValueError("decode_matmul: norm and gated are exclusive")
    if norm is not None and norm.shape != (i,):
        raise ValueError(f"decode_matmul: norm must be [{i}], got {norm.shape}")
    out_shape = (n, o) if transposed else (o, n)
    if residual is not None and residual.shape != out_shape:
        raise ValueError(f"decode_matmul: residual must be {out_shape}, got {residual.shape}")
    operands = (w_oi, x_in) + tuple(a for a in (norm, residual) if a is not None)
    if any(a.dtype != jnp.float32 for a in operands):
        x = x_in.astype(w_oi.dtype)
        if norm is not None:
            x = rms_norm(x, norm, eps, w_oi.dtype, axis=0)
        elif gated:
            x = jax.nn.silu(x[:i]) * x[i:]
        y = jnp.einsum("oi,in->on", w_oi, x)
        y = y.T if transposed else y
        return y if residual is None else residual + y
    call = jax.ffi.ffi_call(MATMUL_TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32))
    none = jnp.zeros((0,), jnp.float32)
    return call(w_oi, x_in, none if norm is None else norm,
                none if residual is None else residual,
                prologue=np.int32(1 if norm is not None else 2 if gated else 0),
                eps=np.float32(eps), transposed=np.int32(transposed))
