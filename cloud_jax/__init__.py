"""cloud_jax: Critique-out-Loud reward models in JAX/Flax.

    import cloud_jax
    rm = cloud_jax.load("path/to/model")
    logits, rewards = rm.forward(input_ids, attention_mask)
"""

from cloud_jax.api import RewardModel, from_config, load

__all__ = ["RewardModel", "from_config", "load"]
__version__ = "0.1.0"
