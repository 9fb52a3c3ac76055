"""The KV cache and the attention's mask info: typed pytrees that know their logical axes.

    cache = init_cache(cfg, batch, max_len)             # per layer k/v, slot validity, positions
    cache = model.apply({"params": params}, ids, mask, cache=cache).cache
    cache = with_shared_prefix(cfg, cache, rows, new_len)   # G prefilled inputs, groups of rows
    cache.logical_axes()        # the same tree with a PartitionSpec of logical names per array
    cache.shardings(mesh, rules)                        # ... with a NamedSharding per array
    cache.constrain()           # each array laid out by the logical rules in force

Each array field names its logical axes in its field's metadata, so the axes follow the structure
wherever it varies (one entry per layer, an optional shared prefix) rather than being a second
tree, written by hand, that has to mirror it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from cloud_jax.model.config import ModelConfig
from cloud_jax.sharding import Rules, logical_to_shardings

__all__ = ["KVCache", "LayerKV", "MaskInfo", "PrefixSegment", "init_cache", "with_shared_prefix"]

KV_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")
SLOT_AXES = ("cache_batch", "cache_length")


def _array(*axes: str, **kwargs):
    return flax.struct.field(metadata={"logical_axes": axes}, **kwargs)


def _axes_of(node: Any) -> Any:
    if isinstance(node, tuple):
        return tuple(_axes_of(x) for x in node)
    if not dataclasses.is_dataclass(node):
        return node  # None: an optional part that is absent
    axes = node.replace(**{
        f.name: (PartitionSpec(*f.metadata["logical_axes"])
                 if "logical_axes" in f.metadata and getattr(node, f.name) is not None
                 else _axes_of(getattr(node, f.name)))
        for f in dataclasses.fields(node)})
    if getattr(node, "keys_transposed", False):  # keys stored [.., head_dim, slots]
        axes = axes.replace(k=PartitionSpec(*KV_AXES[:2], KV_AXES[3], KV_AXES[2]))
    return axes


class _LogicalAxes:
    """Axes, shardings and layout constraints read from the fields' ``logical_axes`` metadata.
    Works on abstract trees too (``jax.eval_shape`` of a cache)."""

    def logical_axes(self):
        """The same tree with a PartitionSpec of logical axis names in place of each array."""
        return _axes_of(self)

    def shardings(self, mesh: Mesh, rules: Rules):
        """The same tree with a NamedSharding on ``mesh`` (through ``rules``) per array."""
        return logical_to_shardings(self.logical_axes(), self, mesh, rules)

    def constrain(self):
        """Each array constrained to its logical axes: a no-op unless rules and a mesh are set."""
        return jax.tree.map(lambda x, spec: nn.with_logical_constraint(x, tuple(spec)), self,
                            self.logical_axes())


@flax.struct.dataclass
class LayerKV(_LogicalAxes):
    """One layer's keys and values [B, KV_heads, S, head_dim]; with ``keys_transposed`` the keys
    are stored [B, KV_heads, head_dim, S] (:meth:`KVCache.with_keys_transposed`)."""

    k: jax.Array = _array(*KV_AXES)
    v: jax.Array = _array(*KV_AXES)
    keys_transposed: bool = flax.struct.field(pytree_node=False, default=False)

    def transposed_keys(self) -> LayerKV:
        """The same keys stored [B, KV_heads, head_dim, S] (a copy)."""
        if self.keys_transposed:
            return self
        return self.replace(k=jnp.swapaxes(self.k, 2, 3), keys_transposed=True)


@flax.struct.dataclass
class PrefixSegment(_LogicalAxes):
    """G prefilled inputs, each read by a group of consecutive rows (:func:`with_shared_prefix`):
    per layer k/v [G, KV_heads, P, head_dim], validity and positions [G, P] int32."""

    layers: tuple[LayerKV, ...]
    valid: jax.Array = _array(*SLOT_AXES)
    pos: jax.Array = _array(*SLOT_AXES)


@flax.struct.dataclass
class KVCache(_LogicalAxes):
    """Per layer k/v [B, KV_heads, S, head_dim]; per slot validity and position [B, S] int32;
    ``end`` [] int32, the first slot the next tokens go to; optionally a shared prefix segment
    whose keys precede every slot of ``layers``."""

    layers: tuple[LayerKV, ...]
    valid: jax.Array = _array(*SLOT_AXES)
    pos: jax.Array = _array(*SLOT_AXES)
    end: jax.Array = _array()
    prefix: Optional[PrefixSegment] = None

    def seen(self, rows: int) -> jax.Array:
        """Attended tokens already cached for each of ``rows`` rows [rows] int32 (the prefix's
        included): the position the next attended token takes."""
        seen_b = jnp.sum(self.valid, axis=1, dtype=jnp.int32)
        if self.prefix is not None:
            seen_b = seen_b + _rows_of_groups(
                jnp.sum(self.prefix.valid, axis=1, dtype=jnp.int32), rows)
        return seen_b

    def mask_info(self, mask_bt: jax.Array, positions_bt: jax.Array) -> MaskInfo:
        """Where the T new tokens (written from slot ``end``) and every key of the cache sit."""
        t, rows = mask_bt.shape[1], mask_bt.shape[0]
        valid = jax.lax.dynamic_update_slice(self.valid, mask_bt, (0, self.end))
        pos = jax.lax.dynamic_update_slice(self.pos, positions_bt, (0, self.end))
        prefix_valid = prefix_pos = None
        if self.prefix is not None:
            prefix_valid = _rows_of_groups(self.prefix.valid, rows)
            prefix_pos = _rows_of_groups(self.prefix.pos, rows)
        return MaskInfo(q_slot=self.end + jnp.arange(t), k_slot=jnp.arange(valid.shape[1]),
                        k_valid=valid, k_pos=pos, cache_end=self.end, prefix_valid=prefix_valid,
                        prefix_pos=prefix_pos)

    def with_keys_transposed(self) -> KVCache:
        """The same cache with every layer's keys (the prefix's too) stored
        [B, KV_heads, head_dim, S]: the layout whose attention scores XLA:CPU computes fastest
        at decode shapes (docs/BENCHMARKS.md, "Backend-specific choices")."""
        prefix = self.prefix
        if prefix is not None:
            prefix = prefix.replace(layers=tuple(x.transposed_keys() for x in prefix.layers))
        return self.replace(layers=tuple(x.transposed_keys() for x in self.layers), prefix=prefix)

    def grown(self, length: int) -> KVCache:
        """The same cache with ``length`` slots per row (at least as many as now): the new slots
        are empty, so every attention over it gives the same values."""
        extra = length - self.valid.shape[1]
        if extra < 0:
            raise ValueError(f"a cache of {self.valid.shape[1]} slots cannot shrink to {length}")

        def pad(x, axis):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, extra)
            return jnp.pad(x, widths)

        layers = tuple(x.replace(k=pad(x.k, 3 if x.keys_transposed else 2), v=pad(x.v, 2))
                       for x in self.layers)
        return self.replace(layers=layers, valid=pad(self.valid, 1), pos=pad(self.pos, 1))

    def written(self, layers: tuple[LayerKV, ...], info: MaskInfo) -> KVCache:
        """The cache after the forward that :meth:`mask_info` described wrote ``layers``."""
        return self.replace(layers=layers, valid=info.k_valid, pos=info.k_pos,
                            end=self.end + info.q_slot.shape[0])


@flax.struct.dataclass
class MaskInfo(_LogicalAxes):
    """Slots, validity and positions of one forward's queries and keys, for the attention mask.
    Without a cache the keys are the queries' own tokens."""

    q_slot: jax.Array = _array("activation_length")  # int32 [T]
    k_slot: jax.Array = _array("cache_length")  # int32 [S]
    k_valid: jax.Array = _array(*SLOT_AXES)  # int32 [B, S]
    k_pos: jax.Array = _array(*SLOT_AXES)  # int32 [B, S]
    # int32 []: the cache slot of the first new token; None without a cache.
    cache_end: Optional[jax.Array] = _array(default=None)
    # int32 [B, P]: the shared prefix's slots, repeated to each row of its group; None without one.
    prefix_valid: Optional[jax.Array] = _array(*SLOT_AXES, default=None)
    prefix_pos: Optional[jax.Array] = _array(*SLOT_AXES, default=None)

    @classmethod
    def uncached(cls, mask_bt: jax.Array, positions_bt: jax.Array) -> MaskInfo:
        t = mask_bt.shape[1]
        return cls(q_slot=jnp.arange(t), k_slot=jnp.arange(t), k_valid=mask_bt, k_pos=positions_bt)


def _rows_of_groups(x_g: jax.Array, rows: int) -> jax.Array:
    """Repeats each group's entry to its rows (groups of rows // G consecutive rows)."""
    return jnp.repeat(x_g, rows // x_g.shape[0], axis=0)


def init_cache(cfg: ModelConfig, batch: int, max_len: int,
               dtype: Optional[str] = None) -> KVCache:
    """An empty cache of ``max_len`` slots per row, k/v in ``dtype`` (default ``cfg.dtype``)."""
    dt = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
    return KVCache(
        layers=tuple(LayerKV(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))
                     for _ in range(cfg.num_layers)),
        valid=jnp.zeros((batch, max_len), jnp.int32),
        pos=jnp.zeros((batch, max_len), jnp.int32),
        end=jnp.zeros((), jnp.int32))


def with_shared_prefix(cfg: ModelConfig, prefix_cache: KVCache, rows: int,
                       max_len: int) -> KVCache:
    """A decode cache for ``rows`` rows over a prefilled cache of G inputs.

    Rows come in G groups of ``rows // G`` consecutive rows (e.g. the K samples of each input);
    each group reads its input's prefix segment, which is stored and read once, not once per row.
    New tokens go to a fresh segment of ``max_len`` slots per row.
    """
    groups = prefix_cache.valid.shape[0]
    if rows % groups:
        raise ValueError(f"{rows} rows do not split into {groups} equal groups")
    cache = init_cache(cfg, rows, max_len, str(prefix_cache.layers[0].k.dtype))
    return cache.replace(prefix=PrefixSegment(layers=prefix_cache.layers, valid=prefix_cache.valid,
                                              pos=prefix_cache.pos))
