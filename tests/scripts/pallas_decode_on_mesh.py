"""Run by tests/test_gpu_kernels.py with 8 fake CPU devices: a decode with
model.decode_attention_impl=pallas on meshes, against XLA's attention on one device. Prints one
JSON line."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from cloud_jax.model import param_shapes, param_shardings
from cloud_jax.model.config import ModelConfig
from cloud_jax.sampling import TopK, sample
from cloud_jax.sharding import SAMPLE_RULES, MeshConfig, make_mesh


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    pallas = dataclasses.replace(cfg, decode_attention_impl="pallas")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                          param_shapes(cfg))
    prefixes = [[1, 5, 9, 2, 7, 3, 3, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 2],
                [3, 4, 5, 6, 7, 8, 9, 10, 11], [20], [7, 7, 30, 31, 2, 9]]
    settings = dict(max_new_tokens=16, stop_ids=(62,), num_samples=8, method=TopK(20, 1.5),
                    seed=3, decode_layout="standard")
    want = sample(cfg, params, prefixes, **settings)
    out = {}
    for name, mesh_cfg in (("2x2x2", MeshConfig(data=2, fsdp=2, tensor=2)),
                           ("tensor_4", MeshConfig(data=2, fsdp=1, tensor=4))):
        mesh = make_mesh(mesh_cfg)
        sharded = jax.device_put(params, param_shardings(cfg, mesh, SAMPLE_RULES))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = sample(pallas, sharded, prefixes, mesh=mesh, rules=SAMPLE_RULES, **settings)
        out[name] = {
            "tokens_equal": bool(np.array_equal(got.tokens, want.tokens)),
            "lengths_equal": bool(np.array_equal(got.lengths, want.lengths)),
            "rewards_diff": float(np.abs(got.rewards - want.rewards).max()),
            "warnings": [str(w.message) for w in caught
                         if "decode_attention_impl" in str(w.message)],
        }
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
