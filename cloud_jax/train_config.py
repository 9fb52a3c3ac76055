"""Settings of ``python -m cloud_jax.train``: the stage, step counts, eval, checkpoints, logging.

Kept free of ``cloud_jax.config`` (which embeds :class:`TrainConfig` as its ``train`` section) so
there is no import cycle.
"""

from __future__ import annotations

import dataclasses

from cloud_jax.errors import ConfigError

STAGES = ("critique_sft", "cloud", "classic", "lm_pretrain")
NONFINITE_POLICIES = ("error", "skip")
DISTRIBUTED_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Paths are relative to the top-level ``output_dir`` unless absolute."""

    # critique_sft | cloud | classic | lm_pretrain (see docs/TRAINING.md).
    stage: str = "critique_sft"
    # Optimizer updates in the whole run; the learning-rate schedule spans exactly these. 0: one
    # pass over the train split for data.num_epochs epochs (the count is saved with the run).
    total_steps: int = 100
    # Stop (after a checkpoint) once this step is reached, leaving the schedule untouched; a later
    # run with the same output_dir resumes. 0 runs to total_steps. For time-limited jobs.
    stop_at_step: int = 0
    # Micro-batches per update: data.batch_pairs pairs are split into this many equal parts that
    # run one after another (lax.scan), and their gradients add up to the full batch's.
    grad_accum_steps: int = 1
    # Held-out evaluation every this many steps and at the end (needs data.eval_path); 0: never.
    eval_every: int = 100
    # Eval batches per evaluation; 0 reads the whole eval split.
    eval_batches: int = 0
    # Checkpoint every this many steps and at the end; 0: only at the end.
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # Orbax writes checkpoints in the background while training goes on.
    async_checkpointing: bool = True
    # Directory of the orbax checkpoints; empty: <output_dir>/checkpoints.
    checkpoint_dir: str = ""
    # Write the final weights as a reference-layout CLoud directory, <output_dir>/final, which
    # `init_from` of the next stage and `cloud_jax.load` read.
    export_final: bool = True
    # Metrics are averaged over this many steps before they are written.
    log_every: int = 10
    # One JSON object per logged step and per evaluation; empty: <output_dir>/metrics.jsonl.
    metrics_file: str = "metrics.jsonl"
    # TensorBoard event files (tensorboardX, no TensorFlow) under this directory; empty: off.
    tensorboard_dir: str = "tensorboard"
    # Weights & Biases project; empty: off. Needs `pip install wandb`.
    wandb_project: str = ""
    wandb_run_name: str = ""
    # What a non-finite loss or gradient norm does: error (stop with the step number) or skip
    # (leave params and optimizer state unchanged for that step, count it and go on).
    on_nonfinite: str = "error"
    # Peak FLOP/s of one device for the MFU estimate; 0 looks the device kind up in a small table
    # (TPU and recent NVIDIA GPUs, bf16) and leaves MFU out where it is unknown.
    peak_flops_per_device: float = 0.0
    # jax.distributed.initialize(): auto when JAX_COORDINATOR_ADDRESS is set or a multi-host TPU /
    # SLURM job is detected; on: always; off: never.
    distributed: str = "auto"
    # A tqdm progress bar on process 0.
    progress_bar: bool = True

    def validate(self) -> "TrainConfig":
        if self.stage not in STAGES:
            raise ConfigError(f"train.stage={self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.total_steps < 0:
            raise ConfigError(f"train.total_steps={self.total_steps}: must be >= 0 (0: one "
                              "pass over the data for data.num_epochs epochs)")
        if self.stop_at_step < 0 or self.total_steps and self.stop_at_step > self.total_steps:
            raise ConfigError(f"train.stop_at_step={self.stop_at_step}: must be in "
                              f"[0, train.total_steps={self.total_steps}]")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps}: must be >= 1")
        for key in ("eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every={self.log_every}: must be >= 1")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.on_nonfinite={self.on_nonfinite!r}: expected one of "
                              f"{', '.join(NONFINITE_POLICIES)}")
        if self.distributed not in DISTRIBUTED_MODES:
            raise ConfigError(f"train.distributed={self.distributed!r}: expected one of "
                              f"{', '.join(DISTRIBUTED_MODES)}")
        if self.peak_flops_per_device < 0:
            raise ConfigError(f"train.peak_flops_per_device={self.peak_flops_per_device}: "
                              "must be >= 0")
        return self
