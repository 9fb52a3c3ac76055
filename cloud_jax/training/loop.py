"""A training run: set-up (mesh, data, model, state or resume), the loop, eval, checkpoints.

    result = run(load_config("configs/tiny_cpu_cloud.yaml"))

Every process runs this same code; each reads its own share of every batch, and the batch enters
the jitted step as one global array. Only process 0 writes logs, metrics and the final export;
orbax coordinates the checkpoint writes of all processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import operator
import os
import signal
import threading
import time
import zlib
from typing import Any, Optional

import jax
import numpy as np
import yaml

from cloud_jax.model.config import ModelConfig
from cloud_jax.training.config import Config, config_from_dict, save_config, to_dict
from cloud_jax.checkpoints.hf import (base_model_name_of, critique_settings_of, is_hub_id,
                                      save_cloud_reference, staged_export)
from cloud_jax.data.config import DataConfig
from cloud_jax.data.pipeline import GlobalOrder, batch_iterator
from cloud_jax.data.schema import RowError
from cloud_jax.data.tfds_builder import open_split, prepare_dataset
from cloud_jax.data.tokenizer import load_tokenizer
from cloud_jax import progress, storage
from cloud_jax.errors import ConfigError
from cloud_jax.training.losses import finalize_metrics
from cloud_jax.model import count_params, init_params
from cloud_jax.sharding import (TRAIN_RULES, check_batch_split_over_processes, first_on_process_0,
                                make_mesh)
from cloud_jax.training.checkpointing import (COMPUTE_ONLY, DATA_ORDER_KEY, GLOBAL_ORDER,
                                              Checkpointer, check_data_order, compare_configs,
                                              is_committed)
from cloud_jax.training.metrics import MetricsWriter, peak_flops, summarize_window
from cloud_jax.training.stages import stage as stage_record
from cloud_jax.training.step import StepBuilder, model_flops_per_token

log = logging.getLogger(__name__)

# Architecture fields a checkpoint named by init_from must agree on with the run's model section:
# they fix the weights' shapes.
_ARCH_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "resolved_head_dim", "tie_word_embeddings",
                "attention_bias")
# Run-time choices of the model section that apply to weights loaded with init_from.
_COMPUTE_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "reward_dropout",
                   "causal_block_size", "attention_impl", "decode_attention_impl")


# Every path a run reads or writes: each a local path or a gs:// / s3:// URL (cloud_jax.storage);
# the data paths may also be Hugging Face hub datasets (hf://owner/name).
_RUN_PATHS = ("output_dir", "init_from", "train.checkpoint_dir", "train.metrics_file",
              "train.tensorboard_dir", "data.train_path", "data.eval_path", "data.tfds_dir",
              "data.rejects_path")

# The run paths it writes (init_from and the rows are read).
_OUTPUT_PATHS = ("output_dir", "train.checkpoint_dir", "train.metrics_file",
                 "train.tensorboard_dir", "data.tfds_dir", "data.rejects_path")

# The key of a checkpoint's config item that holds the train split's fingerprint
# (PreparedDataset.split_fingerprints) beside the config's own sections.
TRAIN_DATA_KEY = "train_data_fingerprint"


def check_paths(cfg: Config) -> None:
    """A ConfigError, before anything is written, for a URL the run cannot use: an unknown
    scheme, one whose client library is not installed, or an output in a bucket that does not
    exist (found before the data is prepared, not at the first write); and a local init_from
    that does not exist and is no hub id (found before the rows are tokenized, not after)."""
    for key in _RUN_PATHS:
        value = operator.attrgetter(key)(cfg)
        rows = key in ("data.train_path", "data.eval_path")
        for part in value.split(",") if rows else [value]:
            part = part.strip()
            if rows and part.startswith("hf://"):
                continue  # a Hugging Face hub dataset, read by `datasets`
            storage.check_path(part, key)
    checkpoints = run_checkpoint_dir(cfg.train.checkpoint_dir, cfg.output_dir)
    if storage.scheme(checkpoints) not in storage.CHECKPOINT_SCHEMES:
        raise ConfigError(
            f"checkpoints would go to {checkpoints!r}: orbax writes checkpoint arrays to local "
            f"disk or {', '.join(s + '://' for s in storage.CHECKPOINT_SCHEMES if s)} only (its "
            "tensorstore path has no s3:// support). Set train.checkpoint_dir to a gs:// or local "
            "directory; the other run paths may stay on s3://.")
    init = cfg.init_from
    if init and not storage.is_url(init) and not os.path.exists(init) and not is_hub_id(init):
        raise ConfigError(f"init_from={init!r}: no such directory here "
                          f"({os.path.abspath(init)}), and not a hub id (owner/name); give the "
                          "path of a stage's checkpoint (its final/ directory), a gs:// or s3:// "
                          "one, or a hub id")
    # Last: these ask the store.
    for key in _OUTPUT_PATHS:
        storage.check_bucket(operator.attrgetter(key)(cfg), key)


def follow_init_from(cfg: Config) -> Config:
    """``cfg`` with the critique prefix and layout version of the init_from export, where that
    model was trained to write critiques (it records ``critique_prefix``: a critique_sft or cloud
    export) and the stage's rows carry critiques. As scoring resolves them: a data key left at
    its default takes the recorded value (logged); a key set to another value than the recorded
    one is kept, with a warning naming both. Without this a cloud stage left at the default
    prefix trained after another text than its critique_sft model (and stage 2's critiques)."""
    if not cfg.init_from or not stage_record(cfg.train.stage).needs_feedback:
        return cfg
    recorded = critique_settings_of(cfg.init_from)
    if recorded is None:
        return cfg
    defaults, data = DataConfig(), cfg.data
    for key, value in zip(("critique_prefix", "layout_version"), recorded):
        mine = getattr(data, key)
        if mine == value:
            continue
        if mine == getattr(defaults, key):
            log.info("init_from=%s records %s %r: the run uses it (data.%s is at its default, "
                     "%r)", cfg.init_from, key, value, key, mine)
            data = dataclasses.replace(data, **{key: value})
        else:
            log.warning("data.%s=%r, but init_from=%s was trained with %r (and stage 2 writes "
                        "its critiques after that model's); set data.%s=%r to train as it was",
                        key, mine, cfg.init_from, value, key, value)
    return dataclasses.replace(cfg, data=data)


def run_checkpoint_dir(checkpoint_dir: str, output_dir: str) -> str:
    """Where a run's checkpoints are: train.checkpoint_dir, by default <output_dir>/checkpoints."""
    return _resolve(checkpoint_dir or "checkpoints", output_dir)


def _resolve(path: str, output_dir: str) -> str:
    """A run path: absolute or a URL as given, else relative to output_dir."""
    if not path or storage.is_url(path) or os.path.isabs(path):
        return path
    return storage.join(output_dir, path)


def _is_main() -> bool:
    return jax.process_index() == 0


# The errors of a failed build on process 0 that the other hosts report as config errors (bad rows,
# no usable pair, a row file that is not there), so that every host exits with the same status.
_DATA_USER_ERRORS = (ConfigError, RowError, FileNotFoundError, IsADirectoryError,
                     NotADirectoryError, PermissionError)


def load_fitting_tokenizer(cfg: Config):
    """cfg.data.tokenizer, or a ConfigError where it does not load or holds more tokens than
    model.vocab_size."""
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} does not load ({err}); give "
                          "'byte', a tokenizer directory or a hub id") from None
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {cfg.data.tokenizer!r} has {len(tok)} tokens but "
                          f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    return tok


def prepare_data(cfg: Config):
    """Tokenizer and the tokenized dataset. On several hosts process 0 builds (or reuses, or
    downloads) the dataset first and the others wait for it (cloud_jax.sharding.
    first_on_process_0), then find it built where they share data.tfds_dir, or build their own
    where they do not; where process 0's build fails, the others stop with its error."""
    record = stage_record(cfg.train.stage)
    tok = load_fitting_tokenizer(cfg)
    dataset = first_on_process_0(
        lambda: prepare_dataset(cfg.data, tok, record.layout,
                                require_feedback=record.needs_feedback),
        "prepare_data", f"prepare the tokenized dataset in data.tfds_dir={cfg.data.tfds_dir!r}",
        user_errors=_DATA_USER_ERRORS)
    return tok, dataset


def batches_available(cfg: Config, num_records: int) -> int:
    """Train batches the pipeline yields over all epochs (the same on every host, whatever the
    host count)."""
    return len(GlobalOrder(num_records, cfg.data.batch_pairs, shuffle=False,
                           num_epochs=cfg.data.num_epochs,
                           drop_remainder=cfg.data.drop_remainder))


def check_batch_layout(cfg: Config, mesh) -> None:
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    tc = cfg.train
    per_micro, rest = divmod(cfg.data.batch_pairs, tc.grad_accum_steps)
    if rest or per_micro % data_shards:
        raise ConfigError(
            f"data.batch_pairs={cfg.data.batch_pairs} must be a multiple of "
            f"train.grad_accum_steps={tc.grad_accum_steps} x the data-parallel size "
            f"{data_shards} (mesh data x fsdp), so every micro-batch splits evenly over devices")


def check_positions(cfg: Config, model_cfg: ModelConfig) -> None:
    """A ConfigError where data.max_length is beyond the positions ``model_cfg`` (the run's
    model: the model section, or init_from's checkpoint) was built for: RoPE would run past
    them without a word."""
    if cfg.data.max_length <= model_cfg.max_position_embeddings:
        return
    if cfg.init_from:
        whose = f"init_from={cfg.init_from!r} has"
        fix = "lower data.max_length"
    else:
        whose = "the model section sets"
        fix = "lower data.max_length or raise model.max_position_embeddings"
    raise ConfigError(
        f"data.max_length={cfg.data.max_length} is more than model.max_position_embeddings="
        f"{model_cfg.max_position_embeddings} ({whose}): sequences would run past the positions "
        f"the model was built for; {fix} (to at most {model_cfg.max_position_embeddings})")


def _initial_params(cfg: Config, mesh) -> tuple[Any, ModelConfig]:
    if not cfg.init_from:
        return init_params(cfg.model, jax.random.key(cfg.seed), mesh, TRAIN_RULES), cfg.model
    from cloud_jax.checkpoints import hf as hf_io

    overrides = {k: getattr(cfg.model, k) for k in _COMPUTE_FIELDS}
    loaded_cfg, params, directory, _ = hf_io.load_model_dir(
        cfg.init_from, mesh=mesh, rules=TRAIN_RULES, rng=jax.random.key(cfg.seed), **overrides)
    model = cfg.model
    if model.family == "qwen2":
        # Qwen2 has bias on q/k/v by definition (every Qwen2 checkpoint carries it): the family
        # implies attention_bias, whether or not the model section says so.
        model = dataclasses.replace(model, attention_bias=True)
    defaults = ModelConfig()

    def differ(fields, given_only=False):
        # given_only: a key the model section leaves at its default (None or empty for the
        # token ids and sliding_window; rope_theta, max_position_embeddings and such at
        # ModelConfig's values) is not given, so it takes the checkpoint's value without a word.
        return [f"{k.replace('resolved_', '')}: config {getattr(model, k)!r}, checkpoint "
                f"{getattr(loaded_cfg, k)!r}" for k in fields
                if getattr(model, k) != getattr(loaded_cfg, k)
                and not (given_only and getattr(model, k) == getattr(defaults, k))]

    diff = differ(_ARCH_FIELDS)
    if diff:
        raise ConfigError(f"init_from={cfg.init_from!r} ({directory}) does not match the model "
                          f"section: {'; '.join(diff)}. Fix model.* or init_from.")
    # The rest of the architecture (RoPE, norm epsilon, context length, sliding window, special
    # token ids) is what the weights were trained with: the checkpoint's is used, and a model
    # section that says otherwise is told so.
    others = [f.name for f in dataclasses.fields(ModelConfig)
              if f.name not in _ARCH_FIELDS + _COMPUTE_FIELDS + ("head_dim",)]
    ignored = differ(others, given_only=True)
    if ignored:
        log.warning("init_from=%s: the checkpoint's values are used for model.* keys the model "
                    "section sets otherwise (%s); match them to silence this", cfg.init_from,
                    "; ".join(ignored))
    log.info("initial weights from %s", directory)
    return params, loaded_cfg


def _row_keys(local: dict) -> np.ndarray:
    """``[P, 2]`` int32: each row's pair index and a CRC-32 of its real tokens (both sides), which
    no length bucket or padding changes: what the batch digest is made of."""
    keys = np.empty((local["pair_index"].shape[0], 2), np.int32)
    keys[:, 0] = local["pair_index"]
    for i, (ids, mask) in enumerate(zip(local["input_ids"], local["attention_mask"])):
        crc = 0
        for side in range(ids.shape[0]):
            real = ids[side][mask[side] == 1].astype(np.int32)
            crc = zlib.crc32(np.int32(len(real)).tobytes() + real.tobytes(), crc)
        keys[i, 1] = np.uint32(crc).view(np.int32)
    return keys


def _agree_across_hosts(local: dict,
                        signalled: bool = False) -> tuple[dict, bool, np.ndarray]:
    """Pads every host's batch to the longest host's length bucket (the global array needs one
    shape, and each host picks its bucket from its own rows), tells whether any host has been
    sent SIGTERM (``signalled`` is this host's word), and gives the global batch's row keys
    (:func:`_row_keys` of every host's rows, in host order: the rows of the global batch). One
    gather per step, so that every host sees the same answers at the same step."""
    keys = _row_keys(local)
    if jax.process_count() == 1:
        return local, signalled, keys
    from jax.experimental import multihost_utils

    length = local["input_ids"].shape[-1]
    mine = np.concatenate([np.array([length, signalled], np.int32), keys.ravel()])
    gathered = multihost_utils.process_allgather(mine).reshape(jax.process_count(), -1)
    longest, anyone = (int(v) for v in np.max(gathered[:, :2], axis=0))
    keys = gathered[:, 2:].reshape(-1, 2)
    if longest == length:
        return local, bool(anyone), keys
    pad = longest - length
    return {k: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)]) if v.ndim == 3 else v
            for k, v in local.items()}, bool(anyone), keys


class Evaluator:
    """Runs the eval step over the eval split (or its first ``eval_batches`` batches)."""

    def __init__(self, cfg: Config, builder: StepBuilder, source):
        self.cfg, self.builder, self.source = cfg, builder, source

    def __call__(self, params) -> dict[str, float]:
        # Every eval pair counts: the last partial batch is filled with padding pairs that
        # the metrics leave out, whatever data.drop_remainder does to the train split.
        data = dataclasses.replace(self.cfg.data, drop_remainder=False)
        it = batch_iterator(data, self.source, shuffle=False, num_epochs=1)
        step = self.builder.eval_step()
        sums = None
        for i, local in enumerate(it):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            out = step(params, self.builder.device_batch(_agree_across_hosts(local)[0]))
            sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        if sums is None:
            return {}
        return {k: float(v) for k, v in finalize_metrics(jax.device_get(sums)).items()}


def _export_final(cfg: Config, model_cfg: ModelConfig, params, tokenizer) -> Optional[str]:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    else:
        params = jax.device_get(params)
    if not _is_main():
        return None
    return export_params(cfg, model_cfg, params, tokenizer, storage.join(cfg.output_dir, "final"))


def export_params(cfg: Config, model_cfg: ModelConfig, params, tokenizer, out: str) -> str:
    """Writes ``params`` of a run of ``cfg`` to ``out`` (a local path or URL) as a CLoud directory
    (``cloud_jax.load``, init_from of a later stage), with the stage's feedback method and
    critique prefix and the tokenizer."""
    record = stage_record(cfg.train.stage)
    prefix = cfg.data.critique_prefix if record.exports_critique_prefix else None
    # The hub id the run descends from (init_from's, carried through every stage), so the export
    # loads on any machine; none for a model trained from scratch (checkpoints.hf.LOCAL_BASE).
    base = base_model_name_of(cfg.init_from) if cfg.init_from else None
    with staged_export(out) as local:
        save_cloud_reference(params, model_cfg, local, feedback_method=record.feedback_method,
                             critique_prefix=prefix, base_model_name_or_path=base,
                             layout_version=cfg.data.layout_version)
        if tokenizer is not None:
            tokenizer.save_pretrained(local)
    log.info("weights written to %s (a CLoud directory: init_from / cloud_jax.load)", out)
    return out


def is_run_dir(path: str) -> bool:
    """Whether ``path`` is a training run's output_dir (its config.yaml beside the checkpoints)."""
    return storage.isfile(storage.join(path, "config.yaml"))


def is_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` is a run's checkpoint directory: no config.json, and step directories
    that orbax committed."""
    if storage.isfile(storage.join(path, "config.json")):
        return False
    return any(name.isdigit() and is_committed(storage.join(path, name))
               for name in storage.listdir(path))


def load_checkpoint(path: str, step: Optional[int] = None, tokenizer: Optional[str] = None):
    """``(step, cfg, params, tokenizer)`` of a saved training step, the parameters on the host:
    ``path`` is a run's output_dir (its train.checkpoint_dir is read from its config.yaml) or
    the checkpoint directory itself; ``step`` None takes the newest completed checkpoint. The
    tokenizer is the run's data.tokenizer unless ``tokenizer`` names another (a relative path in
    the run's config resolves from the current directory)."""
    from cloud_jax.training.checkpointing import restore_params

    checkpoints = path
    if is_run_dir(path):
        run = yaml.safe_load(storage.read_text(storage.join(path, "config.yaml"))) or {}
        checkpoints = run_checkpoint_dir((run.get("train") or {}).get("checkpoint_dir"), path)
    step, params, saved = restore_params(checkpoints, step)
    saved = {k: v for k, v in saved.items() if k not in (TRAIN_DATA_KEY, DATA_ORDER_KEY)}
    cfg = config_from_dict(saved, source=f"the config saved with step {step} in {checkpoints}")
    name = tokenizer or cfg.data.tokenizer
    try:
        tok = load_tokenizer(name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"the run's tokenizer {name!r} does not load here ({err}); name it "
                          "with --tokenizer (a directory or hub id, or 'byte')") from None
    return step, cfg, params, tok


def _stop_if_nonfinite(window: list, step: int, ckpt: Checkpointer) -> None:
    """train.on_nonfinite=error: raises FloatingPointError naming the first non-finite step of
    ``window`` (the per-step metrics of the steps up to ``step``)."""
    flags = jax.device_get([m["nonfinite"] for m in window])
    bad = np.flatnonzero(flags)
    if not bad.size:
        return
    first = step - len(window) + 1 + int(bad[0])
    m = jax.device_get(window[int(bad[0])])
    ckpt.wait()
    saved = ckpt.manager.latest_step()
    kept = (f"the newest checkpoint is step {saved} in {ckpt.directory}" if saved is not None
            else "no checkpoint was written")
    raise FloatingPointError(
        f"step {first}: non-finite loss, gradient norm or updated parameters (loss "
        f"{float(m['loss'])}, grad_norm {float(m['grad_norm'])}); the run stops without saving "
        f"it ({kept}). Lower optim.learning_rate, check the data, or set "
        "train.on_nonfinite=skip to skip such steps")


class _PreemptionWatch:
    """Notices preemption (SIGTERM) and says at which step the run stops, and saves.

    One process: after the step under way when the signal came. The watch starts once the step
    loop is set up; a SIGTERM before that (data preparation, a restore, compilation) stops the
    command where it lands (cloud_jax.cli.common.run_command).

    Several hosts: after the first step whose gather (_agree_across_hosts) carries some host's
    signal, the same step on every host whichever of them got it. The watch starts before the
    data are prepared, so a SIGTERM before the step loop is kept for its first step: a host
    leaving on its own there would leave the others waiting in a cross-host operation."""

    def __init__(self):
        self.signalled, self.started, self.previous = False, False, None

    def start(self) -> None:
        if not self.started and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)
            self.started = True

    def _on_signal(self, signum, frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after the current step, then stopping%s",
                    " (every host stops at the same step)" if jax.process_count() > 1 else "")
        self.signalled = True

    def reached(self, anyone: bool) -> bool:
        """Whether to stop after this step; ``anyone``: _agree_across_hosts's answer for it."""
        return self.signalled if jax.process_count() == 1 else anyone

    def close(self) -> None:
        if self.started and self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        self.started = False


def _restore_or_init(cfg: Config, mesh, ckpt: Checkpointer, data_iter,
                     train_data: str = "") -> tuple[StepBuilder, dict]:
    """The step builder and train state of the latest checkpoint in ``ckpt`` (``data_iter`` is
    moved to its position), or fresh ones when there is none. ``train_data``: the train split's
    fingerprint, compared with the one the checkpoint was written with."""
    # Through JSON, as the saved config was: tuples read back as lists.
    current = json.loads(json.dumps(to_dict(cfg)))
    compute_only = [k.split(".", 1)[1] for k in COMPUTE_ONLY]
    builder: Optional[StepBuilder] = None

    def restore_target(step: int, saved: dict):
        # The builder is made from the saved architecture, which is only known here.
        nonlocal builder
        # The keys that choose how a step computes (COMPUTE_ONLY) may change on a resume: this
        # run's values are used.
        model_cfg = config_from_dict(
            {**saved["model"], **{k: current["model"][k] for k in compute_only}},
            schema=ModelConfig).validate()
        saved = dict(saved)
        saved_data = saved.pop(TRAIN_DATA_KEY, None)
        check_data_order(f"checkpoint {ckpt.step_dir(step)}", saved.pop(DATA_ORDER_KEY, None),
                         ckpt.data_processes(step), jax.process_count(), cfg.data.shuffle)
        if saved_data and train_data and saved_data != train_data:
            log.warning("%s: the train split's rows, or how they are tokenized, changed since "
                        "this checkpoint was written (data fingerprint %s -> %s): the resumed "
                        "run's batches are not those an uninterrupted run would have read",
                        ckpt.step_dir(step), saved_data, train_data)
        mine = dict(current)
        if cfg.init_from:
            # The architecture came from the init_from checkpoint, not from the model section;
            # its dtypes, remat and such from the model section (_COMPUTE_FIELDS).
            mine["model"] = {**saved["model"],
                             **{k: current["model"][k] for k in _COMPUTE_FIELDS}}
        compare_configs(saved, mine, f"checkpoint {ckpt.step_dir(step)}")
        builder = StepBuilder(cfg, mesh, TRAIN_RULES, model_cfg)
        return builder.abstract_state()

    restored = ckpt.restore_latest(restore_target, data_iter)
    if restored is not None:
        log.info("resumed from %s step %d", ckpt.directory, restored[0])
        return builder, restored[1]
    params, model_cfg = _initial_params(cfg, mesh)
    builder = StepBuilder(cfg, mesh, TRAIN_RULES, model_cfg)
    return builder, builder.init_state(params)


def _with_total_steps(cfg: Config, num_pairs: int) -> Config:
    """``cfg`` with train.total_steps resolved (0: every batch of the train split's epochs),
    checked against the batches the split gives."""
    available = batches_available(cfg, num_pairs)
    if available == 0:
        raise ConfigError(
            f"the train split gives no batch: {num_pairs} pairs make no full batch of "
            f"data.batch_pairs={cfg.data.batch_pairs} with "
            "data.drop_remainder=true; lower data.batch_pairs, set data.drop_remainder=false "
            "(the last batch is then filled with padding pairs) or add rows")
    if cfg.train.total_steps == 0:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_steps=available))
        log.info("train.total_steps=0: %d steps, %d epoch(s) of the train split", available,
                 cfg.data.num_epochs)
    tc = cfg.train.validate()
    if available < tc.total_steps:
        raise ConfigError(
            f"the train split gives {available} batches ({num_pairs} pairs, "
            f"data.batch_pairs={cfg.data.batch_pairs}, data.num_epochs={cfg.data.num_epochs}) "
            f"but train.total_steps={tc.total_steps}; raise data.num_epochs or lower "
            "train.total_steps")
    return cfg


class _LogWindow:
    """The steps since the last log line: their metrics, model FLOPs per token, a digest of the
    global batches they read (their rows' pair indices and tokens, in order: the same on any
    number of hosts), and the time they took (compilation, evaluation and checkpoint saves
    excluded)."""

    def __init__(self, train_step, peak: Optional[float]):
        self._step_fn, self._peak = train_step, peak
        self._reset()

    def _reset(self) -> None:
        self.metrics: list = []
        self._flops_per_token: list = []
        self._digest = hashlib.sha1()
        self._t0, self._compile0 = time.perf_counter(), self._step_fn.compile_seconds

    def add(self, row_keys: np.ndarray, metrics: dict, flops_per_token: float) -> None:
        self._digest.update(np.ascontiguousarray(row_keys, np.int32).tobytes())
        self.metrics.append(metrics)
        self._flops_per_token.append(flops_per_token)

    def exclude(self, seconds: float) -> None:
        self._t0 += seconds

    def flush(self) -> tuple[dict, dict]:
        """(averaged metrics with the batch digest, throughput), and a new window."""
        values = summarize_window(self.metrics)
        elapsed = (time.perf_counter() - self._t0
                   - (self._step_fn.compile_seconds - self._compile0))
        timing = {"tokens_per_s": values["tokens"] / max(elapsed, 1e-9)}
        if self._peak:
            tokens = jax.device_get([m["tokens"] for m in self.metrics])
            flops = float(np.dot(self._flops_per_token, tokens))
            timing["mfu"] = flops / max(elapsed, 1e-9) / (self._peak * jax.device_count())
        values["batch_digest"] = self._digest.hexdigest()[:16]
        self._reset()
        return values, timing


def run(cfg: Config) -> dict:
    """Trains (or resumes) ``cfg`` up to train.stop_at_step or train.total_steps.

    SIGTERM (how preemption arrives) ends the run after the current step with a completed
    checkpoint of that step (``"preempted": True``); on several hosts, after the same step on
    every host, whichever of them got it, and also when it came before the step loop
    (_PreemptionWatch).
    With train.on_nonfinite=error a non-finite step raises FloatingPointError naming it, before
    anything after it is saved.

    Returns a summary: ``{"step", "preempted", "train": last logged train metrics (with that
    window's tokens_per_s and, where the peak is known, mfu), "eval":
    last eval metrics, "final_dir", "data": the dataset's build counts per split (rows,
    rejected, dropped over-length, prompt-truncated), "compile_reports"}``.
    """
    if not cfg.data.train_path.strip():
        raise ConfigError("data.train_path is empty: give the train rows (JSONL, JSON or Parquet "
                          "files, a glob, or a Hugging Face dataset), e.g. "
                          "data.train_path=runs/toy_data/train.jsonl")
    if not cfg.output_dir.strip():
        # Else the run's files land in the current directory, and a later run there resumes
        # from its checkpoints.
        raise ConfigError("output_dir is empty: name the run's directory, e.g. "
                          "output_dir=runs/my_run (output_dir=. for the current directory)")
    check_paths(cfg)
    cfg = follow_init_from(cfg)
    mesh = make_mesh(cfg.mesh)
    platform = mesh.devices.flat[0].platform
    if cfg.model.attention_impl == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention_impl=cudnn runs on NVIDIA GPUs only (cuDNN's flash "
                          f"attention); this run's devices are {platform}: set "
                          "model.attention_impl=xla")
    check_batch_layout(cfg, mesh)
    check_batch_split_over_processes(mesh, TRAIN_RULES)
    if not cfg.init_from:  # the model section is the model (init_from's is checked once read)
        check_positions(cfg, cfg.model)
    # One run at a time in an output directory: a second one would interleave its checkpoints
    # and metrics with this one's. Process 0 holds it for every process of its job.
    preemption = _PreemptionWatch()
    if jax.process_count() > 1:
        preemption.start()
    try:
        with (storage.hold_dir(cfg.output_dir, "output_dir") if _is_main()
              else contextlib.nullcontext()):
            return _train(cfg, mesh, preemption)
    finally:
        # Last: until the checkpoint manager is closed, a SIGTERM is only noted.
        preemption.close()


def _train(cfg: Config, mesh, preemption: _PreemptionWatch) -> dict:
    """run() from the data on, with the output directory held."""
    tokenizer, dataset = prepare_data(cfg)
    train_source = open_split(dataset, "train")
    cfg = _with_total_steps(cfg, len(train_source))
    tc = cfg.train
    end_step = tc.stop_at_step or tc.total_steps
    eval_source = open_split(dataset, "eval") if cfg.data.eval_path else None
    if eval_source is not None and len(eval_source) < jax.process_count():
        raise ConfigError(f"the eval split (data.eval_path) has {len(eval_source)} pair(s) for "
                          f"{jax.process_count()} process(es): every process needs one; add "
                          "rows or leave data.eval_path empty")

    ckpt = Checkpointer(run_checkpoint_dir(tc.checkpoint_dir, cfg.output_dir),
                        tc.keep_checkpoints, tc.async_checkpointing)
    # Until the loop's `finally` below takes them over, a failure while setting up (no usable
    # checkpoint, a model that does not fit, a compile error) closes what is open, so that a
    # caller going on in the same process is not left with the checkpoint manager's threads.
    with contextlib.ExitStack() as setup:
        setup.callback(ckpt.close)
        data_iter = batch_iterator(cfg.data, train_source)
        train_data = dataset.split_fingerprints.get("train", "")
        builder, state = _restore_or_init(cfg, mesh, ckpt, data_iter, train_data)
        model_cfg = builder.model_cfg
        check_positions(cfg, model_cfg)
        resolved = dataclasses.replace(cfg, model=model_cfg)
        resolved_dict = to_dict(resolved)
        # What a checkpoint's config item holds: the resolved config, the train split's
        # fingerprint and the data order its position counts in.
        checkpoint_config = {**resolved_dict, TRAIN_DATA_KEY: train_data,
                             DATA_ORDER_KEY: GLOBAL_ORDER}
        start_step = int(jax.device_get(state["step"]))
        if start_step > tc.total_steps:
            # Nothing would run and nothing would be exported, yet the run would end as finished.
            raise ConfigError(
                f"the newest checkpoint in {ckpt.directory} is step {start_step}, past "
                f"train.total_steps={tc.total_steps}: raise train.total_steps to at least "
                f"{start_step} to go on from it, or set output_dir (or train.checkpoint_dir) to a "
                "new directory to start a new run")
        if tc.stop_at_step and start_step >= tc.stop_at_step:
            # Ends as a finished stop would, so say why nothing ran.
            log.warning("the newest checkpoint in %s is step %d, already at or past "
                        "train.stop_at_step=%d: nothing to train; raise train.stop_at_step (up to "
                        "train.total_steps=%d) or leave it unset to go on", ckpt.directory,
                        start_step, tc.stop_at_step, tc.total_steps)
        if _is_main():
            save_config(resolved, storage.join(cfg.output_dir, "config.yaml"))
        n_params = count_params(state["params"])
        log.info("stage %s: %s parameters, steps %d -> %d of %d, mesh %s, %d process(es)",
                 tc.stage, f"{n_params:,}", start_step, end_step, tc.total_steps,
                 dict(mesh.shape), jax.process_count())

        writer = MetricsWriter(_resolve(tc.metrics_file, cfg.output_dir),
                               _resolve(tc.tensorboard_dir, cfg.output_dir), resolved_dict,
                               enabled=_is_main(), wandb_project=tc.wandb_project,
                               wandb_run_name=tc.wandb_run_name, start_step=start_step,
                               upload_every_s=tc.metrics_upload_every_s)
        setup.callback(writer.close)
        evaluator = Evaluator(cfg, builder, eval_source) if eval_source is not None else None
        train_step = builder.train_step()
        peak = peak_flops(jax.devices()[0].device_kind, tc.peak_flops_per_device)
        summary: dict = {"step": start_step, "train": {}, "eval": {}, "final_dir": None,
                         "data": dataset.stats, "preempted": False}
        window = _LogWindow(train_step, peak)
        # A tqdm bar on a terminal; in a log (a pod worker's) a plain line every 30 seconds, as
        # carriage-return redraws there would pile up in front of every log line.
        bar = progress.bar(tc.total_steps, "steps", desc=tc.stage, initial=start_step,
                           disable=not (_is_main() and tc.progress_bar))
        setup.callback(bar.close)
        preemption.start()
        setup.pop_all()
    try:
        for step in range(start_step + 1, end_step + 1):
            local = next(data_iter)
            agreed, anyone_signalled, row_keys = _agree_across_hosts(local,
                                                                     preemption.signalled)
            batch = builder.device_batch(agreed)
            state, metrics = train_step(state, batch)
            window.add(row_keys, metrics,
                       model_flops_per_token(model_cfg, batch["input_ids"].shape[-1], tc.stage))
            bar.update(1)
            preempted = preemption.reached(anyone_signalled)
            if preempted and step == end_step:
                # The run ends at this step anyway, with its checkpoint (and export): it is
                # finished, not preempted, and there is nothing for a relaunch to do.
                log.warning("SIGTERM during the last step (%d): finishing the run", step)
                preempted = False
            save_now = ((tc.checkpoint_every and step % tc.checkpoint_every == 0)
                        or step == end_step or preempted)
            # A window also ends at each checkpoint: a run resumed from it drops what was logged
            # after it, so a window across it would lose the steps before it.
            log_now = step % tc.log_every == 0 or save_now
            eval_now = evaluator is not None and tc.eval_every and (step % tc.eval_every == 0
                                                                    or step == end_step)
            if tc.on_nonfinite == "error" and (log_now or save_now or eval_now):
                # Before any save: the state after a non-finite step must never be checkpointed.
                _stop_if_nonfinite(window.metrics, step, ckpt)
            if log_now:
                values, timing = window.flush()
                writer.write(step, "train", values, timing)
                loss = values["loss"]  # None: every step of the window was skipped
                bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}",
                                tokens_per_s=f"{timing['tokens_per_s']:.0f}", refresh=False)
                summary["train"] = {**values, **timing}
            if eval_now:
                start = time.perf_counter()
                summary["eval"] = evaluator(state["params"])
                writer.write(step, "eval", summary["eval"])
                log.info("eval at step %d: %s", step, summary["eval"])
                window.exclude(time.perf_counter() - start)
            if save_now:
                # Like an evaluation, no step's work: kept out of the next window's throughput.
                start = time.perf_counter()
                # Every line up to this step is in the metrics files (in the bucket) before its
                # checkpoint can be: a run resumed from it keeps those lines and drops the rest.
                writer.flush()
                ckpt.save(step, state, data_iter, checkpoint_config)
                window.exclude(time.perf_counter() - start)
            summary["step"] = step
            if preempted:
                ckpt.wait()
                log.warning("preempted: checkpoint of step %d written to %s; the same command "
                            "resumes from it", step, ckpt.step_dir(step))
                summary["preempted"] = True
                break
        ckpt.wait()
        if tc.export_final and end_step == tc.total_steps and summary["step"] == end_step:
            summary["final_dir"] = _export_final(cfg, model_cfg, state["params"], tokenizer)
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    summary["compile_reports"] = list(train_step.reports)
    return summary
