"""Building blocks of a Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cloud_jax.model import gpu_kernels
from cloud_jax.model.cache import LayerKV, MaskInfo
from cloud_jax.model.config import ModelConfig, RopeScalingConfig
from cloud_jax.sharding import axes_size

# Finite rather than -inf so a row with no visible key (a pad query) gives a uniform, finite
# softmax instead of NaN that could leak into gradients.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param_with_axes(init, axes: tuple[Optional[str], ...]):
    return nn.with_logical_partitioning(init, axes)


def dense_init(stddev: float = 0.02):
    return nn.initializers.normal(stddev=stddev)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        scale = self.param("scale", param_with_axes(nn.initializers.ones, ("norm",)),
                           (x_btd.shape[-1],), self.param_dtype)
        return rms_norm(x_btd, scale, self.eps, self.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype, axis: int = -1) -> jax.Array:
    """RMS normalisation of ``x`` over ``axis`` (its feature axis, ``scale``'s length)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    shape = [1] * x.ndim
    shape[axis] = scale.shape[0]
    # Same rounding order as the Llama reference: normalise in fp32, cast, then scale.
    return normed.astype(dtype) * scale.astype(dtype).reshape(shape)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (fp32), with optional Llama-3.1 or linear scaling."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling.type == "linear":
        inv_freq = inv_freq / np.float32(scaling.factor)
    elif scaling.type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions_bt: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, 1, head_dim] fp32 of the rotary embedding at ``positions_bt``."""
    freqs_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray,
               tables: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """Rotary embedding in the split-halves layout used by Hugging Face Llama checkpoints;
    ``tables``: :func:`rope_tables` of the positions, when computed already."""
    cos, sin = rope_tables(positions_bt, inv_freq) if tables is None else tables
    cos, sin = cos.astype(x_bthd.dtype), sin.astype(x_bthd.dtype)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos + rotated * sin


def attention_mask(q_slot_t: jax.Array, k_slot_s: jax.Array, k_valid_bs: jax.Array,
                   q_pos_bt: jax.Array, k_pos_bs: jax.Array,
                   sliding_window: Optional[int]) -> jax.Array:
    """Boolean [B, T, S]: causal by slot, only valid keys, optionally within a position window."""
    causal_ts = k_slot_s[None, :] <= q_slot_t[:, None]
    mask = causal_ts[None] & k_valid_bs[:, None, :].astype(bool)
    if sliding_window is not None:
        mask = mask & (q_pos_bt[:, :, None] - k_pos_bs[:, None, :] < sliding_window)
    return mask


def gqa_attention(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array,
                  mask_bts: jax.Array, prefix=None, keys_transposed: bool = False) -> jax.Array:
    """Grouped-query attention; logits and softmax in fp32. Returns [B, T, H, D].

    ``prefix`` is an optional shared segment ``(k [G, KV, P, D], v [G, KV, P, D], mask [B, T, P])``
    read by groups of B // G consecutive rows (the K samples of one input): each input's prompt is
    cached, and read from memory, once instead of once per sample. Its keys precede every key of
    ``k_bksd`` and share one softmax with them. With ``keys_transposed`` every key array (the
    prefix's too) is stored [.., D, S] instead of [.., S, D].
    """
    b, t, h, d = q_bthd.shape
    kv = k_bksd.shape[1]
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    scale = np.float32(1.0 / math.sqrt(d))
    if prefix is not None:
        out = _attention_with_prefix(q, k_bksd, v_bksd, mask_bts, prefix, scale, keys_transposed)
        return out.astype(v_bksd.dtype).reshape(b, t, h, d)
    keys = "bkds" if keys_transposed else "bksd"
    scores = jnp.einsum(f"btkgd,{keys}->bkgts", q, k_bksd,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bksd.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_bksd)
    return out.reshape(b, t, h, d)


def fused_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array,
                    mask_bts: jax.Array, implementation: Optional[str]) -> jax.Array:
    """:func:`gqa_attention` without a prefix, through ``jax.nn.dot_product_attention``: the same
    keys, mask and scale, grouped query heads taken by the library. ``implementation="cudnn"`` is
    cuDNN's flash attention (bf16/fp16 on NVIDIA GPUs), which never holds the [T, S] scores in
    device memory; ``"xla"`` is the library's XLA version of the same call, which runs anywhere
    (the tests compare it with :func:`gqa_attention`). Returns [B, T, H, D]."""
    dtype = v_bskd.dtype
    return jax.nn.dot_product_attention(q_bthd.astype(dtype), k_bskd.astype(dtype), v_bskd,
                                        mask=mask_bts[:, None], implementation=implementation)


def _attention_with_prefix(q_btkgd, k_bksd, v_bksd, mask_bts, prefix, scale, keys_transposed):
    """The prefix branch of :func:`gqa_attention`: [B, T, KV, G, D] fp32 from q [B, T, KV, G, D].

    Each product is one batched matmul per (input, KV head) whose rows are all the queries that
    read those keys (every row of the group, step and query head of the KV head), and the two
    segments share one softmax through a common maximum and denominator rather than a
    concatenation. Kept on every backend: fewer, larger matmuls and no concatenated score array
    (measured on CPU in docs/BENCHMARKS.md, "Backend-specific choices").
    """
    pk, pv, pmask_btp = prefix
    b, t, kv, g, d = q_btkgd.shape
    groups = pk.shape[0]
    r = b // groups
    # Prefix scores [N, KV, R*T*G, P]: the rows of a group and their query heads share the keys.
    qp = jnp.transpose(q_btkgd.reshape(groups, r, t, kv, g, d), (0, 3, 1, 2, 4, 5))
    pkeys, keys = ("nkdp", "bkds") if keys_transposed else ("nkpd", "bksd")
    pscores = jnp.einsum(f"nkqd,{pkeys}->nkqp", qp.reshape(groups, kv, r * t * g, d),
                         pk.astype(q_btkgd.dtype), preferred_element_type=jnp.float32) * scale
    pmask = pmask_btp.reshape(groups, r, t, -1)[:, None, :, :, None, :]
    pscores = jnp.where(pmask, pscores.reshape(groups, kv, r, t, g, -1), _MASK_VALUE)
    # Own-segment scores [B, KV, T, G, S].
    qo = jnp.transpose(q_btkgd, (0, 2, 1, 3, 4)).reshape(b, kv, t * g, d)
    scores = jnp.einsum(f"bkqd,{keys}->bkqs", qo, k_bksd,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, :, None, :], scores.reshape(b, kv, t, g, -1),
                       _MASK_VALUE)

    def to_rows(x_nkrtg):  # [N, KV, R, T, G, ...] -> [B, KV, T, G, ...]
        return jnp.swapaxes(x_nkrtg, 1, 2).reshape((b, kv, t, g) + x_nkrtg.shape[5:])

    def to_groups(x_bktg):  # the inverse
        return jnp.swapaxes(x_bktg.reshape((groups, r, kv, t, g) + x_bktg.shape[4:]), 1, 2)

    top = jnp.maximum(to_rows(jnp.max(pscores, axis=-1)), jnp.max(scores, axis=-1))
    pexp = jnp.exp(pscores - to_groups(top)[..., None])
    exp = jnp.exp(scores - top[..., None])
    denom = to_rows(jnp.sum(pexp, axis=-1)) + jnp.sum(exp, axis=-1)
    pout = jnp.einsum("nkqp,nkpd->nkqd", pexp.reshape(groups, kv, r * t * g, -1).astype(pv.dtype),
                      pv, preferred_element_type=jnp.float32)
    out = jnp.einsum("bkqs,bksd->bkqd", exp.reshape(b, kv, t * g, -1).astype(v_bksd.dtype),
                     v_bksd, preferred_element_type=jnp.float32)
    out = to_rows(pout.reshape(groups, kv, r, t, g, d)) + out.reshape(b, kv, t, g, d)
    return jnp.transpose(out / denom[..., None], (0, 2, 1, 3, 4))


def attention_masks(cfg: ModelConfig, positions_bt: jax.Array, mask_info: MaskInfo,
                    with_prefix: bool) -> tuple[jax.Array, Optional[jax.Array]]:
    """The boolean masks [B, T, S] over the cache's keys and, ``with_prefix``, [B, T, P] over the
    shared prefix's keys (None without) of queries at ``positions_bt``."""
    mask = attention_mask(mask_info.q_slot, mask_info.k_slot, mask_info.k_valid,
                          positions_bt, mask_info.k_pos, cfg.sliding_window)
    if not with_prefix:
        return mask, None
    # Every prefix slot precedes the query: no causal term, only validity and window.
    b, t = positions_bt.shape
    pmask = jnp.broadcast_to(mask_info.prefix_valid[:, None, :].astype(bool),
                             (b, t, mask_info.prefix_valid.shape[1]))
    if cfg.sliding_window is not None:
        pmask = pmask & (positions_bt[:, :, None] - mask_info.prefix_pos[:, None, :]
                         < cfg.sliding_window)
    return mask, pmask


def attend(cfg: ModelConfig, q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
           positions_bt: jax.Array, mask_info: MaskInfo, layer_cache: Optional[LayerKV] = None,
           prefix_kv: Optional[LayerKV] = None, rope: Optional[tuple[jax.Array, jax.Array]] = None,
           attention: Optional[Callable[..., jax.Array]] = None,
           ) -> tuple[jax.Array, Optional[LayerKV]]:
    """Attention after the q/k/v projections: RoPE, the cache write (when a cache is given), the
    mask and the attention over the cache's keys and the shared prefix's. Returns the output
    [B, T, H, D] and the layer's updated cache (None without one). ``rope``: the positions'
    :func:`rope_tables`, when the caller computes them once for every layer. ``attention``: a
    function with :func:`gqa_attention`'s arguments and values (the CPU decode kernel,
    :mod:`cloud_jax.model.cpu_kernels`) used in its place."""
    dtype = dtype_of(cfg.dtype)
    inv_freq = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    q = apply_rope(q_bthd, positions_bt, inv_freq, rope)
    k = apply_rope(k_bthd, positions_bt, inv_freq, rope)
    q = nn.with_logical_constraint(
        q, ("activation_batch", "activation_length", "activation_heads", None))
    k_bksd = jnp.swapaxes(k, 1, 2)
    v_bksd = jnp.swapaxes(v_bthd, 1, 2)
    new_cache = None
    keys_transposed = layer_cache is not None and layer_cache.keys_transposed
    if prefix_kv is not None and prefix_kv.keys_transposed != keys_transposed:
        raise ValueError("the prefix and the cache must store their keys the same way")
    if layer_cache is not None:
        start = mask_info.cache_end
        if keys_transposed:
            k_new, k_at = jnp.swapaxes(k_bksd, 2, 3), (0, 0, 0, start)
        else:
            k_new, k_at = k_bksd, (0, 0, start, 0)
        new_cache = layer_cache.replace(
            k=jax.lax.dynamic_update_slice(layer_cache.k, k_new.astype(layer_cache.k.dtype),
                                           k_at),
            v=jax.lax.dynamic_update_slice(
                layer_cache.v, v_bksd.astype(layer_cache.v.dtype), (0, 0, start, 0)),
        ).constrain()
        k_bksd, v_bksd = new_cache.k, new_cache.v
    mask, pmask = attention_masks(cfg, positions_bt, mask_info, prefix_kv is not None)
    prefix = None if prefix_kv is None else (prefix_kv.k, prefix_kv.v, pmask)
    k_bksd, v_bksd = k_bksd.astype(dtype), v_bksd.astype(dtype)
    block = cfg.causal_block_size
    t = q.shape[1]
    if layer_cache is None and prefix is None and cfg.attention_impl == "cudnn":
        out = fused_attention(q, k, v_bthd.astype(dtype), mask, "cudnn")
    elif layer_cache is None and 0 < block < t:
        # Without a cache key slot j is query slot j, so query block [s, e) needs keys [0, e).
        out = jnp.concatenate([
            gqa_attention(q[:, s:s + block], k_bksd[:, :, :s + block],
                          v_bksd[:, :, :s + block], mask[:, s:s + block, :s + block])
            for s in range(0, t, block)], axis=1)
    elif (attention is None and cfg.decode_attention_impl != "xla"
          and (kernel := _pallas_decode(q, k_bksd, prefix, keys_transposed,
                                        cfg.decode_attention_impl)) is not None):
        # The kernel is Triton's: "pallas" keeps XLA's attention in a program compiled for a TPU
        # (off a GPU, the kernel runs through Pallas's interpreter); "auto" everywhere but on an
        # NVIDIA GPU.
        branches = (dict(tpu=gqa_attention, default=kernel)
                    if cfg.decode_attention_impl == "pallas"
                    else dict(cuda=kernel, default=gqa_attention))
        out = jax.lax.platform_dependent(q, k_bksd, v_bksd, mask, prefix, **branches)
    else:
        out = (attention or gqa_attention)(q, k_bksd, v_bksd, mask, prefix, keys_transposed)
    return out, new_cache


_PALLAS_DECLINED: set = set()


def _pallas_decode(q_bthd, k_bksd, prefix, keys_transposed: bool,
                   impl: str = "pallas") -> Optional[Callable]:
    """The attention a decode step takes for ``model.decode_attention_impl`` ``pallas`` or
    ``auto``: :func:`gpu_kernels.decode_attention` (on a mesh, one call per device over its
    shard, :func:`_kernel_on_mesh`) for one new token per row over a shared prefix, at a shape
    the kernel takes; None to keep XLA's, with a warning (once per case) where ``pallas`` asked
    for the kernel at a decode step it does not take (``auto`` keeps XLA's without one)."""
    b, t, h, d = q_bthd.shape
    if prefix is None or t != 1:
        return None  # prefill and scoring (no shared prefix, many tokens) stay on XLA
    kv, s = k_bksd.shape[1], k_bksd.shape[-1 if keys_transposed else 2]
    n = prefix[0].shape[0]
    rows, p = b // n, prefix[0].shape[-1 if keys_transposed else 2]
    kernel = gpu_kernels.decode_attention
    if impl == "auto":  # only where the program is compiled for an NVIDIA GPU: Triton's code
        kernel = functools.partial(kernel, interpret=False)
    reason = None
    if keys_transposed:
        reason = "reads keys stored [.., D, S], and this cache stores them transposed"
    elif not gpu_kernels.supported(rows, h // kv, d, p, s):
        reason = (f"does not take K={rows} rows per input x G={h // kv} query heads per KV head, "
                  f"head size {d}, prefix {p}, own cache {s} (it needs "
                  f"{gpu_kernels.REQUIREMENTS})")
    elif jax.sharding.get_abstract_mesh().size > 1:  # size 0 outside a mesh
        kernel, reason = _kernel_on_mesh(kernel, n, kv)
    if reason is None:
        return kernel
    if impl == "pallas" and reason not in _PALLAS_DECLINED:
        _PALLAS_DECLINED.add(reason)
        warnings.warn(f"model.decode_attention_impl=pallas: the kernel {reason}; this decode "
                      "uses XLA's attention", stacklevel=2)
    return None


def _kernel_on_mesh(kernel: Callable, inputs: int,
                    kv_heads: int) -> tuple[Optional[Callable], Optional[str]]:
    """(``kernel`` over a mesh, None), or (None, why not). A Pallas call is not partitioned (XLA
    would gather the whole cache onto every device), so the kernel runs under ``shard_map``: each
    device attends its own inputs' rows (the cache's batch axes, ``cache_batch``) and its own KV
    heads (``cache_kv_heads``) with their query heads, as the logical rules in force lay the
    cache out. The inputs must split evenly over the batch axes and the KV heads over the head
    axes: a shard then holds whole inputs (all K rows of each) and whole groups of query heads,
    so the kernel sees the shapes it would on one device, fewer of them."""
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, head_axes = nn.logical_to_mesh_axes(("cache_batch", "cache_kv_heads"))
    for count, what, axes in ((inputs, "input(s)", batch_axes),
                              (kv_heads, "KV head(s)", head_axes)):
        names, shards = axes_size(mesh, axes)
        if count % shards:
            return None, (f"splits a decode's inputs and KV heads evenly over the mesh, and this "
                          f"decode's {count} {what} do not split over the {shards} shards of "
                          f"mesh axes {' x '.join(names)}")
    q = P(batch_axes, None, head_axes, None)
    cache = P(batch_axes, head_axes, None, None)
    mask = P(batch_axes, None, None)
    return jax.shard_map(kernel, mesh=mesh,
                         in_specs=(q, cache, cache, mask, (cache, cache, mask)), out_specs=q,
                         check_vma=False), None


class HeadProjection(nn.Module):
    """A linear map whose kernel keeps its head axes ([D, H, Dh] or [H, Dh, D]).

    Written out instead of ``nn.DenseGeneral`` because that initialises a flattened kernel, which
    breaks per-axis logical sharding annotations.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    in_dims: int = 1

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.in_dims:]
        kernel = self.param("kernel", param_with_axes(dense_init(), self.axes),
                            in_shape + self.features, self.param_dtype)
        # Rows flattened to one axis, so the weight gradient contracts a single axis: free on
        # every backend, faster on CPU (docs/BENCHMARKS.md, "Backend-specific choices").
        lead = x.shape[:-self.in_dims]
        x = x.reshape((-1,) + in_shape)
        contract = tuple(range(1, 1 + self.in_dims))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                ((contract, tuple(range(self.in_dims))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", param_with_axes(nn.initializers.zeros,
                                                      self.axes[self.in_dims:]),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y.reshape(lead + self.features)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_info: MaskInfo,
                 layer_cache: Optional[LayerKV] = None, prefix_kv: Optional[LayerKV] = None):
        """Self-attention over the cache's keys (when given) and the shared prefix's (when
        given); returns the output and the layer's updated cache (None without one)."""
        cfg = self.cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        hd = cfg.resolved_head_dim

        def proj(name, heads, head_axis):
            return HeadProjection((heads, hd), ("embed", head_axis, "head_dim"),
                                  cfg.attention_bias, dtype, pdtype, name=name)

        q = proj("q_proj", cfg.num_heads, "heads")(x_btd)
        k = proj("k_proj", cfg.num_kv_heads, "kv_heads")(x_btd)
        v = proj("v_proj", cfg.num_kv_heads, "kv_heads")(x_btd)
        out, new_cache = attend(cfg, q, k, v, positions_bt, mask_info, layer_cache, prefix_kv)
        out = HeadProjection((cfg.hidden_size,), ("heads", "head_dim", "embed"), False, dtype,
                             pdtype, in_dims=2, name="o_proj")(out)
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)

        def dense(name, features, axes):
            return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=pdtype, name=name,
                            kernel_init=param_with_axes(dense_init(), axes))

        # Rows flattened to one axis, as in HeadProjection.
        x_nd = x_btd.reshape(-1, x_btd.shape[-1])
        gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x_nd)
        up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x_nd)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_mlp"))
        out = dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(h)
        return out.reshape(x_btd.shape[:-1] + (cfg.hidden_size,))
