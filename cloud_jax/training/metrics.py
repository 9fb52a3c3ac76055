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
import time
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

# How often (seconds) a run writing to an object store uploads its metrics files and TensorBoard
# events by default (train.metrics_upload_every_s): each upload rewrites the whole object, and a
# store allows about one write per second to one object.
UPLOAD_EVERY_S = 30.0

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

    On local disk every write is in the files at once. On an object store (where each upload
    rewrites a whole object) the JSONL files and the TensorBoard event files are uploaded at the
    first write, then at most every ``upload_every_s`` seconds (0: at every write), and by
    :meth:`flush` (the training loop calls it before each checkpoint, so every line up to a
    saved step is in the bucket when its checkpoint is) and :meth:`close` (at the end of a run,
    a preempted or failed one's too).
    """

    def __init__(self, jsonl_path: str, tensorboard_dir: str, config: dict, *, enabled: bool,
                 wandb_project: str = "", wandb_run_name: str = "", start_step: int = 0,
                 upload_every_s: float = UPLOAD_EVERY_S):
        """``start_step``: the step the run starts after (the restored checkpoint's, 0 for a
        new run). What an earlier attempt wrote about later steps (it stopped after them without
        a checkpoint: killed, out of memory) is dropped, so the files hold each step once, as an
        uninterrupted run's do."""
        self.enabled = enabled
        self._jsonl = self._throughput = self._tb = self._wandb = None
        self._upload_every_s = upload_every_s
        self._uploaded_at: Optional[float] = None  # the first write uploads at once
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
        # On an object store the JSONL files are rewritten whole at each upload (objects cannot
        # be appended to) and TensorBoard's event files are written locally and uploaded
        # (cloud_jax.storage); both on the cadence of flush().
        if jsonl_path:
            throughput = storage.join(storage.dirname(jsonl_path) or ".", THROUGHPUT_FILE)
            for path in (jsonl_path, throughput):
                drop_steps_after(path, start_step)
            self._jsonl = storage.AppendText(jsonl_path, buffered=True)
            self._throughput = storage.AppendText(throughput, buffered=True)
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
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in numeric.items()}, step=step)
        if (self._uploaded_at is None or
                time.monotonic() - self._uploaded_at >= self._upload_every_s):
            self.flush()

    def flush(self) -> None:
        """Everything written so far into the files: on an object store, uploaded now."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.flush()
            self._throughput.flush()
        if self._tb is not None:
            self._tb.flush()
            self._tb_dir.sync()
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        """Uploads what is not yet in the files and closes them; every part is closed even
        when another fails (the first failure is raised then)."""
        closes = []
        if self._jsonl is not None:
            closes += [self._jsonl.close, self._throughput.close]
        if self._tb is not None:
            closes += [self._tb.close, self._tb_dir.close]
        if self._wandb is not None:
            closes.append(self._wandb.finish)
        failed = None
        for close in closes:
            try:
                close()
            except Exception as err:  # noqa: BLE001 - raised below, once the rest is closed
                failed = failed or err
        if failed is not None:
            raise failed
