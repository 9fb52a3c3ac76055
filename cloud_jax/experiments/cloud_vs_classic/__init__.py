"""CLoud against a classic reward model, end to end (``python -m cloud_jax pipeline``)."""
