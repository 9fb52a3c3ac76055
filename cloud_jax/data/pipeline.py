"""Tokenized pairs -> per-host numpy batches, with grain.

One batch (P pairs per host, T a length bucket; pair axis 0 = chosen, 1 = rejected):

    input_ids       int32   [P, 2, T]  right-padded with pad_id
    attention_mask  int32   [P, 2, T]  1 on real tokens
    positions       int32   [P, 2, T]  0, 1, ... on real tokens, 0 on pads
    targets         int32   [P, 2, T]  input_ids[t + 1], 0 where there is none
    loss_mask       float32 [P, 2, T]  1 where targets[t] is a loss target
    reward_index    int32   [P, 2]     position of the end-of-turn token the reward is read at
    pair_valid      int32   [P]        0 for filler pairs
    pair_index      int32   [P]        the pair's record index in the source, -1 for filler

Filler pairs (the tail of a last partial batch) are copies of a real pair with pair_valid 0 and
loss_mask 0, so no row is all padding and every reward_index points at a real end-of-turn token.

Order (:class:`GlobalOrder`): one global order of the pair indices per epoch, a permutation that
depends on (seed, epoch) only (the identity without shuffling); global batch i is cut from it
(batches of cfg.batch_pairs, each epoch separately, num_epochs of them), and host h of H takes
rows [h * batch_pairs / H, (h + 1) * batch_pairs / H) of every global batch. The global batches
are thus a function of (seed, epoch, batch number) and not of the host count: the hosts' rows of
batch i, in host order, are the one-host batch i. Host batch i is a pure function of i, so the
iterator state (grain's get_state / set_state) is just a position, the same on every host, and a
restored iterator yields exactly the batches that followed, on any host count that divides
batch_pairs.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import grain
import numpy as np

from cloud_jax.data.config import DataConfig, resolved_buckets

BATCH_KEYS = ("input_ids", "attention_mask", "positions", "targets", "loss_mask",
              "reward_index", "pair_valid", "pair_index")
_SIDES = ("chosen", "rejected")


class _ReadPair:
    """Pair position -> source record; -1 (filler) reads record 0 and marks it filler."""

    def __init__(self, source):
        self._source = source

    def __call__(self, index: int) -> dict:
        record = dict(self._source[max(int(index), 0)])
        record["pair_index"] = int(index)
        return record


class _Collate:
    def __init__(self, pairs: int, buckets: Sequence[int], pad_id: int):
        self._pairs, self._buckets, self._pad_id = pairs, tuple(buckets), pad_id

    def __call__(self, records: Sequence[dict]) -> dict:
        longest = max(len(r[f"{s}_input_ids"]) for r in records for s in _SIDES)
        length = next((b for b in self._buckets if b >= longest), None)
        if length is None:
            raise ValueError(f"a stored sequence has {longest} tokens, more than the largest "
                             f"length bucket {self._buckets[-1]}; rebuild the dataset with this "
                             "max_length")
        p = self._pairs
        out = {
            "input_ids": np.full((p, 2, length), self._pad_id, np.int32),
            "attention_mask": np.zeros((p, 2, length), np.int32),
            "positions": np.zeros((p, 2, length), np.int32),
            "targets": np.zeros((p, 2, length), np.int32),
            "loss_mask": np.zeros((p, 2, length), np.float32),
            "reward_index": np.zeros((p, 2), np.int32),
            "pair_valid": np.zeros((p,), np.int32),
            "pair_index": np.full((p,), -1, np.int32),
        }
        for i in range(p):
            record = records[i] if i < len(records) else records[0]
            valid = i < len(records) and record["pair_index"] >= 0
            for j, side in enumerate(_SIDES):
                ids = np.asarray(record[f"{side}_input_ids"])
                n = len(ids)
                reward_index = int(record[f"{side}_reward_index"])
                if not 0 <= reward_index < n:
                    raise ValueError(f"pair {record['id']!r}: {side} reward_index "
                                     f"{reward_index} is outside its {n} tokens")
                out["input_ids"][i, j, :n] = ids
                out["attention_mask"][i, j, :n] = 1
                out["positions"][i, j, :n] = np.arange(n)
                out["targets"][i, j, :n - 1] = ids[1:]
                if valid:
                    out["loss_mask"][i, j, :n - 1] = record[f"{side}_target_mask"][1:]
                out["reward_index"][i, j] = reward_index
            if valid:
                out["pair_valid"][i] = 1
                out["pair_index"][i] = record["pair_index"]
        return out


class GlobalOrder:
    """The train order: which pairs global batch i holds, for every host count.

    ``batch(i)`` is global batch i as ``batch_pairs`` pair positions (-1 for filler), a function
    of (seed, epoch, i) only: epoch e = i // batches_per_epoch reads the pairs in a permutation
    of (seed, e) (grain's index shuffle; the identity without ``shuffle``), cut in batches of
    ``batch_pairs``; the last partial batch of an epoch is topped up with filler, or dropped with
    ``drop_remainder``. ``host_rows(i, h, H)`` is host h's share: rows [h * P, (h + 1) * P) of
    batch i, P = batch_pairs / H, so the hosts' shares in host order are batch i.
    """

    def __init__(self, num_records: int, batch_pairs: int, *, seed: int = 0,
                 shuffle: bool = True, num_epochs: int = 1, drop_remainder: bool = False):
        if batch_pairs < 1:
            raise ValueError(f"batch_pairs={batch_pairs} must be at least 1")
        self.num_records, self.batch_pairs, self.num_epochs = num_records, batch_pairs, num_epochs
        self.batches_per_epoch = (num_records // batch_pairs if drop_remainder
                                  else math.ceil(num_records / batch_pairs))
        indices = grain.MapDataset.range(num_records)
        self._order = indices.shuffle(seed=seed) if shuffle else None

    def __len__(self) -> int:
        return self.batches_per_epoch * self.num_epochs

    def batch(self, index: int) -> List[int]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} is not in [0, {len(self)})")
        epoch, j = divmod(index, self.batches_per_epoch)
        first = j * self.batch_pairs
        count = min(self.batch_pairs, self.num_records - first)
        base = epoch * self.num_records  # grain's shuffle: epoch e's permutation at e * n + k
        mine = [int(self._order[base + k]) if self._order is not None else k
                for k in range(first, first + count)]
        return mine + [-1] * (self.batch_pairs - count)

    def host_rows(self, index: int, shard_index: int, shard_count: int) -> List[int]:
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
        if self.batch_pairs % shard_count:
            raise ValueError(f"batch_pairs={self.batch_pairs} is not divisible by the "
                             f"{shard_count} hosts")
        per_host = self.batch_pairs // shard_count
        return self.batch(index)[shard_index * per_host:(shard_index + 1) * per_host]


class _HostBatch:
    """Batch number -> this host's collated rows of that global batch."""

    def __init__(self, order: GlobalOrder, source, shard_index: int, shard_count: int,
                 collate: _Collate):
        self._order, self._read, self._collate = order, _ReadPair(source), collate
        self._shard = (shard_index, shard_count)

    def __call__(self, index: int) -> dict:
        rows = self._order.host_rows(int(index), *self._shard)
        return self._collate([self._read(p) for p in rows])


def pair_batches(source, *, pairs_per_host: int, length_buckets: Sequence[int], seed: int = 0,
                 shuffle: bool = True, num_epochs: int = 1, drop_remainder: bool = False,
                 shard_index: int = 0, shard_count: int = 1,
                 pad_id: int = 0) -> grain.MapDataset:
    """The batches of one host as a grain MapDataset: ``len`` is the number of batches over all
    epochs and ``ds[i]`` is this host's rows of global batch i (global batches of
    ``pairs_per_host * shard_count`` pairs; see the module docstring for layout and order)."""
    batch_pairs = pairs_per_host * shard_count
    order = GlobalOrder(len(source), batch_pairs, seed=seed, shuffle=shuffle,
                        num_epochs=num_epochs, drop_remainder=drop_remainder)
    if order.batches_per_epoch == 0:
        raise ValueError(f"{len(source)} pairs make no full batch of {batch_pairs}; lower "
                         "batch_pairs or set drop_remainder=False")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
    return grain.MapDataset.range(len(order)).map(
        _HostBatch(order, source, shard_index, shard_count,
                   _Collate(pairs_per_host, length_buckets, pad_id)))


def _default_shard(shard_index: Optional[int], shard_count: Optional[int]):
    if (shard_index is None) != (shard_count is None):
        raise ValueError(f"shard_index={shard_index}, shard_count={shard_count}: give "
                         "shard_index and shard_count together (or neither: this JAX "
                         "process's index and the process count)")
    if shard_index is None:
        import jax

        return jax.process_index(), jax.process_count()
    return shard_index, shard_count


def batch_iterator(cfg: DataConfig, source, *, shard_index: Optional[int] = None,
                   shard_count: Optional[int] = None, shuffle: Optional[bool] = None,
                   num_epochs: Optional[int] = None) -> grain.DatasetIterator:
    """A checkpointable iterator over this host's batches (``get_state`` / ``set_state``).

    Hosts default to JAX processes; every host gets its cfg.batch_pairs / shard_count rows of
    each global batch (:class:`GlobalOrder`) and the same number of batches. ``shuffle`` and
    ``num_epochs`` default to cfg's (an evaluation pass passes shuffle=False, num_epochs=1).
    """
    cfg.validate()
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    if cfg.batch_pairs % shard_count:
        raise ValueError(f"data.batch_pairs={cfg.batch_pairs} is not divisible by the "
                         f"{shard_count} hosts")
    ds = pair_batches(
        source, pairs_per_host=cfg.batch_pairs // shard_count,
        length_buckets=resolved_buckets(cfg.length_buckets, cfg.max_length), seed=cfg.seed,
        shuffle=cfg.shuffle if shuffle is None else shuffle,
        num_epochs=cfg.num_epochs if num_epochs is None else num_epochs,
        drop_remainder=cfg.drop_remainder, shard_index=shard_index, shard_count=shard_count)
    read = grain.ReadOptions(num_threads=cfg.num_threads,
                             prefetch_buffer_size=cfg.prefetch_buffer_size)
    return iter(ds.to_iter_dataset(read))
