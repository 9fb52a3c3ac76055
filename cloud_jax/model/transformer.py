"""The CLoud model: one Llama-family decoder, an LM head and a reward head over the same hidden states.

Pure functional: ``params`` and the KV ``cache`` are explicit pytrees in and out of ``apply``.

    model = CLoudModel(cfg)
    out = model.apply({"params": params}, input_ids_bt, attention_mask_bt,
                      reward_index_b=idx_b)            # out.logits [B,T,V] fp32, out.rewards [B]
    out = model.apply({"params": params}, ids, mask, cache=cache)   # out.cache is the new cache

Positions come from the batch (``positions_bt``) or, by default, from the attention mask, so left
and right padding give the same result for the attended tokens.

A profile reads by block: Flax runs each submodule under a named scope of its name (``embed``,
``layers_<i>``, ``final_norm``, ``reward_head``), and the blocks that are not one submodule are
scoped here (``attention`` and ``mlp`` in each layer, each with its norm and residual; ``lm_head``).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cloud_jax.model.cache import KVCache, LayerKV, MaskInfo
from cloud_jax.model.config import ModelConfig
from cloud_jax.model.layers import MLP, Attention, RMSNorm, dtype_of, param_with_axes
from cloud_jax.model.lm_loss import chunked_lm_loss

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_info: MaskInfo,
                 layer_cache: Optional[LayerKV] = None, prefix_kv: Optional[LayerKV] = None):
        cfg = self.cfg
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        x_btd = nn.with_logical_constraint(
            x_btd, ("activation_batch", "activation_length", "activation_embed"))
        with jax.named_scope("attention"):
            h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_norm")(x_btd)
            attn, new_cache = Attention(cfg, name="attn")(h, positions_bt, mask_info,
                                                          layer_cache, prefix_kv)
            x_btd = x_btd + attn
        with jax.named_scope("mlp"):
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


@flax.struct.dataclass
class ModelOutput:
    """What one forward computed; a field is None where it was not asked for."""

    logits: Optional[jax.Array] = None  # fp32 [B, T, V], with return_logits
    rewards: Optional[jax.Array] = None  # fp32 [B], with reward_index_b
    lm: Optional[tuple[jax.Array, jax.Array]] = None  # (loss_sum, token_count), with lm_targets
    cache: Optional[KVCache] = None  # the updated cache, with a cache


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

    def hidden_states(self, input_ids_bt, attention_mask_bt, positions_bt=None,
                      cache: Optional[KVCache] = None):
        """Final-norm hidden states [B,T,D] and the updated cache (None without a cache)."""
        cfg = self.cfg
        positions_bt, mask_info = token_positions(attention_mask_bt, positions_bt, cache)
        x = self.embed(unattended_as_zero(input_ids_bt, attention_mask_bt))
        new_cache = None
        if cfg.scan_layers:
            if cache is not None:
                raise ValueError("a KV cache needs unrolled layers: convert the params with "
                                 "cloud_jax.model.unstack_layers and use scan_layers=False")
            x, _ = self.layers(x, positions_bt, mask_info)
        else:
            new_layers = []
            for i, layer in enumerate(self.layers):
                layer_cache = prefix_kv = None
                if cache is not None:
                    layer_cache = cache.layers[i]
                    prefix_kv = None if cache.prefix is None else cache.prefix.layers[i]
                x, layer_cache = layer(x, positions_bt, mask_info, layer_cache, prefix_kv)
                new_layers.append(layer_cache)
            if cache is not None:
                new_cache = cache.written(tuple(new_layers), mask_info)
        x = self.final_norm(x)
        return x, new_cache

    def logits(self, hidden_btd):
        """LM logits in fp32 [..., V]."""
        with jax.named_scope("lm_head"):
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
        with jax.named_scope("lm_head"):
            return chunked_lm_loss(hidden_btd, kernel, targets_bt, loss_mask_bt, chunk_size,
                                   vocab_first=tied)

    def step_logits(self, hidden_nd):
        """LM logits [N, V] fp32 of a few rows (a decode step); the same values as :meth:`logits`.

        On CPU a tied head takes the product as embedding [V, D] . hidden [N, D]^T and transposes
        the small [V, N] result, a form XLA:CPU runs faster at decode shapes; other backends take
        the usual form (docs/BENCHMARKS.md, "Backend-specific choices").
        """
        if not self.cfg.tie_word_embeddings or jax.default_backend() != "cpu":
            return self.logits(hidden_nd)
        with jax.named_scope("lm_head"):
            logits_vn = jnp.einsum("vd,nd->vn", self.embed.embedding.astype(hidden_nd.dtype),
                                   hidden_nd, preferred_element_type=jnp.float32)
            # Keeps XLA from folding the transpose back into the slower [N, D] . [D, V] form.
            return jnp.transpose(jax.lax.optimization_barrier(logits_vn))

    def reward(self, hidden_bd, deterministic: bool = True):
        """Reward [...] in fp32 from hidden states [..., D]."""
        return self.reward_head(hidden_bd, deterministic=deterministic)

    def __call__(self, input_ids_bt, attention_mask_bt, positions_bt=None, reward_index_b=None,
                 cache: Optional[KVCache] = None, deterministic: bool = True,
                 return_logits: bool = True, lm_targets=None) -> ModelOutput:
        """``lm_targets=(targets [B,T], loss_mask [B,T], chunk_size)`` adds ``out.lm``, the
        chunked LM loss ``(loss_sum, token_count)`` (see :meth:`lm_loss`)."""
        hidden, new_cache = self.hidden_states(input_ids_bt, attention_mask_bt, positions_bt,
                                               cache)
        logits = self.logits(hidden) if return_logits else None
        lm = None if lm_targets is None else self.lm_loss(hidden, *lm_targets)
        rewards = None
        if reward_index_b is not None:
            picked_bd = jnp.take_along_axis(
                hidden, reward_index_b.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
            rewards = self.reward(picked_bd, deterministic)
        elif self.is_initializing():
            self.reward(hidden[:, 0])
        return ModelOutput(logits=logits, rewards=rewards, lm=lm, cache=new_cache)


def token_positions(attention_mask_bt: jax.Array, positions_bt: Optional[jax.Array] = None,
                    cache: Optional[KVCache] = None) -> tuple[jax.Array, MaskInfo]:
    """The tokens' positions [B, T] int32 (by default from the mask, after the cached tokens) and
    the attention's :class:`MaskInfo` for a forward over them."""
    mask_bt = attention_mask_bt.astype(jnp.int32)
    if positions_bt is None:
        seen_b = 0 if cache is None else cache.seen(mask_bt.shape[0])
        positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1) - 1, 0) + jnp.reshape(
            seen_b, (-1, 1))
    positions_bt = positions_bt.astype(jnp.int32)
    if cache is None:
        return positions_bt, MaskInfo.uncached(mask_bt, positions_bt)
    return positions_bt, cache.mask_info(mask_bt, positions_bt)


def unattended_as_zero(input_ids_bt: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
    """The ids with token 0 where the mask leaves a position out: a pad's id is never read, so a
    pad id outside the vocabulary (a tokenizer's added pad token) embeds no NaN into the cache."""
    return jnp.where(attention_mask_bt > 0, input_ids_bt, 0)


def last_attended_index(attention_mask_bt: jax.Array) -> jax.Array:
    """Index of each row's last attended position (works for left and right padding)."""
    t = attention_mask_bt.shape[1]
    idx = jnp.arange(t)[None, :]
    return jnp.max(jnp.where(attention_mask_bt.astype(bool), idx, -1), axis=1).astype(jnp.int32)
