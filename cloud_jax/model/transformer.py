"""The CLoud model: one Llama-family decoder, an LM head and a reward head over the same hidden states.

Pure functional: ``params`` and the KV ``cache`` are explicit pytrees in and out of ``apply``.

    model = CLoudModel(cfg)
    out = model.apply({"params": params}, input_ids_bt, attention_mask_bt,
                      reward_index_b=idx_b)            # out["logits"] [B,T,V] fp32, out["rewards"] [B]
    out = model.apply({"params": params}, ids, mask, cache=cache)   # out["cache"] is the new cache

Positions come from the batch (``positions_bt``) or, by default, from the attention mask, so left
and right padding give the same result for the attended tokens.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cloud_jax.model.config import ModelConfig
from cloud_jax.model.layers import MLP, Attention, RMSNorm, dtype_of, param_with_axes
from cloud_jax.model.lm_loss import chunked_lm_loss

Cache = dict[str, Any]

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_info, layer_cache=None):
        cfg = self.cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        x_btd = nn.with_logical_constraint(
            x_btd, ("activation_batch", "activation_length", "activation_embed"))
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_norm")(x_btd)
        attn, new_cache = Attention(cfg, name="attn")(h, positions_bt, mask_info, layer_cache)
        x_btd = x_btd + attn
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attn_norm")(x_btd)
        x_btd = x_btd + MLP(cfg, name="mlp")(h)
        return x_btd, new_cache


class RewardHead(nn.Module):
    """``Dense(h,h) -> tanh -> Dense(h,1)``, dropout before each dense; computed in fp32.

    The same shape and names as the reference implementation's head, so its checkpoints import.
    """

    hidden_size: int
    dropout_rate: float
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h_bd, deterministic: bool = True):
        h = h_bd.astype(jnp.float32)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        h = nn.Dense(self.hidden_size, dtype=jnp.float32, param_dtype=self.param_dtype,
                     name="dense",
                     kernel_init=param_with_axes(nn.initializers.normal(0.02),
                                                 ("embed", "reward_hidden")),
                     bias_init=param_with_axes(nn.initializers.zeros, ("reward_hidden",)))(h)
        h = jnp.tanh(h)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        out = nn.Dense(1, dtype=jnp.float32, param_dtype=self.param_dtype, name="out_proj",
                       kernel_init=param_with_axes(nn.initializers.normal(0.02),
                                                   ("reward_hidden", "reward_out")),
                       bias_init=param_with_axes(nn.initializers.zeros, ("reward_out",)))(h)
        return out[..., 0]


def _layer_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat],
                    prevent_cse=not cfg.scan_layers)


class CLoudModel(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
            embedding_init=param_with_axes(nn.initializers.normal(0.02), ("vocab", "embed")))
        layer_cls = _layer_class(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, dtype, pdtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", param_with_axes(nn.initializers.normal(0.02), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), pdtype)
        self.reward_head = RewardHead(cfg.hidden_size, cfg.reward_dropout, pdtype)

    def hidden_states(self, input_ids_bt, attention_mask_bt, positions_bt=None, cache=None):
        """Final-norm hidden states [B,T,D] and the updated cache (None without a cache)."""
        cfg = self.cfg
        mask_bt = attention_mask_bt.astype(jnp.int32)
        t = input_ids_bt.shape[1]
        prefix = None if cache is None else cache.get("prefix")
        if positions_bt is None:
            seen_b = 0 if cache is None else jnp.sum(cache["valid"], axis=1, dtype=jnp.int32)
            if prefix is not None:
                seen_b = seen_b + _rows_of_groups(
                    jnp.sum(prefix["valid"], axis=1, dtype=jnp.int32), mask_bt.shape[0])
            positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1) - 1, 0) + jnp.reshape(
                seen_b, (-1, 1))
        positions_bt = positions_bt.astype(jnp.int32)
        if cache is None:
            mask_info = {"q_slot": jnp.arange(t), "k_slot": jnp.arange(t), "k_valid": mask_bt,
                         "k_pos": positions_bt}
        else:
            start = cache["end"]
            valid = jax.lax.dynamic_update_slice(cache["valid"], mask_bt, (0, start))
            pos = jax.lax.dynamic_update_slice(cache["pos"], positions_bt, (0, start))
            mask_info = {"q_slot": start + jnp.arange(t), "k_slot": jnp.arange(valid.shape[1]),
                         "k_valid": valid, "k_pos": pos, "cache_end": start}
            if prefix is not None:
                mask_info["prefix_valid"] = _rows_of_groups(prefix["valid"], mask_bt.shape[0])
                mask_info["prefix_pos"] = _rows_of_groups(prefix["pos"], mask_bt.shape[0])
        x = self.embed(input_ids_bt)
        new_layers = None
        if cfg.scan_layers:
            if cache is not None:
                raise ValueError("a KV cache needs unrolled layers: convert the params with "
                                 "cloud_jax.model.unstack_layers and use scan_layers=False")
            x, _ = self.layers(x, positions_bt, mask_info)
        else:
            new_layers = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else cache["layers"][i]
                if prefix is not None:
                    layer_cache = {**layer_cache, "prefix_k": prefix["layers"][i]["k"],
                                   "prefix_v": prefix["layers"][i]["v"]}
                x, layer_cache = layer(x, positions_bt, mask_info, layer_cache)
                new_layers.append(layer_cache)
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_cache = {"layers": tuple(new_layers), "valid": mask_info["k_valid"],
                         "pos": mask_info["k_pos"], "end": cache["end"] + t}
            if prefix is not None:
                new_cache["prefix"] = prefix
        return x, new_cache

    def logits(self, hidden_btd):
        """LM logits in fp32 [..., V]."""
        if self.cfg.tie_word_embeddings:
            kernel = jnp.transpose(self.embed.embedding)
        else:
            kernel = self.lm_head
        # Rows flattened to one axis (see HeadProjection).
        h_nd = hidden_btd.reshape(-1, hidden_btd.shape[-1])
        logits = jnp.einsum("nd,dv->nv", h_nd, kernel.astype(hidden_btd.dtype),
                            preferred_element_type=jnp.float32)
        logits = logits.reshape(hidden_btd.shape[:-1] + (logits.shape[-1],))
        if logits.ndim == 3:
            logits = nn.with_logical_constraint(
                logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits

    def lm_loss(self, hidden_btd, targets_bt, loss_mask_bt, chunk_size: int):
        """``(loss_sum, token_count)`` of the LM head's cross-entropy, ``chunk_size`` positions at a
        time without a full logits array (:func:`cloud_jax.model.lm_loss.chunked_lm_loss`)."""
        tied = self.cfg.tie_word_embeddings
        kernel = self.embed.embedding if tied else self.lm_head
        return chunked_lm_loss(hidden_btd, kernel, targets_bt, loss_mask_bt, chunk_size,
                               vocab_first=tied)

    def step_logits(self, hidden_nd):
        """LM logits [N, V] fp32 of a few rows (a decode step); the same values as :meth:`logits`.

        With a tied head the product is taken as embedding [V, D] . hidden [N, D]^T, the long
        vocabulary axis first, and the small [V, N] result transposed after it: on CPU, XLA runs
        that form about 1.6x faster than [N, D] . [D, V] at N = 16. The barrier keeps the
        compiler from folding the transpose back into the slower form.
        """
        if not self.cfg.tie_word_embeddings:
            return self.logits(hidden_nd)
        logits_vn = jnp.einsum("vd,nd->vn", self.embed.embedding.astype(hidden_nd.dtype),
                               hidden_nd, preferred_element_type=jnp.float32)
        return jnp.transpose(jax.lax.optimization_barrier(logits_vn))

    def reward(self, hidden_bd, deterministic: bool = True):
        """Reward [...] in fp32 from hidden states [..., D]."""
        return self.reward_head(hidden_bd, deterministic=deterministic)

    def __call__(self, input_ids_bt, attention_mask_bt, positions_bt=None, reward_index_b=None,
                 cache: Optional[Cache] = None, deterministic: bool = True,
                 return_logits: bool = True, lm_targets=None):
        """``lm_targets=(targets [B,T], loss_mask [B,T], chunk_size)`` adds ``out["lm"]``, the
        chunked LM loss ``(loss_sum, token_count)`` (see :meth:`lm_loss`)."""
        hidden, new_cache = self.hidden_states(input_ids_bt, attention_mask_bt, positions_bt,
                                               cache)
        out = {"cache": new_cache, "logits": None, "rewards": None}
        if return_logits:
            out["logits"] = self.logits(hidden)
        if lm_targets is not None:
            out["lm"] = self.lm_loss(hidden, *lm_targets)
        if reward_index_b is not None:
            picked_bd = jnp.take_along_axis(
                hidden, reward_index_b.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
            out["rewards"] = self.reward(picked_bd, deterministic)
        elif self.is_initializing():
            self.reward(hidden[:, 0])
        return out


def _rows_of_groups(x_g, rows: int):
    """Repeats each group's entry to its rows (groups of rows // G consecutive rows)."""
    return jnp.repeat(x_g, rows // x_g.shape[0], axis=0)


def with_shared_prefix(cfg: ModelConfig, prefix_cache: Cache, rows: int, max_len: int) -> Cache:
    """A decode cache for ``rows`` rows over a prefilled cache of G inputs.

    Rows come in G groups of ``rows // G`` consecutive rows (e.g. the K samples of each input);
    each group reads its input's prefix segment, which is stored and read once, not once per row.
    New tokens go to a fresh segment of ``max_len`` slots per row.
    """
    groups = prefix_cache["valid"].shape[0]
    if rows % groups:
        raise ValueError(f"{rows} rows do not split into {groups} equal groups")
    cache = init_cache(cfg, rows, max_len, str(prefix_cache["layers"][0]["k"].dtype))
    cache["prefix"] = {"layers": prefix_cache["layers"], "valid": prefix_cache["valid"],
                       "pos": prefix_cache["pos"]}
    return cache


def last_attended_index(attention_mask_bt: jax.Array) -> jax.Array:
    """Index of each row's last attended position (works for left and right padding)."""
    t = attention_mask_bt.shape[1]
    idx = jnp.arange(t)[None, :]
    return jnp.max(jnp.where(attention_mask_bt.astype(bool), idx, -1), axis=1).astype(jnp.int32)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Optional[str] = None) -> Cache:
    """Empty KV cache: per layer k/v [B, KV_heads, S, head_dim], plus slot validity and positions."""
    dt = dtype_of(dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
    return {
        "layers": tuple({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
                        for _ in range(cfg.num_layers)),
        "valid": jnp.zeros((batch, max_len), jnp.int32),
        "pos": jnp.zeros((batch, max_len), jnp.int32),
        "end": jnp.zeros((), jnp.int32),
    }


def cache_logical_axes(cfg: ModelConfig, shared_prefix: bool = False) -> Cache:
    """Logical axis names of every cache array (same structure as ``init_cache``, or as
    ``with_shared_prefix`` when ``shared_prefix``)."""
    kv = PartitionSpec("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")
    row = PartitionSpec("cache_batch", "cache_length")
    axes = {
        "layers": tuple({"k": kv, "v": kv} for _ in range(cfg.num_layers)),
        "valid": row,
        "pos": row,
        "end": PartitionSpec(),
    }
    if shared_prefix:
        axes["prefix"] = {"layers": axes["layers"], "valid": row, "pos": row}
    return axes
