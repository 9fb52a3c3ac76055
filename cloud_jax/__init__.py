"""cloud_jax."""
