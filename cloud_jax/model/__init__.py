"""Flax Llama-family backbone with an LM head and a reward head."""

from cloud_jax.model.cache import (KVCache, LayerKV, MaskInfo, PrefixSegment, init_cache,
                                   with_shared_prefix)
from cloud_jax.model.params import (abstract_params, count_params, init_params, mesh_context,
                                    param_logical_specs, param_shapes, param_shardings, stack_layers,
                                    unstack_layers)
from cloud_jax.model.transformer import CLoudModel, ModelOutput, last_attended_index

__all__ = [
    "CLoudModel", "KVCache", "LayerKV", "MaskInfo", "ModelOutput", "PrefixSegment",
    "abstract_params", "count_params", "init_cache", "init_params", "last_attended_index",
    "mesh_context", "param_logical_specs", "param_shapes", "param_shardings", "stack_layers",
    "unstack_layers", "with_shared_prefix",
]
