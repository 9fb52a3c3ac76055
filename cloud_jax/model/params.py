"""Parameter initialisation straight into shardings, and the scan <-> unrolled layer layouts."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cloud_jax.model.config import ModelConfig
from cloud_jax.model.transformer import CLoudModel
from cloud_jax.sharding import TRAIN_RULES, Rules, logical_to_shardings

Params = dict[str, Any]

_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def _dummy_inputs():
    ids = jnp.zeros((1, 2), jnp.int32)
    return ids, jnp.ones((1, 2), jnp.int32)


def _init_model(cfg: ModelConfig) -> CLoudModel:
    """The model whose ``init`` makes ``cfg``'s parameters. Attention has none, so its
    implementation is left at ``xla``: the parameters are the same, and they can be made (or
    their shapes read) on a host without the accelerator library a ``cudnn`` config calls."""
    return CLoudModel(dataclasses.replace(cfg, attention_impl="xla"))


def abstract_params(cfg: ModelConfig) -> Any:
    """Shapes/dtypes of the (boxed, logically annotated) parameters, without allocating them."""
    model = _init_model(cfg)
    return jax.eval_shape(lambda r: model.init(r, *_dummy_inputs()), jax.random.key(0))["params"]


def _strip_boxes(tree: Any) -> Any:
    # `nn.unbox` would also apply sharding constraints, which fails on abstract values under a mesh.
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def param_shapes(cfg: ModelConfig) -> Any:
    """Tree of ShapeDtypeStructs of the (unboxed) parameters."""
    return _strip_boxes(abstract_params(cfg))


def param_logical_specs(cfg: ModelConfig) -> Any:
    return nn.get_partition_spec(abstract_params(cfg))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = TRAIN_RULES) -> Any:
    abstract = abstract_params(cfg)
    return logical_to_shardings(nn.get_partition_spec(abstract), _strip_boxes(abstract), mesh,
                                rules)


def mesh_context(mesh: Optional[Mesh], rules: Rules):
    """Mesh + logical rules in force for tracing (a no-op context without a mesh)."""
    if mesh is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def _jit_init(cfg: ModelConfig, rng: jax.Array, mesh: Optional[Mesh], rules: Rules,
              part: Optional[str] = None) -> Params:
    """The model's random parameters, or only its subtree ``part``, from one jitted init; with a
    mesh, each one is created directly in its sharding."""
    model = _init_model(cfg)
    pick = (lambda tree: tree) if part is None else (lambda tree: tree[part])

    def init(r):
        return pick(nn.unbox(model.init(r, *_dummy_inputs())["params"]))

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = pick(param_shardings(cfg, mesh, rules))
    with mesh_context(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)


def init_params(cfg: ModelConfig, rng: jax.Array, mesh: Optional[Mesh] = None,
                rules: Rules = TRAIN_RULES) -> Params:
    """Random parameters; with a mesh, each one is created directly in its sharding."""
    return _jit_init(cfg, rng, mesh, rules)


def init_reward_head(cfg: ModelConfig, rng: jax.Array, mesh: Optional[Mesh] = None,
                     rules: Rules = TRAIN_RULES) -> Params:
    """``init_params(cfg, rng, ...)["reward_head"]`` without compiling the rest of the model: flax
    draws each submodule's random numbers from a stream named by its path, so a model of one
    layer and a small vocabulary gives the same head, and only the head leaves the program.
    Loading a pretrained backbone needs only this part at random."""
    small = dataclasses.replace(cfg, num_layers=1, vocab_size=128, scan_layers=False)
    return _jit_init(small, rng, mesh, rules, part="reward_head")


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def stack_layers(params: Params, num_layers: int) -> Params:
    """Unrolled (``layers_0`` ... ``layers_{L-1}``) -> scanned (``layers`` with a leading L axis)."""
    out = {k: v for k, v in params.items() if not _LAYER_KEY.match(k)}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                 *[params[f"layers_{i}"] for i in range(num_layers)])
    return out


def unstack_layers(params: Params, num_layers: int) -> Params:
    """Scanned -> unrolled; the inverse of :func:`stack_layers`."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out
