"""Validated rows -> tokenized pairs stored as a TFDS dataset in array_record files.

TFDS writes and reads array_record without TensorFlow: a ``GeneratorBasedBuilder`` prepared with
``file_format='array_record'``, read back with ``tfds.data_source`` (random access, what grain
needs). Each record is one pair, tokenized once so training never re-tokenizes:

    id, subset                        text
    {chosen,rejected}_input_ids       int32 [L]
    {chosen,rejected}_target_mask     uint8 [L]  (1 where the token is a loss target)
    {chosen,rejected}_reward_index    int32      (the final end-of-turn token)

Records keep the order of the rows. A pair is stored only if both of its sequences fit
``max_length`` under the over-length policy, and only if its two responses differ as tokens: a
pair whose responses differ as text but not once the chat template has trimmed them and the
tokenizer has read them (``"4."`` and ``"4. "`` under a template that trims, as Llama-3's does)
carries no preference. It is a bad row like ``chosen == rejected`` (field ``rejected``): an error
naming its file and line, or in lenient mode a line of the rejects file and a count in
``rejected_rows``. The over-length policy cuts only the prompt, which both sides share, so it
never makes a pair identical; the check does not depend on it. The dataset lives in
``<tfds_dir>/cloud_pairs/<stage>-<hash>/<version>``, where the hash covers the row files'
bytes, the tokenizer and every setting that changes a record, so a change builds a new dataset
and an unchanged one is reused. Build counts (rows, rejected rows, dropped and prompt-truncated
pairs) are stored in the dataset's metadata. A ``tfds_dir`` on an object store (``gs://...``) is
mirrored: the dataset is built or downloaded in a local directory and uploaded once complete.

A job holds an exclusive ``flock`` of ``<tfds_dir>/cloud_pairs/<stage>-<hash>.lock`` (in the local
mirror for an object store) from its check for the dataset to the end of its build, so a second
job that wants the same dataset in the same directory at the same time waits (a warning names the
holder) and then reuses the first one's instead of building it too (TFDS builds into an
``incomplete.*`` directory and renames it: the second rename failed). The kernel drops the lock
when its process ends, however it ends; the next job to hold it removes a killed build's
``incomplete.*`` directory. Jobs on several machines exclude one another only where the shared file
system carries ``flock`` (NFS); two machines sharing a ``gs://`` tfds_dir each build in their own
mirror and may both upload the same version (the same records; the marker is written after each
upload's files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Dict, Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds
from transformers import PreTrainedTokenizerBase

from cloud_jax import progress, storage
from cloud_jax.data.config import LAYOUTS, DataConfig
from cloud_jax.data.layout import chat_layout
from cloud_jax.data.schema import (PreferenceRow, check_split, expand_paths, load_rows,
                                   reject_loaded_row, source_digest)
from cloud_jax.data.tokenizer import tokenizer_fingerprint
from cloud_jax.errors import ConfigError

log = logging.getLogger(__name__)

DATASET_NAME = "cloud_pairs"
# Marks a complete upload of a dataset version to an object-store cache (data.tfds_dir=gs://...).
_UPLOADED = "cloud_jax_uploaded"
# Beside a dataset's directory (<tfds_dir>/cloud_pairs/<config>.lock): the lock a job holds while
# it checks for the dataset and builds it (storage.wait_for_lock).
LOCK_SUFFIX = ".lock"
# The name TFDS gives a build's directory until it is complete and renamed.
_INCOMPLETE_PREFIX = "incomplete."


def _features() -> tfds.features.FeaturesDict:
    seq = {}
    for side in ("chosen", "rejected"):
        seq[f"{side}_input_ids"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        seq[f"{side}_target_mask"] = tfds.features.Tensor(shape=(None,), dtype=np.uint8)
        seq[f"{side}_reward_index"] = tfds.features.Scalar(dtype=np.int32)
    return tfds.features.FeaturesDict(
        {"id": tfds.features.Text(), "subset": tfds.features.Text(), **seq})


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything besides the row files and the tokenizer that changes a stored record."""

    layout: str
    require_feedback: bool
    max_length: int
    overlength_policy: str
    critique_prefix: str
    lenient: bool
    layout_version: int


class CloudPairs(tfds.core.GeneratorBasedBuilder):
    """Tokenized preference pairs. Built by :func:`prepare_dataset`; read with
    ``tfds.data_source('cloud_pairs/<config>', data_dir=...)`` or :func:`open_split`."""

    VERSION = tfds.core.Version("1.6.0")
    RELEASE_NOTES = {"1.0.0": "Pairs of tokenized sequences with target masks and reward index.",
                     "1.1.0": "Pairs whose responses are the same tokens are rejected.",
                     "1.2.0": "Under a template that trims, a blank critique prefix leaves the "
                              "critique trimmed at its start too; a template that writes today's "
                              "date writes a fixed one (TEMPLATE_DATE).",
                     "1.3.0": "Layout version 3: under a template that trims one role's text and "
                              "not the other's (Mistral v0.3's trims the response only), each "
                              "text is trimmed as its own turn is.",
                     "1.4.0": "Whether a pair's responses are the same tokens is judged under the "
                              "configured layout version (was always version 3's trimming).",
                     "1.5.0": "Layout version 3: a critique whose first token would merge with "
                              "the end of the critique prefix (':' + '\\n\\n') is tokenized on "
                              "its own after the prefill; the row held those characters twice.",
                     "1.6.0": "truncate_prompt cuts the same prompt tokens from both sides of a "
                              "pair (each side lost only what it needed, so the two rewards "
                              "were read after different prompts)."}
    # TFDS looks beside a builder's source file for checksums of its downloads. There are no
    # downloads here, and that lookup imports `importlib_resources`, which TFDS only installs on
    # Python < 3.9.
    code_path = None

    def __init__(self, *, split_files: Optional[Mapping[str, list]] = None,
                 tokenizer: Optional[PreTrainedTokenizerBase] = None,
                 settings: Optional[BuildSettings] = None,
                 rejects_paths: Optional[Mapping[str, str]] = None,
                 source_splits: Optional[Mapping[str, str]] = None,
                 columns: Optional[Mapping[str, str]] = None, **kwargs):
        self._split_files = split_files
        # Per split: the Hugging Face split its dataset sources are read from.
        self._source_splits = source_splits or {}
        self._columns = dict(columns or {})
        self._tokenizer = tokenizer
        self._settings = settings
        self._rejects_paths = rejects_paths or {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__, features=_features(),
            metadata=tfds.core.MetadataDict(), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        if self._split_files is None:
            raise RuntimeError("CloudPairs datasets are built with "
                               "cloud_jax.data.tfds_builder.prepare_dataset")
        return {split: self._generate_examples(split, files)
                for split, files in self._split_files.items()}

    def _generate_examples(self, split: str, files: list):
        target = self._rejects_paths.get(split)
        if not (target and storage.is_url(target)):
            yield from self._examples(split, files, target, target)
            return
        # An object cannot be appended to (each bad row would rewrite all the rejects before
        # it): the rejects are written locally and copied to the object once the split is read,
        # also when it fails (a split with no usable pair: its rejects say why).
        staging = tempfile.mkdtemp(prefix="cloud_jax-rejects-")
        local = os.path.join(staging, storage.basename(target))
        try:
            yield from self._examples(split, files, local, target)
        finally:
            try:
                if os.path.exists(local):
                    storage.copy_file(local, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _examples(self, split: str, files: list, rejects_path: Optional[str],
                  rejects_shown_as: Optional[str]):
        """The examples of ``split``; bad rows written to ``rejects_path`` (a local file, or the
        configured path), which messages and the split's stats name as ``rejects_shown_as``."""
        s = self._settings
        layout = chat_layout(self._tokenizer)
        loaded = load_rows(files, require_feedback=s.require_feedback, lenient=s.lenient,
                           rejects_path=rejects_path, rejects_shown_as=rejects_shown_as,
                           split=self._source_splits.get(split, ""), columns=self._columns)
        shown = rejects_shown_as if loaded.rejects_path else None
        stats = {"rows": len(loaded.rows) + loaded.num_rejected,
                 "rejected_rows": loaded.num_rejected, "pairs": 0, "dropped_overlength": 0,
                 "prompt_truncated": 0, "rejects_path": shown}
        self.info.metadata[split] = stats
        longest = (0, "")  # (tokens, where) of the longest dropped sequence, for the messages
        for index, row in enumerate(loaded.rows):
            if _same_response_tokens(layout, row, s):
                reject_loaded_row(row, "rejected", "the same tokens as chosen once the chat "
                                  "template has trimmed it and the tokenizer has read it; the "
                                  "pair carries no preference",
                                  lenient=s.lenient, rejects_path=loaded.rejects_path)
                stats["rejected_rows"] += 1
                continue
            record = {"id": row.id, "subset": row.subset or ""}
            sides = (("chosen", row.chosen, row.chosen_feedback),
                     ("rejected", row.rejected, row.rejected_feedback))
            examples = [layout.encode(row.prompt, response, critique, s.layout,
                                      s.critique_prefix, s.max_length, s.overlength_policy,
                                      s.layout_version) for _, response, critique in sides]
            if None in examples:
                for name, text, feedback in sides:
                    full = layout.encode(row.prompt, text, feedback, s.layout,
                                         s.critique_prefix, sys.maxsize,
                                         version=s.layout_version)
                    longest = max(longest, (len(full.input_ids), f"{row.source} ({name})"))
                stats["dropped_overlength"] += 1
                continue
            # Both sides of a pair read one prompt, so their rewards compare the responses: the
            # side that needed fewer prompt tokens cut loses as many as the other.
            cut = max(ex.prompt_tokens_cut for ex in examples)
            for j, ((_, response, critique), ex) in enumerate(zip(sides, examples)):
                if ex.prompt_tokens_cut < cut:
                    examples[j] = layout.encode(
                        row.prompt, response, critique, s.layout, s.critique_prefix,
                        len(ex.input_ids) + ex.prompt_tokens_cut - cut, s.overlength_policy,
                        s.layout_version)
            for (side, _, _), ex in zip(sides, examples):
                record[f"{side}_input_ids"] = ex.input_ids
                record[f"{side}_target_mask"] = ex.target_mask
                record[f"{side}_reward_index"] = ex.reward_index
            stats["pairs"] += 1
            stats["prompt_truncated"] += int(cut > 0)
            yield index, record
        if stats["rejected_rows"] > loaded.num_rejected:
            log.warning("%s: %d pairs rejected: chosen and rejected are the same tokens%s", split,
                        stats["rejected_rows"] - loaded.num_rejected,
                        f" (details in {shown})" if shown else "")
        too_long = ""
        if stats["dropped_overlength"]:
            # Of the pairs tokenized: rows rejected as the same tokens were never measured.
            measured = len(loaded.rows) - (stats["rejected_rows"] - loaded.num_rejected)
            too_long = (f"{stats['dropped_overlength']} of {measured} pairs are longer "
                        f"than data.max_length={s.max_length} ({s.overlength_policy} policy); the "
                        f"longest, {longest[1]}, has {longest[0]} tokens. "
                        + _how_to_keep_long_pairs(s.layout))
            log.warning("%s: %s", split, too_long)
        if stats["pairs"] == 0:
            raise ConfigError(f"split {split!r} ({', '.join(files)}) has no usable pair: "
                              f"{json.dumps(stats)}" + (f". {too_long}" if too_long else ""))
        log.info("%s: %s", split, json.dumps(stats))


def _how_to_keep_long_pairs(layout: str) -> str:
    text = ("To keep them, raise data.max_length (at most model.max_position_embeddings) and the "
            "last of data.length_buckets, or shorten the rows")
    if layout == "critique":
        # The critique is part of these sequences: shorter critiques fit too.
        text += " or their critiques (the pipeline's self_critique.max_critique_tokens)"
    return text + "."


def _same_response_tokens(layout, row: PreferenceRow, s: BuildSettings) -> bool:
    """Whether chosen and rejected are the same tokens in the layout (after any trimming), under
    the configured layout version (which decides how the response is trimmed)."""
    # A response's tokens do not depend on the prompt's, which both share, so a one-character
    # stand-in for it decides the same and saves tokenizing the real one twice more.
    chosen, rejected = (layout.encode("?", response, None, "classic", s.critique_prefix,
                                      sys.maxsize, version=s.layout_version).input_ids
                        for response in (row.chosen, row.rejected))
    return np.array_equal(chosen, rejected)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    data_dir: str
    config_name: str
    # Per split: rows, rejected_rows, pairs, dropped_overlength, prompt_truncated, rejects_path.
    stats: Dict[str, dict]
    # Per split: a digest of what its records depend on (source rows, tokenizer, settings).
    split_fingerprints: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{DATASET_NAME}/{self.config_name}"


def prepare_dataset(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, layout: str,
                    splits: Optional[Mapping[str, str]] = None,
                    data_dir: Optional[str] = None, *,
                    require_feedback: Optional[bool] = None) -> PreparedDataset:
    """Builds (or reuses) the tokenized dataset of ``splits`` ({split: path spec}; default: train
    and, when set, eval from ``cfg``) under ``data_dir`` (default ``cfg.tfds_dir``), every row in
    ``layout`` (one of :data:`cloud_jax.data.config.LAYOUTS`). Rows must carry critiques when
    ``require_feedback`` (default: every layout but "classic")."""
    cfg.validate()
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if require_feedback is None:
        require_feedback = layout != "classic"
    if splits is None:
        splits = {"train": cfg.train_path}
        if cfg.eval_path:
            splits["eval"] = cfg.eval_path
    split_files = {split: expand_paths(spec) for split, spec in splits.items()}
    # The Hugging Face split each of our splits reads from a dataset source.
    source_splits = {split: cfg.eval_split if split == "eval" else cfg.split
                     for split in split_files}
    for split, files in split_files.items():  # before a build made earlier is reused
        check_split(files, source_splits[split])
    columns = cfg.columns.mapping()
    data_dir = data_dir or cfg.tfds_dir
    # TFDS writes array_record files with local file calls only: a cache on an object store is
    # built (or downloaded) in a local mirror and uploaded once complete.
    remote_dir = storage.resolve(data_dir) if storage.is_url(data_dir) else None
    if remote_dir is not None:
        data_dir = os.path.join(storage.cache_root(), "tfds",
                                hashlib.sha256(remote_dir.encode()).hexdigest()[:16])
    data_dir = os.path.abspath(data_dir)
    settings = BuildSettings(layout=layout, require_feedback=require_feedback,
                             max_length=cfg.max_length,
                             overlength_policy=cfg.overlength_policy,
                             critique_prefix=cfg.critique_prefix, lenient=cfg.lenient,
                             layout_version=cfg.layout_version)
    common = {"version": str(CloudPairs.VERSION), "settings": dataclasses.asdict(settings),
              "tokenizer": tokenizer_fingerprint(tokenizer),
              **({"columns": columns} if columns else {})}
    sources = {s: [source_digest(p, source_splits[s]) for p in files]
               for s, files in split_files.items()}
    fingerprint = json.dumps({**common, "splits": sources}, sort_keys=True)
    config_name = f"{layout}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"
    # What each split's records depend on alone (a resumed run checks its train split's).
    split_fingerprints = {
        s: hashlib.sha256(json.dumps({**common, "layout": layout, "sources": digests},
                                     sort_keys=True).encode()).hexdigest()[:16]
        for s, digests in sources.items()}
    rejects_paths = {}
    for split in split_files:
        # By default beside the dataset's own files: datasets built into one tfds_dir (the
        # stages of a pipeline, a changed source) keep their rejects apart.
        pattern = cfg.rejects_path or storage.join(remote_dir or data_dir, DATASET_NAME,
                                                   config_name, "rejects-{split}.jsonl")
        if "{split}" not in pattern and len(split_files) > 1:
            root, ext = os.path.splitext(pattern)
            pattern = root + "-{split}" + ext
        # Only {split} is replaced: other braces in a path are its own characters.
        rejects_paths[split] = pattern.replace("{split}", split)
    config_dir = os.path.join(data_dir, DATASET_NAME, config_name)
    # Held from the check for a built dataset to its end: a second job building the same dataset
    # into this tfds_dir (on this host, or another where the file system carries flock) waits
    # here, then reuses what the first built instead of building it again at the same time.
    with storage.wait_for_lock(config_dir + LOCK_SUFFIX,
                               f"the tokenized dataset {config_dir}") as held:
        if held:
            _remove_unfinished_builds(config_dir)
        builder = CloudPairs(
            split_files=split_files, tokenizer=tokenizer, settings=settings,
            rejects_paths=rejects_paths, source_splits=source_splits, columns=columns,
            data_dir=data_dir, file_format="array_record",
            config=tfds.core.BuilderConfig(name=config_name, description=fingerprint))
        version_dir = os.path.relpath(builder.data_dir, data_dir)
        remote_version = storage.join(remote_dir, version_dir) if remote_dir else None
        if remote_version and not os.path.isdir(builder.data_dir) and storage.exists(
                storage.join(remote_version, _UPLOADED)):
            storage.download_dir(remote_version, builder.data_dir)
            log.info("tokenized dataset %s downloaded from %s", config_name, remote_version)
        with _tfds_bars_on_a_terminal_only():
            builder.download_and_prepare(
                download_dir=os.path.join(data_dir, "downloads"),
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        if remote_version and not storage.exists(storage.join(remote_version, _UPLOADED)):
            storage.upload_dir(builder.data_dir, remote_version)
            # Written last: a copy without it is incomplete and is never downloaded.
            storage.write_text_atomic(storage.join(remote_version, _UPLOADED),
                                      config_name + "\n")
            log.info("tokenized dataset %s uploaded to %s", config_name, remote_version)
        stats = dict(tfds.builder_from_directory(builder.data_dir).info.metadata or {})
    return PreparedDataset(data_dir=data_dir, config_name=config_name, stats=stats,
                           split_fingerprints=split_fingerprints)


@contextlib.contextmanager
def _tfds_bars_on_a_terminal_only():
    """TFDS's own tqdm bars (a build's splits, examples, shuffling) off while it builds, where
    stderr is no terminal (a log file, a pipe): there their redraws and cursor moves would pile
    up, and the last one, left without a newline, would glue itself in front of the next log
    line. TFDS's setting is put back afterwards, whatever it was."""
    if progress._is_terminal(sys.stderr):
        yield
        return
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(before)


def _remove_unfinished_builds(config_dir: str) -> None:
    """Removes the staging directories (TFDS's ``incomplete.*``) of builds of this dataset that
    ended before their rename: a killed build's. Called with the dataset's lock held, when no
    build of it runs."""
    try:
        names = os.listdir(config_dir)
    except OSError:
        return
    for name in names:
        path = os.path.join(config_dir, name)
        if name.startswith(_INCOMPLETE_PREFIX) and os.path.isdir(path):
            log.info("removing %s, left by a build of the tokenized dataset that did not finish",
                     path)
            shutil.rmtree(path, ignore_errors=True)


def open_split(dataset: PreparedDataset, split: str):
    """Random-access source of one split's records (numpy arrays; text fields as bytes)."""
    return tfds.data_source(dataset.name, split=split, data_dir=dataset.data_dir,
                            download=False)
