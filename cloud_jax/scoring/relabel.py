"""Stage 2 (self-critique): the critique-SFT model rewrites every critique of a dataset.

    summary = relabel(rm, rows, "DIR", ScoreConfig(max_critique_tokens=512),
                      RelabelSettings(checkpoint="runs/sft/final", input_paths=[...]))

``python -m cloud_jax critique`` (:mod:`cloud_jax.cli.critique`) is this function's command.

For every row, new ``chosen_feedback`` and ``rejected_feedback`` are sampled (greedy by default)
and the row is written in the format the ``cloud`` stage reads, plus
``chosen_feedback_truncated`` / ``rejected_feedback_truncated`` (the critique hit the token
budget). Rows go to shards ``DIR/critiques-SSSSS-of-NNNNN.jsonl`` of ``--shard-rows`` rows each;
``DIR/provenance.json`` records the checkpoint, its step, a digest of its weights, the seed and
every sampling setting.

Resuming: a shard file appears only when complete (written to a temporary name, then renamed),
so a rerun after an interruption skips the finished shards and redoes the rest. Critiques depend
on the seed and each input's tokens only, so the files are identical to an uninterrupted run.
A rerun with other settings into the same directory is refused. A glob over an unfinished set of
shards is refused by the row readers (:func:`cloud_jax.data.schema.expand_paths`).

Several hosts: each process takes the shards ``s`` with ``s % num_hosts == host`` and samples
them on its own devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence

from cloud_jax import records, storage
from cloud_jax.errors import ConfigError, InputTooLongError, RowTooLongError
from cloud_jax.data.jsonl import unwritable, write_jsonl_atomic
from cloud_jax.data.schema import FEEDBACK_FIELDS, PreferenceRow, row_record
from cloud_jax.data.schema import shard_name as _shard_name
from cloud_jax.data.tokenizer import tokenizer_fingerprint
from cloud_jax.scoring.rewards import (DEFAULT_MAX_LENGTH, ScoreConfig, resolve_classic,
                                       resolve_critique_prefix, resolve_layout_version, score)

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"


def _usable(critique: str) -> bool:
    # What the row loader accepts as feedback text.
    return bool(critique.strip()) and "\x00" not in critique


def check_writable(rows: Sequence[PreferenceRow]) -> None:
    """Refuses, naming its row and field, a row whose unread columns cannot be written back out
    as JSON (:func:`cloud_jax.data.jsonl.unwritable`): checked before any critique is sampled,
    not when a shard's critiques are written."""
    for row in rows:
        bad = unwritable(row.extra)
        if bad is not None:
            raise ConfigError(f"{row.source}: field '{bad[0]}': {bad[1]}")


def shard_name(index: int, count: int) -> str:
    # The naming that a glob over the shards checks for gaps (cloud_jax.data.schema.expand_paths).
    return _shard_name("critiques", index, count, ".jsonl")


def regenerate(rm, rows: Sequence[PreferenceRow], cfg: ScoreConfig, on_batch=None) -> list[dict]:
    """The rows with freshly sampled critiques of both responses."""
    prompts = [r.prompt for r in rows for _ in range(2)]
    responses = [text for r in rows for text in (r.chosen, r.rejected)]
    try:
        result = score(rm, prompts, responses, cfg, on_batch)
    except InputTooLongError as err:  # named by its row and field, not its place in the shard
        row, field = rows[err.index // 2], ("chosen", "rejected")[err.index % 2]
        raise RowTooLongError(f"{row.source}: field '{field}'", err.detail) from None
    return [row_record(row, chosen_feedback=result.critiques[2 * i][0],
                       rejected_feedback=result.critiques[2 * i + 1][0],
                       chosen_feedback_truncated=bool(result.truncated[2 * i, 0]),
                       rejected_feedback_truncated=bool(result.truncated[2 * i + 1, 0]))
            for i, row in enumerate(rows)]


# Settings that give the same critiques at any value (cloud_jax.scoring.rewards.ScoreConfig): a
# resume may change them (a smaller batch after running out of memory, say).
_SAME_CRITIQUES = ("sampling.batch_size", "sampling.steps_per_check", "sampling.decode_phases")


def rows_fingerprint(rows: Sequence[PreferenceRow]) -> str:
    """A digest of the rows' contents, in order: a resume over rows that changed is refused."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row_record(row), sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def params_fingerprint(params) -> str:
    """A digest of the weights' bits, as loaded: a resume whose checkpoint directory now holds
    other weights (retrained in place, say) is refused, as its critiques would mix two models.

    Each array's bits are read as unsigned integers and summed, weighted by their positions,
    modulo 2**32 on the devices where the array lies: integer sums are exact in any order, so
    the digest is the same however the array is sharded, and no weight is copied to the host."""
    import jax
    import jax.numpy as jnp

    def sums(x):
        width = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
        pos = jnp.arange(bits.size, dtype=jnp.uint32)
        return jnp.stack([jnp.sum(bits * (pos * jnp.uint32(2654435761) + jnp.uint32(1))),
                          jnp.sum(bits ^ (pos * jnp.uint32(40503) + jnp.uint32(7)))])

    leaves = jax.tree_util.tree_leaves_with_path(params)
    values = jax.device_get(jax.jit(lambda xs: [sums(x) for x in xs])([x for _, x in leaves]))
    digest = hashlib.sha256()
    for (path, x), value in zip(leaves, values):
        digest.update(f"{jax.tree_util.keystr(path)} {x.dtype} {tuple(x.shape)} "
                      f"{int(value[0])} {int(value[1])};".encode())
    return digest.hexdigest()


def _held_to(provenance: dict, room: Optional[int]) -> dict:
    """``provenance`` with its sampling.max_length held to the ``room`` tokens the model's
    positions leave a prefill (None: as recorded): a max_length above them cuts the same
    critiques as one equal to them, so a run that recorded either resumes under the other."""
    sampling = provenance.get("sampling")
    if room is None or not isinstance(sampling, dict) or \
            not isinstance(sampling.get("max_length"), int):
        return provenance
    return {**provenance, "sampling": {**sampling,
                                       "max_length": min(sampling["max_length"], room)}}


def _write_provenance(out_dir: str, provenance: dict, room: Optional[int] = None) -> None:
    path = storage.join(out_dir, PROVENANCE)
    # Through JSON once, so tuples compare equal to the lists read back.
    provenance = json.loads(json.dumps(provenance))
    if storage.exists(path):
        saved = json.loads(storage.read_text(path))
        changed = records.changes(_held_to(saved, room), _held_to(provenance, room),
                                  ignore=_SAME_CRITIQUES)
        for key in ("rows_sha256", "weights_sha256"):
            if key not in saved:  # written before rows (weights) were fingerprinted
                changed.pop(key, None)
        for key in ("sampling.layout_version", "sampling.classic"):
            if changed.get(key, (0,))[0] is None:  # left to the model before they were recorded
                changed.pop(key)
        if saved.get("checkpoint_step") is None:
            # Not recorded (the pipeline's self_critique stage recorded none before it passed
            # the SFT stage's step): a resume that knows the step may go on.
            changed.pop("checkpoint_step", None)
        if changed:
            raise ConfigError(f"{path} records other settings ({', '.join(changed)} differ); "
                             "write to a new output directory or restore the settings")
        return
    # All hosts may get here at once, with equal contents: each writes its own temporary file.
    storage.write_text_atomic(path, json.dumps(provenance, indent=2, sort_keys=True) + "\n")


@dataclasses.dataclass(frozen=True)
class RelabelSettings:
    """Where the rows come from and how the work is split; recorded in the provenance."""

    # The model's directory (or hub id) and training step, for the provenance.
    checkpoint: str = ""
    checkpoint_step: Optional[int] = None
    # The row files the rows were read from, for the provenance.
    input_paths: Sequence[str] = ()
    # The split and column mapping they were read with (datasets; recorded when set).
    input_split: str = ""
    columns: Optional[Dict[str, str]] = None
    shard_rows: int = 512
    num_hosts: int = 1
    host: int = 0
    # Precision settings the model was loaded with (they change the critiques; the mesh does not,
    # so a run may resume on another one). None: not given.
    dtype: Optional[str] = None
    param_dtype: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RelabelSummary:
    out_dir: str
    num_shards: int
    # This host's shards, and how many of them an earlier run had finished.
    shards: int
    already_done: int
    # Critiques the cloud stage would reject (empty, or holding NUL characters).
    unusable: int
    # Critiques written this run that hit the token budget, of all written this run.
    truncated: int = 0
    written: int = 0

    @property
    def glob(self) -> str:
        return storage.join(self.out_dir, "critiques-*.jsonl")


def relabel(rm, rows: Sequence[PreferenceRow], out_dir: str, cfg: ScoreConfig,
            settings: RelabelSettings = RelabelSettings(),
            progress: Optional[Callable[[int], Any]] = None) -> RelabelSummary:
    """Writes ``rows`` with freshly sampled critiques into shards under ``out_dir``, one for
    each response (``cfg.num_samples`` must be 1).

    Finished shards of an earlier run with the same settings are kept; other settings in the
    same directory are refused. ``progress(total_responses)`` may return an ``on_batch`` callback
    (see :func:`cloud_jax.scoring.rewards.score`).
    """
    if settings.shard_rows < 1:
        raise ConfigError(f"shard_rows={settings.shard_rows}: must be >= 1")
    if settings.checkpoint_step is not None and settings.checkpoint_step < 0:
        raise ConfigError(f"checkpoint_step={settings.checkpoint_step}: must be >= 0 (the "
                          "checkpoint's training step)")
    if not 0 <= settings.host < settings.num_hosts:
        raise ConfigError(f"host {settings.host} must lie in [0, {settings.num_hosts})")
    if cfg.num_samples != 1:
        raise ConfigError(f"num_samples={cfg.num_samples}: stage 2 writes one critique per "
                          "response, so K samples would cost K times as much for the first "
                          "alone; give num_samples=1")
    if resolve_classic(rm, cfg):
        # Checked before the output directory is touched: a classic model writes no critique.
        why = ("classic=True" if cfg.classic else
               "the model is a classic reward model (feedback_method 'vanilla')")
        raise ConfigError(f"nothing to relabel with: {why}, and a classic reward model writes no "
                          "critiques; stage 2 samples them from the critique_sft model "
                          "(feedback_method 'teacher')")
    check_writable(rows)
    # Recorded as sampled with: the model's prefix and critique-turn tokenization where cfg
    # leaves them to it, so a resume with a checkpoint whose recorded tokenization changed (the
    # weights the same) is refused rather than mixing critiques of two layouts.
    cfg = dataclasses.replace(cfg, critique_prefix=resolve_critique_prefix(rm, cfg),
                              layout_version=resolve_layout_version(rm, cfg), classic=False)
    num_shards = max(1, math.ceil(len(rows) / settings.shard_rows))
    # max_length None is recorded as the default it stands for, as runs before it recorded it.
    sampling = dataclasses.asdict(cfg)
    if sampling["max_length"] is None:
        sampling["max_length"] = DEFAULT_MAX_LENGTH
    reserved = 1 + cfg.max_critique_tokens
    storage.makedirs(out_dir)
    checkpoint = settings.checkpoint
    _write_provenance(out_dir, {
        "checkpoint": os.path.abspath(checkpoint) if os.path.exists(checkpoint) else checkpoint,
        "checkpoint_step": settings.checkpoint_step,
        "input": [p if storage.is_url(p) else os.path.abspath(p)
                  for p in settings.input_paths],
        **({"input_split": settings.input_split} if settings.input_split else {}),
        **({"columns": dict(settings.columns)} if settings.columns else {}),
        "num_rows": len(rows),
        "rows_sha256": rows_fingerprint(rows),
        "shard_rows": settings.shard_rows,
        "num_shards": num_shards,
        "sampling": sampling,
        "tokenizer_sha256": tokenizer_fingerprint(rm.tokenizer),
        "weights_sha256": params_fingerprint(rm.params),
        **{key: value for key, value in (("dtype", settings.dtype),
                                         ("param_dtype", settings.param_dtype))
           if value is not None},
    }, room=rm.config.max_position_embeddings - reserved)
    per = settings.shard_rows
    mine = [s for s in range(num_shards) if s % settings.num_hosts == settings.host]
    done = set(storage.listdir(out_dir))
    todo = [s for s in mine if shard_name(s, num_shards) not in done]
    log.info("host %d/%d: %d shards, %d already done", settings.host, settings.num_hosts,
             len(mine), len(mine) - len(todo))
    on_batch = None
    if progress is not None:
        on_batch = progress(2 * sum(len(rows[s * per:(s + 1) * per]) for s in todo))
    unusable = truncated = written = 0
    for s in todo:
        out = regenerate(rm, rows[s * per:(s + 1) * per], cfg, on_batch)
        unusable += sum(not _usable(r[f]) for r in out for f in FEEDBACK_FIELDS)
        truncated += sum(r[f"{f}_truncated"] for r in out for f in FEEDBACK_FIELDS)
        written += len(out) * len(FEEDBACK_FIELDS)
        write_jsonl_atomic(storage.join(out_dir, shard_name(s, num_shards)), out)
    return RelabelSummary(out_dir, num_shards, len(mine), len(mine) - len(todo), unusable,
                          truncated, written)
