"""The commands of ``python -m cloud_jax`` and ``python -m cloud_jax.train``, one module each."""
