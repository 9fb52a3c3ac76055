"""Tiny random reward models for the tests, built without compiling the initialiser (which costs
seconds per test file)."""

import jax
import jax.numpy as jnp
import numpy as np

import cloud_jax
from cloud_jax.data.tokenizer import byte_tokenizer
from cloud_jax.model import param_shapes
from cloud_jax.model.config import ModelConfig

# A one-layer byte-level Llama: vocabulary 264 (256 bytes and the byte tokenizer's specials).
TINY = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                   num_kv_heads=2)


def random_params(cfg: ModelConfig, seed: int):
    """Weights drawn from N(0, 0.1) with numpy's generator ``seed``."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                        param_shapes(cfg))


def tiny_reward_model(seed: int, cfg: ModelConfig = TINY) -> "cloud_jax.RewardModel":
    """A RewardModel with random weights and the byte tokenizer."""
    return cloud_jax.RewardModel(cfg, random_params(cfg, seed), byte_tokenizer())
