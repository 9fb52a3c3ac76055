"""Settings of the data package: row files, tokenization, the TFDS cache and batching.

Kept free of ``cloud_jax.training.config`` (which embeds :class:`DataConfig` as its ``data`` section) so
there is no import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

from cloud_jax.errors import ConfigError

# How a sequence is laid out (data/layout.py): "critique" (prompt, response, critique prefix,
# critique; targets on the critique), "classic" (prompt, response; no targets), "lm" (the critique
# layout with targets on every token). Training maps each stage to one (training/stages.py).
LAYOUTS = ("critique", "classic", "lm")
OVERLENGTH_POLICIES = ("drop", "truncate_prompt")
# How a row's texts are tokenized (data/layout.py). 3, the default: each text together with the
# template text before it, as the whole rendered conversation is (a SentencePiece tokenizer gives
# a text no word-start marker of its own), and each text trimmed where the template trims its
# turn (Mistral v0.3's trims the response only); the critique turn as in 2. 2: each text on its
# own, every text trimmed where the template trims the user's; the critique turn as the reference
# builds it (the prefill ends at the prefix without its trailing whitespace; prefix + critique are
# one text); the same tokens as 3 for Llama-3. 1: the prefix and the critique tokenized on their
# own (exports written before versions existed).
LAYOUT_VERSIONS = (1, 2, 3)
LAYOUT_VERSION = 3
# The version of a checkpoint the reference code wrote (it records none): its own construction.
REFERENCE_LAYOUT_VERSION = 2

# The reference wording of the opening of the critique turn.
CRITIQUE_PREFIX = (
    "The following is a break down on the correctness and usefulness of the assistant's "
    "response to my question: "
)


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which column of the row source holds each field; empty: the field's own name. For
    datasets whose columns are named differently (``data.columns.prompt=question``)."""

    id: str = ""
    prompt: str = ""
    chosen: str = ""
    rejected: str = ""
    chosen_feedback: str = ""
    rejected_feedback: str = ""
    subset: str = ""

    @classmethod
    def check_field(cls, field: str, what: str) -> None:
        names = [f.name for f in dataclasses.fields(cls)]
        if field not in names:
            raise ConfigError(f"{what}: {field!r} is not a row field; expected one of "
                              f"{', '.join(names)}")

    def mapping(self) -> Dict[str, str]:
        """{field: column} for the renamed fields."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v and v != k}

    def validate(self) -> "Columns":
        mapped = [v for v in dataclasses.asdict(self).values() if v]
        twice = sorted({c for c in mapped if mapped.count(c) > 1})
        if twice:
            raise ConfigError(f"data.columns: column(s) {', '.join(twice)} mapped to more than "
                              "one field")
        return self


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the preference rows come from and how they become batches.

    Paths may be one file, a comma-separated list or a glob (``data/train-*.parquet``), a Hugging
    Face dataset directory or ``hf://owner/name`` (``cloud_jax.data.schema``).
    """

    train_path: str = ""
    eval_path: str = ""
    # The split of a Hugging Face dataset read for train_path / eval_path when it has several;
    # empty: its only split (a dataset with several splits must name one).
    split: str = ""
    eval_split: str = ""
    # Columns holding the row fields, for any row source: data.columns.prompt=question.
    columns: Columns = dataclasses.field(default_factory=Columns)
    # "byte" (the built-in byte tokenizer), a HF tokenizer directory (local, or a gs:// / s3://
    # URL, staged in the local cache) or a hub id.
    tokenizer: str = "byte"
    # Tokens per sequence at most; a run refuses one above the model's max_position_embeddings.
    max_length: int = 2048
    # drop: skip a pair whose chosen or rejected sequence is longer than max_length (counted and
    # logged). truncate_prompt: cut prompt tokens from the left until it fits, as many from both
    # sides of the pair (one prompt); drop it if even an empty prompt does not fit. Responses and
    # critiques are never cut.
    overlength_policy: str = "drop"
    # Padded sequence lengths; a batch is right-padded to the smallest bucket that holds its
    # longest row, which bounds the number of compiled shapes. Empty: powers of two from 128, with
    # max_length as the last bucket.
    length_buckets: Tuple[int, ...] = ()
    # Skip bad rows (and duplicate ids, chosen == rejected) instead of failing; each is written to
    # the rejects file with its file, line, field and reason.
    lenient: bool = False
    # Empty: <tfds_dir>/cloud_pairs/<dataset config name>/rejects-<split>.jsonl, beside the
    # dataset built from these rows. Where train and eval are both built, a path without {split}
    # gets -<split> added.
    rejects_path: str = ""
    critique_prefix: str = CRITIQUE_PREFIX
    # How rows are tokenized (LAYOUT_VERSIONS); the export records it and scoring
    # follows it.
    layout_version: int = LAYOUT_VERSION
    # Pairs per global batch (each pair is a chosen and a rejected sequence); every host gets
    # batch_pairs / host_count of them.
    batch_pairs: int = 8
    shuffle: bool = True
    seed: int = 0
    num_epochs: int = 1
    # False: the last partial batch of an epoch is filled with pair_valid=0 pairs; True: dropped.
    # Training's eval split is always read whole (as with False).
    drop_remainder: bool = False
    # Where tokenized datasets are stored (one subdirectory per rows/tokenizer/settings hash); a
    # local directory or a gs:// URL (mirrored locally, docs/TRAINING.md "Storage").
    tfds_dir: str = "tfds_cache"
    # grain read threads and prefetched elements per host.
    num_threads: int = 2
    prefetch_buffer_size: int = 8

    def validate(self) -> "DataConfig":
        self.columns.validate()
        if self.overlength_policy not in OVERLENGTH_POLICIES:
            raise ConfigError(
                f"data.overlength_policy={self.overlength_policy!r}: expected one of "
                f"{', '.join(OVERLENGTH_POLICIES)}"
            )
        if self.max_length < 2:
            raise ConfigError(f"data.max_length={self.max_length}: must be at least 2")
        if self.layout_version not in LAYOUT_VERSIONS:
            raise ConfigError(f"data.layout_version={self.layout_version}: expected one of "
                              f"{', '.join(map(str, LAYOUT_VERSIONS))}")
        if self.batch_pairs < 1:
            raise ConfigError(f"data.batch_pairs={self.batch_pairs}: must be at least 1")
        if self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs={self.num_epochs}: must be at least 1")
        for key in ("num_threads", "prefetch_buffer_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}={getattr(self, key)}: must be >= 0")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed={self.seed}: must be in [0, 2**32)")
        if list(self.length_buckets) != sorted(set(self.length_buckets)) or any(
            b < 1 for b in self.length_buckets
        ):
            raise ConfigError(
                f"data.length_buckets={list(self.length_buckets)}: expected strictly increasing "
                "positive lengths"
            )
        return self


def resolved_buckets(length_buckets, max_length: int) -> Tuple[int, ...]:
    """The padded lengths in use: the configured buckets below max_length, then max_length."""
    if not length_buckets:
        length_buckets, b = [], 128
        while b < max_length:
            length_buckets.append(b)
            b *= 2
    return tuple(b for b in length_buckets if b < max_length) + (max_length,)
