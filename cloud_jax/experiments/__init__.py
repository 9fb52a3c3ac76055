"""Experiments built from the library: ``cloud_vs_classic`` (``python -m cloud_jax pipeline``)."""
