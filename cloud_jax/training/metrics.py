"""Metric windows and where they go: JSONL files, TensorBoard event files, W&B.

Per-step metrics stay on the device until a window is logged; then the window's sums are added
and turned into means (``cloud_jax.training.losses.finalize_metrics``), so a logged accuracy is over every
pair of the window rather than a mean of per-step means.

The metrics file holds only what the run computes, so two identical runs write byte-identical
files (docs/RELIABILITY.md, item 10). Wall-clock figures (tokens/s, MFU) differ from run to run:
they go to ``throughput.jsonl`` beside it, and to TensorBoard and W&B with the rest.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from cloud_jax import storage
from cloud_jax.errors import ConfigError
from cloud_jax.sharding import chip_of
from cloud_jax.training.losses import finalize_metrics

log = logging.getLogger(__name__)

# Written beside the metrics file: the timing figures kept out of it.
THROUGHPUT_FILE = "throughput.jsonl"

# Step outputs that are per-step values (averaged over a window), not additive sums.
_MEANS = ("loss", "grad_norm")


def peak_flops(device_kind: str, configured: float = 0.0) -> Optional[float]:
    if configured > 0:
        return configured
    chip = chip_of(device_kind)
    return chip.peak_flops if chip else None


def summarize_window(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-step metric dicts (device or host arrays) -> one dict of floats for the window.

    The losses, accuracy, rewards, grad norm and learning rate are those of the steps whose
    update was applied: a non-finite step (skipped with train.on_nonfinite=skip) is only counted,
    in ``nonfinite_steps``. ``learning_rate`` is the rate the window's last applied update used.
    In a window of skipped steps only, these are None (JSON null). ``tokens`` counts the tokens of
    every step, skipped or not (the work done, for throughput)."""
    host = jax.device_get(list(steps))
    applied = [s for s in host if not s["nonfinite"]]
    sums = {k: np.sum([s[k] for s in applied or host[:1]], axis=0) for k in host[0]}
    out: dict[str, Any] = {k: float(v) for k, v in finalize_metrics(sums).items()}
    for k in _MEANS:
        out[k] = float(np.mean([s[k] for s in applied])) if applied else None
    out["learning_rate"] = float(applied[-1]["learning_rate"]) if applied else None
    if not applied:
        out = {k: None for k in out}
    out["nonfinite_steps"] = len(host) - len(applied)
    out["tokens"] = float(np.sum([s["tokens"] for s in host]))
    return out


def drop_steps_after(path: str, step: int) -> int:
    """Removes from the JSONL file ``path`` (when it exists) the lines of steps after ``step``,
    and a last line cut short (no newline: the writer died mid-line); returns how many went."""
    if not storage.exists(path):
        return 0
    lines = storage.read_text(path).splitlines(keepends=True)

    def keep(line: str) -> bool:
        if not line.endswith("\n"):
            return False
        try:
            logged = json.loads(line).get("step")
        except (ValueError, AttributeError):
            return True  # not a line of ours: left alone
        return not isinstance(logged, int) or logged <= step

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        storage.write_text_atomic(path, "".join(kept))
        log.info("%s: dropped %d line(s) after step %d, written by an earlier attempt that "
                 "stopped without a checkpoint of them", path, len(lines) - len(kept), step)
    return len(lines) - len(kept)


class MetricsWriter:
    """Writes metric dicts to JSONL, TensorBoard and (when asked) W&B; only on process 0.

    ``write(step, split, values, timing)``: ``values`` go to ``jsonl_path``, ``timing`` (wall-clock
    figures) to ``throughput.jsonl`` in the same directory; both go to TensorBoard and W&B.
    """

    def __init__(self, jsonl_path: str, tensorboard_dir: str, config: dict, *, enabled: bool,
                 wandb_project: str = "", wandb_run_name: str = "", start_step: int = 0):
        """``start_step``: the step the run starts after (the restored checkpoint's, 0 for a
        new run). What an earlier attempt wrote about later steps (it stopped after them without
        a checkpoint: killed, out of memory) is dropped, so the files hold each step once, as an
        uninterrupted run's do."""
        self.enabled = enabled
        self._jsonl = self._throughput = self._tb = self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"train.wandb_project={wandb_project!r} needs the wandb "
                                  "package: pip install wandb, or leave wandb_project empty"
                                  ) from None
            if enabled:
                self._wandb = wandb.init(project=wandb_project, name=wandb_run_name or None,
                                         config=config)
        if not enabled:
            return
        # On an object store the JSONL files are rewritten whole at each write (objects cannot be
        # appended to) and TensorBoard's event files are written locally and uploaded after each
        # flush (cloud_jax.storage).
        if jsonl_path:
            throughput = storage.join(storage.dirname(jsonl_path) or ".", THROUGHPUT_FILE)
            for path in (jsonl_path, throughput):
                drop_steps_after(path, start_step)
            self._jsonl = storage.AppendText(jsonl_path)
            self._throughput = storage.AppendText(throughput)
        if tensorboard_dir:
            from tensorboardX import SummaryWriter

            self._tb_dir = storage.StagedDir(tensorboard_dir)
            # TensorBoard hides the events of steps after start_step that older files hold.
            self._tb = SummaryWriter(self._tb_dir.local, purge_step=start_step + 1)

    def write(self, step: int, split: str, values: Mapping[str, Any],
              timing: Optional[Mapping[str, float]] = None) -> None:
        if not self.enabled:
            return
        timing = timing or {}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
            if timing:
                self._throughput.write(
                    json.dumps({"step": step, "split": split, **timing}) + "\n")
        numeric = {k: v for k, v in {**values, **timing}.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()
            self._tb_dir.sync()
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._throughput.close()
        if self._tb is not None:
            self._tb.close()
            self._tb_dir.close()
        if self._wandb is not None:
            self._wandb.finish()
