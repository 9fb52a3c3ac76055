"""Training internals behind ``python -m cloud_jax.train``.

    step.py           the jitted train / eval steps, state shardings, memory analysis
    checkpointing.py  orbax CheckpointManager: state + data iterator + config, resume
    metrics.py        metric windows, JSONL / TensorBoard / W&B writers
    loop.py           set-up, the loop, periodic eval and checkpoints
    toy_data.py       a small learnable preference set for tiny CPU runs and tests
"""
