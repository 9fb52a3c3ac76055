"""Orbax checkpoints of a run: train state, each host's data-iterator position, resolved config.

One ``CheckpointManager`` directory holds a step directory per checkpoint with three items:

    state   params + optimizer state + step (sharded arrays, restored into their shardings)
    data    grain iterator state, one JSON file per process
    config  the resolved config as JSON

Orbax writes each checkpoint under a temporary name and renames it when complete, so
``latest_step`` only ever sees complete checkpoints and a run killed mid-save resumes from the
one before.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp

from cloud_jax.errors import ConfigError

log = logging.getLogger(__name__)

# Config keys whose change makes a checkpoint unusable for the run: the parameter shapes, the stage
# (what the weights were trained for) and the batch size the data position counts in.
_MUST_MATCH = ("model.", "train.stage", "data.batch_pairs")
# train.* keys that change the run's result when changed between a stop and a resume (the other
# train.* keys - logging, eval, checkpoint cadence, stop_at_step - may change freely).
_TRAIN_KEYS_THAT_MATTER = ("train.total_steps", "train.grad_accum_steps", "train.on_nonfinite")
_FREE = ("train.", "output_dir", "data.num_threads", "data.prefetch_buffer_size",
         "data.tfds_dir", "data.eval_path")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def compare_configs(saved: dict, current: dict, where: str) -> None:
    """Raises ConfigError for a change that breaks resuming; logs a warning for other changes
    that alter the run."""
    a, b = _flatten(saved), _flatten(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    fatal = [k for k in changed if k.startswith(_MUST_MATCH)]
    if fatal:
        detail = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in fatal[:8])
        raise ConfigError(
            f"{where} was written by a run with a different config ({detail}). Resume with the "
            "same settings, or set output_dir (or train.checkpoint_dir) to a new directory to "
            "start a new run.")
    loose = [k for k in changed if not k.startswith(_FREE) or k in _TRAIN_KEYS_THAT_MATTER]
    if loose:
        log.warning("%s: resuming with changed settings: %s", where,
                    "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in loose[:8]))


class Checkpointer:
    """Saves and restores a run's checkpoints in ``directory`` (keeps the newest ``keep``)."""

    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: dict) -> None:
        """Starts writing checkpoint ``step``; with async saving it finishes in the background.

        The device arrays are copied to the host before this returns, so ``state`` may be donated
        to the next train step right away.
        """
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config)), force=True)

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restores ``step`` into ``abstract_state``'s shardings and ``data_iter``'s position."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
