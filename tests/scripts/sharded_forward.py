"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8: the same tiny forward on one device
and on a 2x2x2 (data, fsdp, tensor) mesh. Prints one JSON line with the differences."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from cloud_jax.model.config import ModelConfig
from cloud_jax.sharding import MeshConfig
from cloud_jax.model import CLoudModel, init_params, last_attended_index, mesh_context
from cloud_jax.model.params import param_shardings
from cloud_jax.sharding import TRAIN_RULES, batch_sharding, make_mesh

assert jax.device_count() == 8, jax.devices()
cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
rng = np.random.default_rng(0)
ids = jnp.asarray(rng.integers(1, 64, (4, 12)), jnp.int32)
mask = jnp.asarray(np.array([[1] * 12, [1] * 8 + [0] * 4, [0] * 5 + [1] * 7, [1] * 12]), jnp.int32)
model = CLoudModel(cfg)


def fwd(params, ids, mask):
    out = model.apply({"params": params}, ids, mask, reward_index_b=last_attended_index(mask))
    return out.logits, out.rewards


params = init_params(cfg, jax.random.key(0))
logits1, rewards1 = jax.jit(fwd)(params, ids, mask)

mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
shardings = param_shardings(cfg, mesh, TRAIN_RULES)
sharded_params = jax.device_put(params, shardings)
with mesh_context(mesh, TRAIN_RULES):
    step = jax.jit(fwd, in_shardings=(shardings, batch_sharding(mesh, 2), batch_sharding(mesh, 2)))
    logits8, rewards8 = step(sharded_params, ids, mask)
    direct = init_params(cfg, jax.random.key(0), mesh, TRAIN_RULES)

q_spec = direct["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec
init_diff = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(direct), jax.tree.leaves(params)))
print(json.dumps({
    "logits_diff": float(jnp.abs(logits8 - logits1).max()),
    "rewards_diff": float(jnp.abs(rewards8 - rewards1).max()),
    "num_devices_used": len(logits8.sharding.device_set),
    "q_spec": str(q_spec),
    "init_diff": init_diff,
}))
