"""A Pallas (Triton) kernel for the decode's attention on NVIDIA GPUs.

A decode step attends one new token per row over two segments: the shared prefix (each input's
prompt, cached once for its K critiques) and the row's own critique cache. XLA computes that in
about 14 operations a layer (:func:`cloud_jax.model.layers.gqa_attention`: four products, the
masks, maxima, exponents, sums and the combination), each a kernel launch on a GPU, with the
score arrays written to device memory and read back between them (docs/BENCHMARKS.md, "On one
GPU"). :func:`decode_attention` is the same computation in one kernel a layer: one program per
(input, KV head) reads the input's prefix keys and values once for all K rows and their query
heads, then each row's own keys, with one running (online) softmax over both. A step of few
inputs splits each one's keys over several programs (:func:`splits`, flash-decoding's way), so
the card's SMs all read; XLA joins the parts' softmaxes after the kernel.

Both segments are read in blocks of keys (:func:`blocks`) with the queries of all the program's
rows as the rows of one matrix product (K x G rows, G query heads per KV head): the own
segment's block holds the keys of all K rows, and the scores of a row against another row's
keys are masked out (the products do K times the arithmetic they need, which a memory-bound step
has to spare; the keys are read once). Triton's blocks have power-of-two sizes, so the kernel
takes a step whose K and head size are powers of two and computes G rounded up to a power of
two, the extra query heads zeros (:func:`padded_group`; Triton pads a product of fewer than 16 rows
itself), as far as a program's blocks fit in a GPU's shared memory (:func:`supported`); the
caller keeps XLA's attention otherwise.

``interpret=True`` (the default off a GPU) runs the kernel through Pallas's interpreter: the
tests check it against :func:`gqa_attention` on the CPU.

Written for Pallas's Triton backend, which jax 0.10 and 0.11 compile (0.11 marks it deprecated
in favour of Mosaic GPU); a Mosaic GPU form is the way on where a GPU run shows the kernel's
worth.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

__all__ = ["blocks", "decode_attention", "on_nvidia_gpu", "padded_group", "splits",
           "supported"]


def _load_interpreter() -> None:
    """Imports Pallas's interpreter now. In jax 0.11 its module adds a setting to the context
    every jit cache key holds when it is first imported, inside a trace: every program compiled
    before that would compile once more (the tests' first decode with the kernel, say)."""
    try:
        importlib.import_module("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
    except ImportError:  # another JAX: nothing to load ahead
        pass


_load_interpreter()

# Keys a program reads per block: up to PREFIX_BLOCK of the prefix (scores [K x G, block]) and
# OWN_KEYS of the own segment, own_block = OWN_KEYS // K slots of each row's cache (scores
# [K x G, K x own_block]); a product's sides at least MIN_BLOCK keys (Triton's). Sized without a
# GPU to tune on: compiled for an H100 at the GPU bench's shapes (K = 8, G = 4, head size 64,
# bf16), a program takes 44 KB of shared memory (XLA's thunk sequence) and spills no registers
# (the PTX), so the 256 programs of 32 inputs x 8 KV heads are resident at once on 132 SMs of
# 228 KB. A program's queries (K x G rows of the head size, G rounded up to a power of two) are
# at most MAX_QUERY_ELEMENTS, and heads at most MAX_HEAD_DIM. The program's running output is
# that many fp32 values over its 128 threads (num_warps 4): 64 registers each at the bound.
# Compiled for an H100 (deviceless, tools/kernel_shape_sweep.py, 2026-12-06), every shape of a
# sweep within the bounds fits in shared memory (K 1 to 64 x G 1 to 16 x head sizes 64, 128,
# 256, and K 128 to 512 at head sizes 16 and 64; the bounds' corners for an A100 too); past
# them, head size 256 asks for 262-328 KB (the H100 has 227 KB a program), and smaller heads
# compile at first (K = 16, G = 8, head 128) with twice the registers a thread.
PREFIX_BLOCK = 64
OWN_KEYS = 128
MIN_BLOCK = 16
MAX_QUERY_ELEMENTS = 8192
MAX_HEAD_DIM = 256
# A step of inputs x KV heads programs under this splits each one's keys over several programs
# (:func:`splits`), so that a step of few inputs (one request of K critiques: 8 programs for 8
# KV heads) still spreads its reads over the card's SMs: about one program an SM of an H100
# (132). A program keeps two blocks of keys and values in flight (32-64 KB), so by Little's law
# (3.35 TB/s x ~1 us) some 40-80 programs keep HBM busy; 128 leaves a margin. The parts'
# softmaxes are joined by XLA afterwards (a few small operations a layer), which a step of
# enough programs does without. A guess made without a card: sample_8_pallas measures it.
TARGET_PROGRAMS = 128
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # as layers.gqa_attention's


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def blocks(rows_per_input: int, prefix_len: int, own_len: int) -> tuple[int, int]:
    """(prefix block, own block): the keys of the prefix, and the slots of each row's own cache,
    that a program reads at once."""
    own = min(max(1, OWN_KEYS // max(rows_per_input, 1)), _floor_pow2(own_len))
    return min(PREFIX_BLOCK, _floor_pow2(prefix_len)), own


REQUIREMENTS = (f"K a power of two, a power-of-two head size of 16 to {MAX_HEAD_DIM}, K x G x "
                f"head size <= {MAX_QUERY_ELEMENTS} (G rounded up to a power of two) and "
                f"segments of at least {MIN_BLOCK} slots (K x slots for the own caches)")


def on_nvidia_gpu() -> bool:
    """Whether JAX's default backend is an NVIDIA GPU (CUDA), where ``decode_attention_impl``
    ``auto`` takes the kernel."""
    if jax.default_backend() != "gpu":
        return False
    version = getattr(jax.devices()[0].client, "platform_version", "")
    return "rocm" not in str(version).lower()


def padded_group(group: int) -> int:
    """The query heads per KV head the kernel computes: ``group`` up to a power of two (the
    extra heads' queries are zeros, their outputs dropped), so a model whose KV heads serve 3
    or 7 query heads (SmolLM2, Qwen2.5-7B) takes it at a third or a seventh more arithmetic on
    a step bound by reading keys and values."""
    return 1 << (group - 1).bit_length() if group >= 1 else 0


def supported(rows_per_input: int, group: int, head_dim: int, prefix_len: int,
              own_len: int) -> bool:
    """Whether :func:`decode_attention` takes a step whose inputs have ``rows_per_input`` rows
    (K), whose KV heads have ``group`` query heads each of ``head_dim`` features, over a prefix
    of ``prefix_len`` slots and own caches of ``own_len``."""
    if not (_pow2(rows_per_input) and group >= 1 and _pow2(head_dim)
            and 16 <= head_dim <= MAX_HEAD_DIM):
        return False
    if rows_per_input * padded_group(group) * head_dim > MAX_QUERY_ELEMENTS:
        return False
    prefix_block, own_block = blocks(rows_per_input, prefix_len, own_len)
    return min(prefix_block, rows_per_input * own_block) >= MIN_BLOCK


def splits(programs: int, prefix_len: int) -> int:
    """Into how many parts each (input, KV head)'s keys are split, each part its own program,
    so that a step of few inputs still has about TARGET_PROGRAMS programs (``programs``: inputs
    x KV heads on the device): a power of two, at most the prefix's blocks (each part takes one
    or more of them and a share of the own cache's)."""
    prefix_blocks = -(-prefix_len // min(PREFIX_BLOCK, _floor_pow2(prefix_len)))
    parts = 1
    while programs * parts < TARGET_PROGRAMS and parts * 2 <= prefix_blocks:
        parts *= 2
    return parts


def _kernel(q_ref, pk_ref, pv_ref, pm_ref, k_ref, v_ref, m_ref, *out_refs, rows: int,
            group: int, head_dim: int, prefix_len: int, own_len: int, prefix_block: int,
            own_block: int, scale: float, parts: int):
    """One program: input ``program_id(0)``, KV head ``program_id(1)``, and with ``parts`` > 1
    part ``program_id(2)`` of their keys: its share of each segment's blocks, written
    unnormalised with its running maximum and sum for :func:`_combine`."""
    n, h = pl.program_id(0), pl.program_id(1)
    m = rows * group
    q = q_ref[pl.ds(n * rows, rows), h, :, :].reshape(m, head_dim)

    def step(scores, values, state):
        top, total, acc = state
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        alpha = jnp.exp(top - new_top)
        p = jnp.exp(scores - new_top[:, None])
        total = total * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jax.lax.dot_general(
            p.astype(values.dtype), values, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32)
        return new_top, total, acc

    # Block i of a segment covers keys [i * block, (i + 1) * block); the last one starts at
    # len - block instead, so no read passes the end, and skips the keys the one before took.
    def prefix_step(i, state):
        bp = prefix_block
        start = jnp.minimum(i * bp, prefix_len - bp)
        inside = start + jax.lax.broadcasted_iota(jnp.int32, (1, bp), 1) >= i * bp
        keys = pk_ref[n, h, pl.ds(start, bp), :]
        values = pv_ref[n, h, pl.ds(start, bp), :]
        valid = pm_ref[pl.ds(n * rows, rows), pl.ds(start, bp)] != 0  # [K, bp]
        valid = jnp.broadcast_to(valid[:, None, :], (rows, group, bp)).reshape(m, bp)
        scores = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
        scores = jnp.where(valid, scores, _MASK_VALUE)
        scores = jnp.where(inside, scores, -jnp.inf)
        return step(scores, values, state)

    def own_step(i, state):
        bo = own_block
        start = jnp.minimum(i * bo, own_len - bo)
        width = rows * bo
        slot = start + jax.lax.broadcasted_iota(jnp.int32, (rows, bo), 1)
        inside = (slot >= i * bo).reshape(1, width)
        rows_at = pl.ds(n * rows, rows)
        keys = k_ref[rows_at, h, pl.ds(start, bo), :].reshape(width, head_dim)
        values = v_ref[rows_at, h, pl.ds(start, bo), :].reshape(width, head_dim)
        valid = (m_ref[rows_at, pl.ds(start, bo)] != 0).reshape(1, width)
        # Query row r * G + g reads only row r's keys, columns r * bo ... (r + 1) * bo - 1.
        own = (jax.lax.broadcasted_iota(jnp.int32, (m, width), 0) // group
               == jax.lax.broadcasted_iota(jnp.int32, (m, width), 1) // bo)
        scores = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
        scores = jnp.where(valid, scores, _MASK_VALUE)
        scores = jnp.where(own & inside, scores, -jnp.inf)
        return step(scores, values, state)

    state = (jnp.full((m,), -jnp.inf, jnp.float32), jnp.zeros((m,), jnp.float32),
             jnp.zeros((m, head_dim), jnp.float32))
    prefix_blocks, own_blocks = pl.cdiv(prefix_len, prefix_block), pl.cdiv(own_len, own_block)
    rows_at = pl.ds(n * rows, rows)
    if parts == 1:
        state = jax.lax.fori_loop(0, prefix_blocks, prefix_step, state)
        state = jax.lax.fori_loop(0, own_blocks, own_step, state)
        _, total, acc = state
        (o_ref,) = out_refs
        out = (acc / total[:, None]).astype(o_ref.dtype)
        o_ref[rows_at, h, :, :] = out.reshape(rows, group, head_dim)
        return
    # Part j takes blocks [j * count // parts, (j + 1) * count // parts) of each segment (with
    # splits()'s parts, at least one of the prefix's). A part given no block keeps maximum -inf
    # and sum 0: it weighs nothing when the parts are joined.
    j = pl.program_id(2)
    state = jax.lax.fori_loop(j * prefix_blocks // parts, (j + 1) * prefix_blocks // parts,
                              prefix_step, state)
    state = jax.lax.fori_loop(j * own_blocks // parts, (j + 1) * own_blocks // parts,
                              own_step, state)
    top, total, acc = state
    acc_ref, top_ref, total_ref = out_refs
    acc_ref[j, rows_at, h, :, :] = acc.reshape(rows, group, head_dim)
    top_ref[j, rows_at, h, :] = top.reshape(rows, group)
    total_ref[j, rows_at, h, :] = total.reshape(rows, group)


def _combine(acc, top, total):
    """The parts' outputs ([parts, B, KV, G, D] unnormalised, their maxima and sums [parts, B,
    KV, G]) as one softmax over all the keys: [B, KV, G, D]."""
    weight = jnp.exp(top - jnp.max(top, axis=0))
    return (jnp.sum(weight[..., None] * acc, axis=0)
            / jnp.sum(weight * total, axis=0)[..., None])


def decode_attention(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array,
                     mask_bts: jax.Array, prefix, *, interpret: Optional[bool] = None,
                     parts: Optional[int] = None, num_warps: int = 4,
                     num_stages: int = 2) -> jax.Array:
    """:func:`cloud_jax.model.layers.gqa_attention` of one new token per row (T = 1) over the
    shared prefix ``(k [N, KV, P, D], v [N, KV, P, D], mask [B, 1, P])`` and the rows' own
    caches ``k, v [B, KV, S, D]`` (keys not transposed) under ``mask [B, 1, S]``, in one Pallas
    call (and, where ``parts`` > 1, a few operations that join the parts' softmaxes). Returns
    [B, 1, H, D] in ``v``'s dtype. Only for shapes :func:`supported` takes. ``parts``: into how
    many programs each (input, KV head)'s keys are split (default :func:`splits`)."""
    pk, pv, pmask_btp = prefix
    b, t, h, d = q_bthd.shape
    kv, s = k_bksd.shape[1], k_bksd.shape[2]
    n, p = pk.shape[0], pk.shape[2]
    rows, group = b // n, h // kv
    if t != 1 or not supported(rows, group, d, p, s):
        raise ValueError(f"decode_attention takes one new token per row and {REQUIREMENTS}; "
                         f"got T={t}, K={rows}, G={group}, head size {d}, prefix {p}, "
                         f"own cache {s}")
    gp = padded_group(group)
    prefix_block, own_block = blocks(rows, p, s)
    parts = splits(n * kv, p) if parts is None else parts
    kernel = functools.partial(_kernel, rows=rows, group=gp, head_dim=d, prefix_len=p,
                               own_len=s, prefix_block=prefix_block, own_block=own_block,
                               scale=1.0 / math.sqrt(d), parts=parts)
    dtype = v_bksd.dtype
    q = q_bthd.reshape(b, kv, group, d).astype(dtype)
    if gp != group:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, gp - group), (0, 0)))
    operands = (q, pk.astype(dtype),
                pv.astype(dtype), pmask_btp[:, 0].astype(jnp.int8), k_bksd, v_bksd,
                mask_bts[:, 0].astype(jnp.int8))

    def call(*operands, interpret: bool):
        kwargs = {}
        if not interpret:
            from jax.experimental.pallas import triton as plgpu

            kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps,
                                                             num_stages=num_stages)
        if parts == 1:
            grid, out_shape = (n, kv), jax.ShapeDtypeStruct((b, kv, gp, d), dtype)
        else:
            grid = (n, kv, parts)
            out_shape = (jax.ShapeDtypeStruct((parts, b, kv, gp, d), jnp.float32),
                         jax.ShapeDtypeStruct((parts, b, kv, gp), jnp.float32),
                         jax.ShapeDtypeStruct((parts, b, kv, gp), jnp.float32))
        out = pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret,
                             **kwargs)(*operands)
        return out if parts == 1 else _combine(*out).astype(dtype)

    if interpret is None and jax.default_backend() == "gpu":
        out = call(*operands, interpret=False)
    elif interpret is None:
        # Triton where the program is compiled for an NVIDIA GPU from a host without one
        # (`python -m cloud_jax aot --topology h100`), the interpreter elsewhere.
        out = jax.lax.platform_dependent(
            *operands, cuda=functools.partial(call, interpret=False),
            default=functools.partial(call, interpret=True))
    else:
        out = call(*operands, interpret=interpret)
    return out[:, :, :group].reshape(b, 1, h, d)
