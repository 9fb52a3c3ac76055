"""One decode step of the samplers: next-token logits and rewards of a few rows over a KV cache.

    layout = decode_layout(cfg, mesh)                     # "standard" or "feature_major"
    weights = prepare_decode_weights(params, cfg) if layout == "feature_major" else None
    logits_nv, rewards_n, cache = decode_step(params, weights, cfg, fed_n, live_n, cache)

The same computation in two layouts:

- ``standard``: :class:`CLoudModel`'s own forward (``hidden_states``, ``step_logits``,
  ``reward``) over the parameters as stored. Every backend, any mesh.
- ``feature_major``: a decode-only forward over weights prepared once per decode
  (:func:`prepare_decode_weights`): every weight matrix stored ``[out, in]``, q/k/v and gate/up
  each joined into one matrix, activations ``[features, rows]``, so each product is
  ``W[out, in] . x[in, rows]``. XLA's CPU backend runs a few-row product about 1.2-1.5x faster in
  that form than ``x[rows, in] . W[in, out]`` (docs/BENCHMARKS.md, "Backend-specific choices").
  It costs a second copy of the layer weights while decoding, so :func:`decode_layout` picks it on
  CPU only, on one device, and only when that copy is small against the machine's memory.

Both layouts share RoPE, the cache write, the mask and the attention (:func:`layers.attend`), the
RMSNorm and the reward head; the tests hold them equal. Where the CPU kernels are built
(:mod:`cloud_jax.model.cpu_kernels`), the feature-major one takes them for fp32: the attention of
one new token per row in one call a layer (with the rotary embedding and the cache write when the
loop gives a ``rope_table``), and each weight product with the RMS norm before it, the gated unit
or the residual add in one call of the kernel's matmul; else it computes as the standard one does.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cloud_jax.model import cpu_kernels
from cloud_jax.model.cache import KVCache
from cloud_jax.model.config import ModelConfig
from cloud_jax.model.layers import (attend, attention_masks, dtype_of, rms_norm, rope_inv_freq,
                                   rope_tables)
from cloud_jax.model.transformer import CLoudModel, token_positions, unattended_as_zero

__all__ = ["DecodeWeights", "LAYOUTS", "decode_layout", "decode_step", "prepare_decode_weights",
           "prepare_decode_weights_jit", "prepared_bytes"]

LAYOUTS = ("standard", "feature_major")

# The feature-major copy of the weights may take at most this share of the machine's memory.
_MAX_MEMORY_SHARE = 0.125


Matrix = tuple[jax.Array, ...]  # a [out, in] matrix as consecutive blocks of its rows


@flax.struct.dataclass
class DecodeLayerWeights:
    """One decoder layer's weights in the compute dtype, each matrix [out, in] in row blocks."""

    input_norm: jax.Array  # [D]
    qkv: Matrix  # [(H + 2 KV) * hd, D]: q, then k, then v
    qkv_bias: Optional[jax.Array]  # [(H + 2 KV) * hd], with attention_bias
    o: Matrix  # [D, H * hd]
    post_attn_norm: jax.Array  # [D]
    gate_up: Matrix  # [2 F, D]: gate, then up
    down: Matrix  # [D, F]


@flax.struct.dataclass
class DecodeWeights:
    """The weights of the feature-major decode step (:func:`prepare_decode_weights`)."""

    embedding: jax.Array  # [V, D], as stored: the token lookup
    lm_head: Matrix  # [V, D]: the embedding when tied, else the LM head transposed
    layers: tuple[DecodeLayerWeights, ...]
    final_norm: jax.Array  # [D]


def prepare_decode_weights(params: Any, cfg: ModelConfig,
                           blocks: Optional[int] = None) -> DecodeWeights:
    """The feature-major layout of ``params`` (unrolled layers): a new copy of every layer
    matrix (and of the LM head), transposed to [out, in], cast to ``cfg.dtype`` and cut into
    ``blocks`` blocks of rows. The blocks of a product are independent operations, which XLA's CPU
    runtime runs at once, one per core, instead of splitting one small product over its threads.
    ``blocks`` None: 1 where the CPU matmul kernel takes the products (it splits each over the
    threads itself), else 2. Traceable: inside a jitted decode it is computed once, before the
    loop."""
    if cfg.scan_layers:
        raise ValueError("the decode step needs unrolled layers: convert the params with "
                         "cloud_jax.model.unstack_layers and use scan_layers=False")
    if blocks is None:
        blocks = 1 if _kernel_matmul(cfg) else 2
    if blocks < 1:
        raise ValueError(f"blocks={blocks}: must be >= 1")
    dtype = dtype_of(cfg.dtype)
    d = cfg.hidden_size

    def cut(w_oi: jax.Array) -> Matrix:
        rows = w_oi.shape[0]
        edges = [rows * j // blocks for j in range(blocks + 1)]
        return tuple(w_oi[a:b].astype(dtype) for a, b in zip(edges, edges[1:]) if b > a)

    def out_in(*kernels_in_out):  # [in, ...] kernels -> one [sum(out), in] matrix
        joined = jnp.concatenate([k.reshape(k.shape[0], -1) for k in kernels_in_out], axis=1)
        return cut(jnp.transpose(joined))

    layers = []
    for i in range(cfg.num_layers):
        layer = params[f"layers_{i}"]
        attn, mlp = layer["attn"], layer["mlp"]
        bias = None
        if cfg.attention_bias:
            bias = jnp.concatenate([attn[n]["bias"].reshape(-1)
                                    for n in ("q_proj", "k_proj", "v_proj")]).astype(dtype)
        layers.append(DecodeLayerWeights(
            input_norm=layer["input_norm"]["scale"],
            qkv=out_in(attn["q_proj"]["kernel"], attn["k_proj"]["kernel"],
                       attn["v_proj"]["kernel"]),
            qkv_bias=bias,
            o=out_in(attn["o_proj"]["kernel"].reshape(-1, d)),
            post_attn_norm=layer["post_attn_norm"]["scale"],
            gate_up=out_in(mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]),
            down=out_in(mlp["down_proj"]["kernel"])))
    embedding = params["embed"]["embedding"]
    lm_head = cut(embedding if cfg.tie_word_embeddings else jnp.transpose(params["lm_head"]))
    return DecodeWeights(embedding=embedding, lm_head=lm_head, layers=tuple(layers),
                         final_norm=params["final_norm"]["scale"])


prepare_decode_weights_jit = jax.jit(prepare_decode_weights, static_argnames=("cfg", "blocks"))


def prepared_bytes(cfg: ModelConfig) -> int:
    """Bytes of the copy :func:`prepare_decode_weights` makes (the layer matrices and the LM
    head)."""
    count = cfg.num_layers * cfg.layer_matmul_params + cfg.hidden_size * cfg.vocab_size
    return count * jnp.dtype(cfg.dtype).itemsize


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def decode_layout(cfg: ModelConfig, mesh: Optional[Mesh] = None) -> str:
    """The layout a decode on this machine should take: ``feature_major`` on CPU, on one device,
    when the prepared copy of the weights takes at most 1/8 of the machine's memory; otherwise
    ``standard``."""
    if jax.default_backend() != "cpu" or (mesh is not None and mesh.size > 1):
        return "standard"
    memory = _memory_bytes()
    if memory is not None and prepared_bytes(cfg) > _MAX_MEMORY_SHARE * memory:
        return "standard"
    return "feature_major"


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"decode layout {layout!r}: expected one of {', '.join(LAYOUTS)}")


def _kernel_matmul(cfg: ModelConfig) -> bool:
    """Whether the feature-major step's weight products go to the CPU matmul kernel (fp32)."""
    return dtype_of(cfg.dtype) == jnp.float32 and cpu_kernels.active("matmul")


def _times(w_oi: Matrix, x_in: jax.Array, kernel: bool = False, **kwargs) -> jax.Array:
    """``W[out, in] . x[in, n]``, one product per block of W's rows; ``kernel`` (an fp32 step,
    :func:`_kernel_matmul`): through :func:`cpu_kernels.decode_matmul`."""
    parts = [cpu_kernels.decode_matmul(w, x_in) if kernel
             else jnp.einsum("oi,in->on", w, x_in.astype(w.dtype), **kwargs) for w in w_oi]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _product(w_oi: Matrix, x_in: jax.Array, cfg: ModelConfig, kernel: bool,
             norm: Optional[jax.Array] = None, gated: bool = False,
             residual: Optional[jax.Array] = None) -> jax.Array:
    """``residual + W . f(x)``, f the RMS norm with scale ``norm``, the gated unit
    ``silu(x[:f]) * x[f:]`` (``gated``) or nothing: in one kernel call where the matmul kernel
    runs (its one block of rows), else as XLA operations around :func:`_times`."""
    if kernel and len(w_oi) == 1:
        return cpu_kernels.decode_matmul(w_oi[0], x_in, norm=norm, eps=cfg.rms_norm_eps,
                                         gated=gated, residual=residual)
    if norm is not None:
        x_in = rms_norm(x_in, norm, cfg.rms_norm_eps, dtype_of(cfg.dtype), axis=0)
    elif gated:
        f = x_in.shape[0] // 2
        x_in = nn.silu(x_in[:f]) * x_in[f:]
    y = _times(w_oi, x_in, kernel)
    return y if residual is None else residual + y


def rope_table(cfg: ModelConfig, positions: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [positions, head_dim] fp32 of the rotary embedding at positions 0, 1, ...:
    computed once before a decode loop, read by :func:`decode_step` (``rope_table``)."""
    inv_freq = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_tables(jnp.arange(positions)[None, :], inv_freq)
    return cos[0, :, 0], sin[0, :, 0]


def feature_major_hidden(weights: DecodeWeights, cfg: ModelConfig, ids_bt: jax.Array,
                         mask_bt: jax.Array, cache: KVCache,
                         rope_table: Optional[tuple[jax.Array, jax.Array]] = None,
                         ) -> tuple[jax.Array, KVCache]:
    """Final-norm hidden states [D, B * T] (feature-major, rows batch-major) of new tokens over
    ``cache``, and the updated cache: the values of ``CLoudModel.hidden_states``.
    ``rope_table``: :func:`rope_table` of at least every position the tokens take."""
    b, t = ids_bt.shape
    dtype = dtype_of(cfg.dtype)
    hd, h, kv = cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
    eps = cfg.rms_norm_eps
    positions_bt, info = token_positions(mask_bt, None, cache)
    ids_bt = unattended_as_zero(ids_bt, mask_bt)
    x_dn = jnp.transpose(jnp.take(weights.embedding, ids_bt.reshape(-1), axis=0).astype(dtype))
    rope = None
    if rope_table is not None:
        # Rows of a table computed before the loop: XLA would otherwise recompute the sines and
        # cosines inside every fusion that applies them (three per layer).
        cos, sin = rope_table
        rope = (jnp.take(cos, positions_bt, axis=0)[:, :, None, :],
                jnp.take(sin, positions_bt, axis=0)[:, :, None, :])

    def heads(part_fn, count):  # [count * hd, B * T] -> [B, T, count, hd]
        return jnp.transpose(part_fn.reshape(count, hd, b, t), (2, 3, 0, 1))

    # The CPU kernels where they are built (cpu_kernels.py): one call a layer for the attention,
    # one a product for the fp32 weight matmuls, each with the RMS norm before it, the gated
    # unit or the residual add inside the call.
    attention = cpu_kernels.decode_attention if cpu_kernels.active("attention") else None
    kernel = _kernel_matmul(cfg)
    # The attention kernel's fused form: one new token per row over a shared prefix and caches
    # with transposed keys, fp32, the rotary embedding from the loop's table.
    fused = (attention is not None and t == 1 and rope is not None and cache.prefix is not None
             and dtype == jnp.float32 and b % cache.prefix.layers[0].k.shape[0] == 0
             and all(layer.keys_transposed and layer.k.dtype == jnp.float32
                     and layer.v.dtype == jnp.float32 for layer in cache.layers))
    if fused:
        mask, pmask = attention_masks(cfg, positions_bt, info, True)
    new_layers = []
    for i, w in enumerate(weights.layers):
        with jax.named_scope(f"layers_{i}"):
            qkv = _product(w.qkv, x_dn, cfg, kernel, norm=w.input_norm)
            if w.qkv_bias is not None:
                qkv = qkv + w.qkv_bias[:, None]
            prefix = None if cache.prefix is None else cache.prefix.layers[i]
            if fused:
                # RoPE, the cache write and the attention in one call, on the product as it is.
                layer = cache.layers[i]
                out_fn, k_cache, v_cache = cpu_kernels.decode_attention_write(
                    qkv, rope[0].reshape(b, hd), rope[1].reshape(b, hd), info.cache_end,
                    layer.k, layer.v, mask[:, 0], (prefix.k, prefix.v, pmask[:, 0]), h)
                new_layers.append(layer.replace(k=k_cache, v=v_cache).constrain())
            else:
                q = heads(qkv[:h * hd], h)
                k = heads(qkv[h * hd:(h + kv) * hd], kv)
                v = heads(qkv[(h + kv) * hd:], kv)
                out, layer_cache = attend(cfg, q, k, v, positions_bt, info, cache.layers[i],
                                          prefix, rope, attention)
                new_layers.append(layer_cache)
                out_fn = jnp.transpose(out.reshape(b * t, h * hd))
            x_dn = _product(w.o, out_fn, cfg, kernel, residual=x_dn)
            gate_up = _product(w.gate_up, x_dn, cfg, kernel, norm=w.post_attn_norm)
            x_dn = _product(w.down, gate_up, cfg, kernel, gated=True, residual=x_dn)
    x_dn = rms_norm(x_dn, weights.final_norm, eps, dtype, axis=0)
    return x_dn, cache.written(tuple(new_layers), info)


def decode_step(params: Any, weights: Optional[DecodeWeights], cfg: ModelConfig,
                fed_n: jax.Array, live_n: jax.Array, cache: KVCache,
                rope_table: Optional[tuple[jax.Array, jax.Array]] = None,
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Feeds one token per row (``live_n`` False: a finished row, not attended) and returns the
    next-token logits [N, V] fp32, the rewards [N] fp32 read at the fed token, and the cache.
    ``weights`` None takes the standard layout, else the feature-major one, which reads the
    rotary embedding from ``rope_table`` (:func:`rope_table`, made before the loop) when given."""
    model = CLoudModel(cfg)
    if weights is None:
        hidden_n1d, cache = model.apply({"params": params}, fed_n[:, None], live_n[:, None],
                                        cache=cache, method=CLoudModel.hidden_states)
        hidden_nd = hidden_n1d[:, 0]
        logits_nv = model.apply({"params": params}, hidden_nd, method=CLoudModel.step_logits)
    else:
        hidden_dn, cache = feature_major_hidden(weights, cfg, fed_n[:, None], live_n[:, None],
                                                cache, rope_table)
        with jax.named_scope("lm_head"):
            if _kernel_matmul(cfg) and len(weights.lm_head) == 1:
                # The kernel writes the logits [N, V] itself.
                logits_nv = cpu_kernels.decode_matmul(weights.lm_head[0], hidden_dn,
                                                      transposed=True)
            else:
                logits_vn = _times(weights.lm_head, hidden_dn, _kernel_matmul(cfg),
                                   preferred_element_type=jnp.float32)
                # Keeps XLA from folding the transpose into the product's output layout.
                logits_nv = jnp.transpose(jax.lax.optimization_barrier(logits_vn))
        hidden_nd = jnp.transpose(hidden_dn)
    rewards_n = model.apply({"params": params}, hidden_nd, method=CLoudModel.reward)
    return logits_nv, rewards_n, cache
