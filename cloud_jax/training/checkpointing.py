"""Orbax checkpoints of a run: train state, each host's data-iterator position, resolved config.

One ``CheckpointManager`` directory holds a step directory per checkpoint with three items:

    state   params + optimizer state + step (sharded arrays, restored into their shardings)
    data    grain iterator state, one JSON file per process (the same position in each)
    config  the resolved config as JSON

Orbax writes each checkpoint under a temporary name, adds a commit marker
(``commit_success.txt``) and renames it when complete, so a run killed mid-save (kill -9, a lost
host) leaves only a temporary directory: it is never listed as a step, is deleted on the next
start, and the run resumes from the checkpoint before. :meth:`Checkpointer.restore_latest` also
refuses a step directory without the marker and one whose files do not read back (truncated,
corrupt): it logs why and falls back to the next older checkpoint, and raises
:class:`CheckpointError` naming every path when none is usable, never starting again from step 0.
A checkpoint whose arrays do not fit the model (other shapes, missing or extra keys) is an error
naming those keys and shapes (docs/RELIABILITY.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Any, Callable, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cloud_jax import records, storage
from cloud_jax.errors import CheckpointError, ConfigError
from cloud_jax.model.config import ModelConfig
from cloud_jax.training.optim import OptimConfig

log = logging.getLogger(__name__)

# Written by orbax into a step directory as the last act of a save (for every path type).
COMMIT_MARKER = "commit_success.txt"


def is_committed(step_dir: str) -> bool:
    """Whether the save of a step directory completed (orbax wrote its commit marker)."""
    return storage.exists(storage.join(step_dir, COMMIT_MARKER))


# Config keys whose change makes a checkpoint unusable for the run: the parameter shapes, the stage
# (what the weights were trained for) and the batch size the data position counts in.
_MUST_MATCH = ("model.", "train.stage", "data.batch_pairs")
# train.* keys that change the run's result when changed between a stop and a resume (the other
# train.* keys - logging, eval, checkpoint cadence, stop_at_step - may change freely).
_TRAIN_KEYS_THAT_MATTER = ("train.total_steps", "train.grad_accum_steps", "train.on_nonfinite")
_FREE = ("train.", "output_dir", "data.num_threads", "data.prefetch_buffer_size",
         "data.tfds_dir", "data.eval_path")
# model.* keys that choose how a step computes, not what the weights are (no array of the train
# state changes with them): a resume may change them (with a warning, as for other settings that
# alter the run), e.g. to fit a slice with less memory per device, or the reward head's dropout.
COMPUTE_ONLY = ("model.attention_impl", "model.decode_attention_impl", "model.remat",
                "model.causal_block_size", "model.dtype", "model.reward_dropout")
# optim.* keys that shape the saved optimizer state (the moments' dtype, the weight-decay mask's
# wrapper): another value has other arrays than the checkpoint holds. optim.grad_clip_norm does
# too where it turns clipping on or off (0), which adds or removes the clipping's state.
OPTIM_STATE_KEYS = ("optim.mu_dtype", "optim.decay_norms_and_biases")
_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json$")
# What a checkpoint's config item records of the train order (cloud_jax.data.pipeline.GlobalOrder):
# "global", a global order cut into global batches that every host count splits the same way.
# Checkpoints written before it lack the key: each process then shuffled its own share of the rows.
DATA_ORDER_KEY = "data_order"
GLOBAL_ORDER = "global"


def check_data_order(where: str, saved_order: Optional[str], saved_processes: Optional[int],
                     processes: int, shuffle: bool) -> None:
    """Raises ConfigError where a checkpoint's data position cannot go on in this run's data
    order on ``processes`` processes; warns where it goes on in another order.

    A checkpoint of the global order (``saved_order`` GLOBAL_ORDER) goes on from its global batch
    number on any number of processes: the same global batches follow. One written before it by
    several processes, each of which shuffled its own share of the rows, is refused on another
    number of processes and goes on with a warning on as many (shuffled, its batches were not
    the global order's); unshuffled, or by one process, its order is the global one.
    """
    if saved_order == GLOBAL_ORDER or saved_processes in (None, 1):
        return
    if saved_processes != processes:
        raise ConfigError(
            f"{where} was written by a run of {saved_processes} processes before the train order "
            f"was global (each process read its own share of the rows), and this run has "
            f"{processes}: resume it on {saved_processes} processes (the mesh and devices per "
            "process may change), or set output_dir (or train.checkpoint_dir) to a new directory "
            "to start a new run. Checkpoints written from then on resume on any number of "
            "processes that divides data.batch_pairs.")
    if shuffle:
        log.warning("%s was written before the train order was global: each of its %d processes "
                    "shuffled its own share of the rows. The run goes on at the checkpoint's "
                    "batch number in the global order, so pairs of the current epoch may be read "
                    "twice or not at all; from its next checkpoint on it resumes on any number "
                    "of processes", where, saved_processes)


# data.* keys that choose which pairs each batch of the train split holds: the saved data
# position is a batch number, which another order continues from at the same number.
_DATA_ORDER = ("data.shuffle", "data.seed", "data.drop_remainder")


def compare_configs(saved: dict, current: dict, where: str) -> None:
    """Raises ConfigError for a change that breaks resuming; logs a warning for other changes
    that alter the run. A model.* or optim.* key the checkpoint lacks (written before the key
    existed) at the value every run before it had, the key's default, is no change."""
    # Through JSON, as the configs compared were: a tuple default reads back as a list.
    defaults = records.flatten(json.loads(json.dumps(
        {"model": dataclasses.asdict(ModelConfig()), "optim": dataclasses.asdict(OptimConfig())})))
    changed = {k: (old, new) for k, (old, new) in records.changes(saved, current).items()
               if not (old is None and k in defaults and defaults[k] == new)}
    fatal = [k for k in changed if k.startswith(_MUST_MATCH) and k not in COMPUTE_ONLY]
    clips = [v if v is not None else defaults["optim.grad_clip_norm"]
             for v in changed.get("optim.grad_clip_norm", ())]
    optim = [k for k in changed if k in OPTIM_STATE_KEYS] + (
        ["optim.grad_clip_norm"] if clips and (clips[0] == 0) != (clips[1] == 0) else [])
    fatal += optim
    if fatal:
        detail = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in fatal[:8])
        batch = (" (the saved data position counts batches of data.batch_pairs: on another "
                 "slice keep it and change train.grad_accum_steps or the mesh)"
                 if "data.batch_pairs" in fatal else "")
        state = (f" ({', '.join(optim)} shape{'s' if len(optim) == 1 else ''} the optimizer "
                 "state the checkpoint holds)" if optim else "")
        raise ConfigError(
            f"{where} was written by a run with a different config ({detail}). Resume with the "
            f"same settings{batch}{state}, or set output_dir (or train.checkpoint_dir) to a new "
            "directory to start a new run.")
    loose = [k for k in changed if not k.startswith(_FREE) or k in _TRAIN_KEYS_THAT_MATTER]
    if loose:
        log.warning("%s: resuming with changed settings: %s", where,
                    "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in loose[:8]))
    order = [k for k in changed if k in _DATA_ORDER]
    if order:
        log.warning("%s: %s changed, so the train split's batches may hold other pairs: the "
                    "resumed run goes on at the checkpoint's batch number in the new order, and "
                    "pairs of the current epoch may be read twice or not at all; resume with the "
                    "same %s to read each pair once per epoch", where, " and ".join(order),
                    " and ".join(order))


def _shapes(tree: Any) -> dict[str, tuple[tuple, str]]:
    """``{dotted key: (shape, dtype)}``: orbax's metadata stores tuples and named tuples by
    position and field name, which is how the key paths of the state pytree read too."""
    def name(path) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(p): (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in leaves}


class Checkpointer:
    """Saves and restores a run's checkpoints in ``directory`` (keeps the newest ``keep``)."""

    def __init__(self, directory: str, keep: int, async_save: bool = True):
        # A local path or a gs:// / s3:// URL: orbax writes either (arrays through tensorstore).
        self.directory = storage.resolve(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            # Temporary directories are saves that never finished (the process died mid-save).
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

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

    def step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def check_fits(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointError naming every key whose shape or dtype differs between
        checkpoint ``step`` and ``abstract_state``, and the keys only one of them has."""
        saved = ocp.StandardCheckpointHandler().metadata(
            epath.Path(self.step_dir(step)) / "state")
        a, b = _shapes(saved), _shapes(abstract_state)
        # Parameters first: the optimizer state mirrors them, so they say it in fewer words.
        def order(keys):
            return sorted(keys, key=lambda k: (not k.startswith("params."), k))

        problems = [f"{k}: checkpoint {a[k][0]} {a[k][1]}, model {b[k][0]} {b[k][1]}"
                    for k in order(set(a) & set(b)) if a[k] != b[k]]
        problems += [f"{k}: only in the checkpoint {a[k][0]}" for k in order(set(a) - set(b))]
        problems += [f"{k}: only in the model {b[k][0]}" for k in order(set(b) - set(a))]
        if problems:
            shown = "; ".join(problems[:12])
            more = f" (and {len(problems) - 12} more)" if len(problems) > 12 else ""
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} does not fit the model: {shown}{more}. "
                "Restore with the model config it was written with, or set output_dir (or "
                "train.checkpoint_dir) to a new directory to start a new run.")

    def data_processes(self, step: int) -> Optional[int]:
        """How many processes wrote checkpoint ``step``'s data positions (None: no file)."""
        names = storage.listdir(storage.join(self.step_dir(step), "data"))
        counts = {int(m.group(1)) for m in map(_DATA_FILE.match, names) if m}
        if len(counts) > 1:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} holds the data positions of runs of "
                f"{' and '.join(map(str, sorted(counts)))} processes; delete or move the step "
                "directory to resume from an older one")
        return counts.pop() if counts else None

    def _shared_position(self, step: int, processes: int) -> dict:
        """The one data position that the ``processes`` files of checkpoint ``step`` hold."""
        data = storage.join(self.step_dir(step), "data")
        states = [json.loads(storage.read_text(storage.join(data, f"process_{i}-of-{processes}"
                                                                  ".json")))
                  for i in range(processes)]
        if any(state != states[0] for state in states):
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)}: its {processes} processes saved different data "
                f"positions ({states}), so no other number of processes can go on from them; "
                f"resume on {processes} processes")
        return states[0]

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restores ``step`` into ``abstract_state``'s shardings and ``data_iter``'s position.

        The data position is a global batch number, the same in every process's file, so a run
        of another number of processes reads it from the files the saving run wrote (whether its
        data order allows that is :func:`check_data_order`'s to say).
        """
        self.check_fits(step, abstract_state)
        saved = self.data_processes(step)
        if saved is None or saved == jax.process_count():
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter)))
            return out["state"]
        position = self._shared_position(step, saved)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        data_iter.set_state(position)
        log.info("checkpoint %s was written by %d process(es), this run has %d: every process "
                 "goes on from the saved global batch number %s", self.step_dir(step), saved,
                 jax.process_count(), position)
        return out["state"]

    def restore_latest(self, target: Callable[[int, dict], Any],
                       data_iter: Any) -> Optional[tuple[int, Any]]:
        """Restores the newest usable checkpoint: ``(step, state)``, or None when there is none.

        ``target(step, saved_config)`` checks the saved config (raising ConfigError) and returns
        the abstract state to restore into. A step without the commit marker or whose files do
        not read back is logged and skipped for the next older one; a config or shape mismatch
        is raised at once, since an older checkpoint of the same run would not fit either.
        """
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = self.step_dir(step)
            if not is_committed(path):
                failures.append(f"{path}: no {COMMIT_MARKER}, the save did not complete")
                log.error("checkpoint %s has no commit marker %s (the save did not complete); "
                          "falling back to the previous checkpoint", path, COMMIT_MARKER)
                continue
            try:
                state = self.restore(step, target(step, self.saved_config(step)), data_iter)
            except (ConfigError, CheckpointError):
                raise
            except Exception as err:  # noqa: BLE001 - any read failure means this copy is bad
                failures.append(f"{path}: {type(err).__name__}: {err}")
                log.error("checkpoint %s does not read back (%s: %s); falling back to the "
                          "previous checkpoint", path, type(err).__name__, err)
                continue
            if failures:
                self._set_aside([s for s in self.manager.all_steps() if s > step])
                log.warning("resumed from %s after skipping %d unusable checkpoint(s): %s",
                            path, len(failures), " | ".join(failures))
            return step, state
        if failures:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: " + " | ".join(failures)
                + ". Delete or move the broken step directories to resume from an older one, "
                "or point output_dir (or train.checkpoint_dir) elsewhere to start a new run.")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unusable step directories to ``unusable.<step>.<time>``: kept for a post
        mortem, and out of the way of the resumed run, which saves those steps again."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                target = storage.join(self.directory, f"unusable.{step}.{stamp}")
                storage.rename(self.step_dir(step), target)
                log.warning("moved unusable checkpoint %s to %s", self.step_dir(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("unusable checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str, step: Optional[int] = None) -> tuple[int, Any, dict]:
    """``(step, params, saved config)`` of checkpoint ``step`` in a run's checkpoint directory
    (the newest committed one when ``step`` is None), the parameters alone as host (numpy)
    arrays: the optimizer state is not read.

    For exporting or evaluating a saved step on one host (``python -m cloud_jax export-hf
    --step``); a run resumes through :meth:`Checkpointer.restore_latest` instead.
    """
    path = storage.resolve(directory)
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))
    try:
        steps = sorted(s for s in manager.all_steps()
                       if is_committed(storage.join(path, str(s))))
        if not steps:
            raise CheckpointError(f"{directory}: no completed checkpoint (step directories with "
                                  f"{COMMIT_MARKER}); is it a training run's checkpoint "
                                  "directory?")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"{directory}: no completed checkpoint of step {step}; saved "
                                  f"steps: {', '.join(map(str, steps))}")
        step_dir = storage.join(path, str(step))
        try:
            saved = ocp.StandardCheckpointHandler().metadata(
                epath.Path(step_dir) / "state").tree
        except Exception as err:  # noqa: BLE001 - any read failure means this copy is bad
            raise _unreadable(step_dir, err, step, steps) from None
        if "params" not in saved:
            raise CheckpointError(f"{step_dir}: the saved state has no "
                                  f"params (keys: {sorted(saved)})")
        # Read straight into host arrays: nothing is placed on a device only to be copied back.
        item = {"params": jax.tree.map(lambda m: np.zeros((), m.dtype), saved["params"])}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                             partial_restore=True),
                config=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - as above
            raise _unreadable(step_dir, err, step, steps) from None
    finally:
        manager.close()
    return step, out["state"]["params"], out["config"]


def _unreadable(step_dir: str, err: Exception, step: int, steps: list[int]) -> CheckpointError:
    """The error for a committed checkpoint whose files do not read back (truncated, corrupt)."""
    others = [s for s in steps if s != step]
    hint = (f"; export another step with --step (saved steps: {', '.join(map(str, others))})"
            if others else "")
    return CheckpointError(f"checkpoint {step_dir} does not read back "
                           f"({type(err).__name__}: {' '.join(str(err).split())}){hint}")
