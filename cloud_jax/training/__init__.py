"""Training internals behind ``python -m cloud_jax.train``.

    config.py         the run config (every section) and TrainConfig, loaded from YAML
    stages.py         one record per stage: losses, layout, feedback, what the export records
    losses.py         LM and Bradley-Terry losses, metrics
    optim.py          AdamW with decoupled decay, warmup + cosine schedule, clipping
    step.py           the jitted train / eval steps, state shardings, memory analysis
    checkpointing.py  orbax CheckpointManager: state + data iterator + config, resume
    metrics.py        metric windows, JSONL / TensorBoard / W&B writers
    loop.py           set-up, the loop, periodic eval and checkpoints, the final export
"""
