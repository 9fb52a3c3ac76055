"""Continuous batching of critique generation: a fixed set of decode slots, refilled as critiques
finish, so a short critique never waits for a long one.

A *pool* is ``options.slots`` decode rows (rounded down to a multiple of K) that share one
sampling method (greedy, or a temperature with its top-k / top-p), repetition penalty and number
of samples K: the first two are compile-time constants of the decode step, and K is the size of
the groups of rows that read one cached prefill, so requests with another combination get a pool
of their own (compiled once per combination, in the background: below). Pools never hold more
than ``options.slots`` rows together (their KV caches are what ``--slots`` sizes): a request whose
combination has no pool takes the rows of idle pools (least recently used first) or, while they
are busy, waits at the head of the queue, later requests behind it, until they drain. Within a
pool every row carries its own state: its KV slots (validity and positions per slot), next-token
logits, the uniform numbers of its draws, step, token budget, tokens so far.

The worker thread loops:

1. admit: waiting items enter free rows (an item takes ``num_samples`` rows); their prefixes are
   prefilled in length buckets and a batch size from a few powers of two, and each prefill is
   copied into its rows' slots ``[0, L)`` (:func:`_insert`). The first item of a bucket in a
   pool of its shape starts the compile of the prefill and insert for every batch size of that
   bucket on a background thread (one compile at a time, in the order met) and waits, in its
   place in the queue, until it is done: the rows in flight decode on meanwhile, and items
   behind it whose buckets are compiled take free rows; once compiled, it takes the next free
   rows before any later item. Likewise a request whose sampling combination has no pool yet
   starts the compile of the pool's programs on that thread (its state's allocation, its decode
   chunk, the compaction of its decode segment and the freeing of cancelled rows), with the
   compiles of its items' buckets queued right behind it at once (so it waits for one pass of
   that queue, not for a round of the loop between the two), and waits in its place: the rows
   in flight in another pool decode on, and requests behind it whose pools exist take free rows;
   once compiled, its pool is allocated in the rows of idle pools as above (while they are busy
   it waits at the head of the queue, later requests behind it). So the loop
   itself compiles nothing for a new bucket or combination, and nothing compiles once a bucket
   has been seen: neither how many items arrive together, nor how many rows end in one chunk
   (they are read back whole), nor how many are cancelled together (a mask of the rows);
2. decode: ``chunk_steps`` steps of every pool with live rows in one compiled call
   (:func:`_chunk`); a row that draws a stop token, or spends its budget, is fed the end-of-turn
   token and its reward is read from that very step, as in ``cloud_jax.sampling``;
3. collect: finished rows hand their tokens and reward to their request and are freed; a request
   is answered when all its rows are.

A row's cache is two segments, as in the batch sampler: its prefill (the prefix segment, one per
row) and its critique so far (the decode segment). All rows write the same decode column each
step; a row that enters clears its decode slots and starts writing at the current column, so
columns free up only by compaction (:func:`_compact`, a per-row gather that moves each row's valid
decode slots to the front) when the next chunk would run past the segment's end.

A row draws with the key ``fold_in(fold_in(key(seed), content_id), sample)`` folded with its own
step (the key, and every step's uniform number from it, are made on the device when the row starts,
in the program that copies its prefill in, so neither an admission nor a decode step hashes keys
row by row: :func:`_sample_keys`, ``cloud_jax.sampling.methods.step_uniforms``), its prefill tokens
are the same, and its reward is read the same way, so a request's critiques and rewards equal
``rm.score`` on the same items and settings whatever else is in flight. As in the batch sampler,
the K samples of an item are a group of consecutive rows that read one cached copy of its prefill.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cloud_jax.data.layout import chat_layout, encode_critique_prefix
from cloud_jax.data.tokenizer import end_of_turn_ids
from cloud_jax.errors import ConfigError
from cloud_jax.model import KVCache, init_cache, unstack_layers, with_shared_prefix
from cloud_jax.model.config import ModelConfig
from cloud_jax.model.decode_step import decode_step
from cloud_jax.sampling import (bucket_length, content_row_ids, method_from, pad_prefixes, prefill,
                                penalize_repeats)
from cloud_jax.sampling.loop import seen_tokens, stop_array
from cloud_jax.sampling.methods import SamplingMethod, step_uniforms
from cloud_jax.scoring.rewards import ScoreConfig, resolve_critique_prefix, resolve_layout_version
from cloud_jax.serving.protocol import (WARMUP_ITEM, InvalidField, bucket_items,
                                        check_an_item_fits, check_options,
                                        check_request_size, check_item_lengths, check_settings,
                                        item_lengths, prompt_text)
from cloud_jax.serving.compiles import WARMUP_HINT, CompileWatch
from cloud_jax.serving.static import StaticBackend, _sampling, resolve_classic
from cloud_jax.serving.types import (BackendOptions, BackendStats, Item, ItemResult,
                                     QueueFull, Settings, ShuttingDown)
from cloud_jax.sharding import SAMPLE_RULES

log = logging.getLogger(__name__)

# What a compile line of a new sampling combination's pool ends with.
POOL_HINT = ("before the server starts, only the default settings' sampling method, repetition "
             "penalty and num_samples are compiled")


@flax.struct.dataclass
class PoolState:
    """Device state of one pool of S rows (M: the largest budget + 1)."""

    cache: KVCache
    logits: jax.Array  # [S, V] fp32
    # [S, M] fp32: row r's uniform number at step t (from its key, (seed, input, sample), folded
    # with t), made when the row starts (_insert), so that a step reads its numbers instead of
    # hashing every row's key. Greedy pools hold them too, unread: the insert, and so a prefill
    # bucket's compile, is then the same program whatever the sampling method.
    uniforms: jax.Array
    step: jax.Array  # [S] int32: draws made (= critique tokens written while live)
    budget: jax.Array  # [S] int32
    done: jax.Array  # [S] bool: free, or finished and not yet collected
    tokens: jax.Array  # [S, M] int32
    rewards: jax.Array  # [S] fp32
    truncated: jax.Array  # [S] bool
    seen: Optional[jax.Array] = None  # [S, V] bool, with a repetition penalty


@functools.partial(jax.jit, static_argnames=("cfg", "method", "penalty", "steps", "pad_id"),
                   donate_argnums=(1,))
def _chunk(params, s: PoolState, stop_ids, *, cfg: ModelConfig, method: SamplingMethod,
           penalty: float, steps: int, pad_id: int) -> PoolState:
    eot = stop_ids[0]
    rows = jnp.arange(s.step.shape[0])

    def body(_, s: PoolState) -> PoolState:
        live = ~s.done
        logits = s.logits if s.seen is None else penalize_repeats(s.logits, s.seen, penalty)
        drawn = method.draw(logits, s.uniforms[rows, s.step] if method.random else None)
        is_stop = jnp.isin(drawn, stop_ids)
        ending = live & (is_stop | (s.step >= s.budget))
        writing = live & ~ending
        fed = jnp.where(ending, eot, jnp.where(writing, drawn, pad_id))
        new_logits, rewards, cache = decode_step(params, None, cfg, fed, live, s.cache)
        column = jnp.minimum(s.step, s.tokens.shape[1] - 1)
        return s.replace(
            cache=cache, logits=new_logits,
            tokens=s.tokens.at[rows, column].set(jnp.where(writing, drawn, s.tokens[rows, column])),
            step=s.step + writing.astype(jnp.int32), done=s.done | ending,
            rewards=jnp.where(ending, rewards, s.rewards),
            truncated=jnp.where(ending, ~is_stop, s.truncated),
            seen=None if s.seen is None else s.seen.at[rows, drawn].max(writing))

    with nn.logical_axis_rules(SAMPLE_RULES):
        return jax.lax.fori_loop(0, steps, body, s)


def _sample_keys(seeds, content, samples) -> jax.Array:
    """Row j's key, ``fold_in(fold_in(key(seeds[j]), content[j]), samples[j])`` (seeds and
    content ids uint32), for every row at once: the per-row keys of
    ``fold_in(row_keys(seed, [content id])[0], sample)``, bit for bit."""
    def one(seed, content_id, sample):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), content_id), sample)

    return jax.vmap(one)(seeds, content, samples)


# The tokens each new row's prefix holds (a repetition penalty's pool), one compiled program
# that takes the host's padded prefixes as they are: run op by op, moving them onto the device
# compiled a program per bucket and batch size on the worker, which _compile_bucket missed.
_seen = jax.jit(seen_tokens, static_argnames="vocab_size")


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(s: PoolState, small: KVCache, logits, seen, groups, group_src, rows, src, seeds,
            content, samples, budgets) -> PoolState:
    """Copies prefill ``group_src[i]`` (of ``small``) into prefix slot ``groups[i]`` (read by that
    group's K rows), and starts row ``rows[j]`` on prefill ``src[j]`` with its decode slots
    cleared and the uniform numbers of its key for every step, the key derived here from its
    request's seed ``seeds[j]``, its input's content id ``content[j]`` and its sample
    ``samples[j]`` (:func:`_sample_keys`: an admission dispatches no key operation per row);
    entries out of range are dropped (they pad the index arrays to fixed lengths)."""
    keys = _sample_keys(seeds, content, samples)
    length = small.valid.shape[1]
    prefix = s.cache.prefix
    total = prefix.valid.shape[1]

    def put(big, part):  # [G, H, P, D] <- [b, H, L, D]
        return big.at[groups, :, :length, :].set(part[group_src], mode="drop")

    layers = tuple(layer.replace(k=put(layer.k, sl.k), v=put(layer.v, sl.v))
                   for layer, sl in zip(prefix.layers, small.layers))
    pad = jnp.zeros((group_src.shape[0], total - length), jnp.int32)
    prefix = prefix.replace(
        layers=layers,
        valid=prefix.valid.at[groups].set(jnp.concatenate([small.valid[group_src], pad], 1),
                                          mode="drop"),
        pos=prefix.pos.at[groups].set(jnp.concatenate([small.pos[group_src], pad], 1),
                                      mode="drop"))
    cache = s.cache.replace(prefix=prefix, valid=s.cache.valid.at[rows].set(0, mode="drop"))
    return s.replace(
        cache=cache, logits=s.logits.at[rows].set(logits[src], mode="drop"),
        uniforms=s.uniforms.at[rows].set(step_uniforms(keys, s.uniforms.shape[1]), mode="drop"),
        step=s.step.at[rows].set(0, mode="drop"), budget=s.budget.at[rows].set(budgets, mode="drop"),
        done=s.done.at[rows].set(False, mode="drop"),
        tokens=s.tokens.at[rows].set(0, mode="drop"),
        rewards=s.rewards.at[rows].set(0.0, mode="drop"),
        truncated=s.truncated.at[rows].set(False, mode="drop"),
        seen=None if s.seen is None else s.seen.at[rows].set(seen[src], mode="drop"))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _new_state(cfg: ModelConfig, s: int, groups: int, prefix_capacity: int, capacity: int,
               width: int, penalized: bool) -> PoolState:
    """The state of a pool of ``s`` rows, every row free: one compiled program (compiled with
    the pool's others, in the background), so that making the pool compiles nothing."""
    prefix = init_cache(cfg, groups, prefix_capacity)
    return PoolState(
        cache=with_shared_prefix(cfg, prefix, s, capacity),
        logits=jnp.zeros((s, cfg.vocab_size)),
        uniforms=jnp.zeros((s, width)), step=jnp.zeros(s, jnp.int32),
        budget=jnp.zeros(s, jnp.int32), done=jnp.ones(s, bool),
        tokens=jnp.zeros((s, width), jnp.int32), rewards=jnp.zeros(s),
        truncated=jnp.zeros(s, bool),
        seen=jnp.zeros((s, cfg.vocab_size), bool) if penalized else None)


@functools.partial(jax.jit, donate_argnums=(0,))
def _compact(s: PoolState) -> PoolState:
    """Moves each row's valid decode slots to the front, in order; ``end`` becomes the most any
    row holds. The prefix slots stay where they are."""
    order = jnp.argsort(1 - s.cache.valid, axis=1, stable=True)  # valid slots first, in order

    def gather(x):  # [S, H, C, D]
        return jnp.take_along_axis(x, order[:, None, :, None], axis=2)

    layers = tuple(layer.replace(k=gather(layer.k), v=gather(layer.v)) for layer in s.cache.layers)
    valid = jnp.take_along_axis(s.cache.valid, order, axis=1)
    cache = s.cache.replace(layers=layers, valid=valid,
                            pos=jnp.take_along_axis(s.cache.pos, order, axis=1),
                            end=jnp.max(jnp.sum(valid, axis=1)).astype(jnp.int32))
    return s.replace(cache=cache)


@functools.partial(jax.jit, donate_argnums=(0,))
def _free(s: PoolState, rows) -> PoolState:
    """Ends the rows where ``rows`` [S] bool is set: one shape whatever their number, so freeing
    (a cancelled request's rows) never compiles during traffic."""
    return s.replace(done=s.done | rows)


@dataclasses.dataclass
class _Request:
    items: list
    settings: Settings
    future: Future
    prefixes: list  # token ids per item
    results: list  # per item: per sample (tokens, reward, truncated) or None
    waiting: collections.deque  # item indices not yet admitted
    rows_left: int
    cancelled: bool = False
    # Chunk counters (for tests and metrics): when its first row started, when it finished.
    started_chunk: Optional[int] = None
    finished_chunk: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _PoolShape:
    """A pool's sizes and the shapes of its state (what :meth:`ContinuousBackend._compile_bucket`
    compiles for), made from its settings (:meth:`ContinuousBackend._pool_shape`) on the compile
    thread, so that a bucket can compile before its pool exists and never reads a pool's state,
    which the decode replaces (donates)."""

    k: int
    groups: int
    rows: int
    penalty: float
    state: PoolState  # of jax.ShapeDtypeStruct


@dataclasses.dataclass(eq=False)
class _Compile:
    """A prefill bucket, or a new sampling combination's pool, compiling in the background, and
    the items waiting for it to start."""

    # A bucket: (K, with a repetition penalty, prefill bucket); a pool: (method, penalty, K)
    # (the two never compare equal: a method is no int).
    key: tuple
    what: str  # the bucket or the pool, as the log line names it
    serving: bool  # met by traffic (start()'s warm-up is none): logged and counted
    started_chunk: int
    pool: bool = False  # a pool's programs (else a bucket's)
    waiters: list = dataclasses.field(default_factory=list)  # [(request, item)] that waited
    done: bool = False
    error: Optional[BaseException] = None
    programs: int = 0
    seconds: float = 0.0
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)


class _Pool:
    def __init__(self, engine: "ContinuousBackend", method: SamplingMethod, penalty: float,
                 k: int):
        self.method, self.penalty, self.k = method, penalty, k
        s = engine.rows_for(k)
        self.groups = s // k
        self.rows = s
        self.capacity = engine.capacity
        self.owner: list = [None] * s  # (request, item, sample) per row
        # Its programs (this allocation's among them) were compiled before it is made
        # (ContinuousBackend._compile_pool), so making and running it compiles nothing.
        self.state = _new_state(*engine.state_args(penalty, k))

    def bucket_key(self, length: int) -> tuple:
        """(K, with a repetition penalty, prefill bucket): what a bucket's compile is kept by;
        pools of the same K and penalty share the shapes it compiles."""
        return self.k, self.penalty != 1.0, length

    def free_groups(self) -> list[int]:
        """Groups whose K rows are all free (an item takes one group)."""
        k = self.k
        return [g for g in range(self.groups)
                if all(o is None for o in self.owner[g * k:(g + 1) * k])]

    def busy(self) -> int:
        return sum(o is not None for o in self.owner)


class ContinuousBackend:
    """See the module docstring; implements :class:`cloud_jax.serving.types.Backend`. A classic
    model has no critiques to batch: it is served by the static batcher."""

    def __new__(cls, rm, options: BackendOptions = BackendOptions(), **kwargs):
        if resolve_classic(rm, options):
            return StaticBackend(rm, options)
        return super().__new__(cls)

    def __init__(self, rm, options: BackendOptions = BackendOptions(), *, chunk_steps: int = 8):
        if rm.mesh is not None and rm.mesh.size > 1:
            raise ConfigError("--batching continuous runs on one device; with --mesh over "
                              f"{rm.mesh.size} devices use --batching static")
        check_options(options, False)
        self.rm, self.options, self.chunk_steps = rm, options, chunk_steps
        self.classic = False
        self.cfg, self.params = rm.config, rm.params
        if self.cfg.scan_layers:
            self.params = unstack_layers(self.params, self.cfg.num_layers)
            self.cfg = dataclasses.replace(self.cfg, scan_layers=False)
        tok = rm.tokenizer
        if tok is None:
            raise ValueError("the model has no tokenizer; serve a directory that holds one")
        self.stop_ids = stop_array(end_of_turn_ids(tok))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        score_cfg = ScoreConfig()
        self.prefix = resolve_critique_prefix(rm, score_cfg)
        self.version = resolve_layout_version(rm, score_cfg)
        self.max_budget = options.max_critique_tokens
        # Prefix slots per row (the largest prefill bucket) and decode slots per row.
        self.prefix_capacity = bucket_length(options.max_length)
        self.capacity = self.max_budget + 1 + 2 * chunk_steps
        self._lock = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_items = 0
        # (method, penalty, K) -> pool, least recently used first.
        self._pools: collections.OrderedDict = collections.OrderedDict()
        # (K, with a repetition penalty, prefill bucket) whose prefill sizes are compiled.
        self._compiled_buckets: set = set()
        # (method, penalty, K) whose pool's programs are compiled.
        self._compiled_pools: set = set()
        # Buckets and pools compiling in the background (one at a time, in the order met), or
        # compiled and not yet taken up by the worker: key -> _Compile.
        self._compiling: dict = {}
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="continuous-compile")
        # What the worker met for the first time in its current step (a pool's settings): named
        # in the log line of any compile the step made (a bucket or a pool compiled in the
        # background has a line of its own).
        self._firsts: list[str] = []
        self._complete: list[_Request] = []  # answered after the step (_deliver)
        self._compiles = 0
        self._compile_seconds = 0.0
        self._tokens = 0
        self._closing = False
        self._cancel: list[_Request] = []
        self.chunks = 0
        # future -> (chunk its first row started in, chunk it finished in), for the last requests.
        self.spans: collections.OrderedDict = collections.OrderedDict()
        self._worker: Optional[threading.Thread] = None
        self.ready = False
        # Tokenizers are not thread-safe: requests are encoded with a copy, the worker decodes with
        # the model's own.
        self._submit_tok = copy.deepcopy(tok)
        check_an_item_fits(rm, options, False, self._submit_tok)

    # -- Backend protocol ---------------------------------------------------------------------

    def start(self) -> None:
        """Answers a one-item request with the default settings (makes their pool, compiles its
        decode and the prefill of the item's bucket); with ``options.warmup == "buckets"`` also
        compiles the prefill of every length bucket an item can fall in."""
        warm = dataclasses.replace(self.options.defaults, max_critique_tokens=2)
        future = self._enqueue([WARMUP_ITEM], warm)
        self._worker = threading.Thread(target=self._run, name="continuous-backend", daemon=True)
        self._worker.start()
        future.result()
        if self.options.warmup == "buckets":
            # The worker is idle: no request is admitted before ``ready``.
            started = time.perf_counter()
            pool = self._pools[self._pool_key(warm)]
            items = bucket_items(self.rm, False, self.options, self._submit_tok)
            for length in item_lengths(self.rm, items, False, warm, self._submit_tok):
                key = pool.bucket_key(bucket_length(length))
                if key not in self._compiled_buckets:
                    self._compile_bucket(self._pool_shape(pool.penalty, pool.k),
                                         bucket_length(length))
                    with self._lock:
                        self._compiled_buckets.add(key)
            log.info("warm-up: compiled %d length buckets in %.1f s", len(items),
                     time.perf_counter() - started)
        self.ready = True

    def submit(self, items: Sequence[Item], settings: Settings) -> Future:
        check_settings(settings, self.options, False)
        if not items:
            raise InvalidField("items", "must not be empty")
        check_request_size(items, settings, self.options, False)
        check_item_lengths(self.rm, items, False, settings, self.options, self._submit_tok)
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down and admits no new requests")
            if self._queued_items + len(items) > self.options.max_queue:
                raise QueueFull(self.options.max_queue)
        return self._enqueue(items, settings)

    def _enqueue(self, items: Sequence[Item], settings: Settings) -> Future:
        prefixes = [encode_critique_prefix(self._submit_tok, prompt_text(it.prompt), it.response,
                                           self.prefix, None, self.version) for it in items]
        req = _Request(list(items), settings, Future(), prefixes,
                       [[None] * settings.num_samples for _ in items],
                       collections.deque(range(len(items))), len(items) * settings.num_samples)
        with self._lock:
            self._queue.append(req)
            self._queued_items += len(items)
            self._lock.notify_all()
        return req.future

    def cancel(self, future: Future) -> None:
        with self._lock:
            for req in list(self._queue):
                if req.future is future:
                    req.cancelled = True
                    self._cancel.append(req)
            for pool in self._pools.values():
                for owner in pool.owner:
                    if owner is not None and owner[0].future is future:
                        owner[0].cancelled = True
                        self._cancel.append(owner[0])
            self._lock.notify_all()
        future.cancel()

    def stats(self) -> BackendStats:
        with self._lock:
            busy = sum(p.busy() for p in self._pools.values())
            # --slots: the pools' rows are a multiple of their K, and may be fewer.
            return BackendStats(queue_depth=self._queued_items, busy_slots=busy,
                                total_slots=self.options.slots, critique_tokens=self._tokens,
                                compiles=self._compiles, compile_seconds=self._compile_seconds)

    def close(self, drain: bool = True) -> None:
        with self._lock:
            self._closing = True
            if not drain:
                for req in self._queue:
                    req.cancelled = True
                    self._cancel.append(req)  # dropped, not admitted nor waited for
                    if not req.future.done():
                        req.future.set_exception(ShuttingDown("the server stopped first"))
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join()
        # A compile that no request waits for any more is not waited for either.
        self._compiler.shutdown(wait=False, cancel_futures=True)

    # -- the worker ---------------------------------------------------------------------------

    @staticmethod
    def _pool_key(settings: Settings) -> tuple:
        method = method_from(settings.temperature, settings.top_k, settings.top_p)
        return (method, float(settings.repetition_penalty), settings.num_samples)

    def rows_for(self, k: int) -> int:
        """The rows of a pool of K samples an item: the most whole groups of K in --slots."""
        return self.options.slots // k * k

    def state_args(self, penalty: float, k: int) -> tuple:
        """What :func:`_new_state` makes a pool's state of (the arguments of the one program,
        compiled and run)."""
        s = self.rows_for(k)
        return (self.cfg, s, s // k, self.prefix_capacity, self.capacity, self.max_budget + 1,
                penalty != 1.0)

    def _make_room(self, settings: Settings, keep: set = frozenset()) -> bool:
        """Gives the rows of idle pools (least recently used first, except those in ``keep``)
        back until a pool for ``settings`` fits within --slots rows; False while the rows it
        needs are busy elsewhere. Called under the lock; only the worker changes ``_pools``."""
        need = self.rows_for(settings.num_samples)
        for old in list(self._pools):
            if sum(p.rows for p in self._pools.values()) + need <= self.options.slots:
                break
            if self._pools[old].busy() == 0 and old not in keep:
                del self._pools[old]  # its cache is freed with it
        return sum(p.rows for p in self._pools.values()) + need <= self.options.slots

    def _idle(self) -> bool:
        return not self._queue and all(p.busy() == 0 for p in self._pools.values())

    def _nothing_to_do(self) -> bool:
        """Under the lock: no row decodes, nothing is to be cancelled or taken up from a
        finished compile, and every item queued waits for its bucket's or its pool's compile,
        or behind a request that does (as :meth:`_place` would find: with every pool idle, an
        item of a compiled bucket enters at once)."""
        if (self._cancel or any(p.busy() for p in self._pools.values())
                or any(job.done for job in self._compiling.values())):
            return False
        waited_in = set()
        for req in self._queue:
            key = self._pool_key(req.settings)
            pool = self._pools.get(key)
            if pool is None and key in self._compiling:
                continue  # waits for its pool's programs; the requests behind it go on
            if pool is None and key not in self._compiled_pools:
                return False  # its pool's compile starts now
            if pool is None:  # made now, unless the pools waited in leave it no room
                need = self.rows_for(req.settings.num_samples)
                return sum(self._pools[k].rows for k in waited_in) + need > self.options.slots
            for item in req.waiting:
                if pool.bucket_key(bucket_length(len(req.prefixes[item]))) \
                        not in self._compiling:
                    return False
            waited_in.add(key)
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._nothing_to_do() and not (self._closing and self._idle()):
                    self._lock.wait()
                if self._closing and self._idle():
                    return
                serving = self.ready  # start()'s warm-up request is no traffic
                # Who waits for what this step compiles: the rows decoding, the items queued.
                waiting = (sum(p.busy() for p in self._pools.values()), self._queued_items)
            self._firsts = []
            self._complete = []
            self._finish_compiles()
            try:
                with CompileWatch() as watch:
                    self._drop_cancelled()
                    self._admit()
                    self._decode()
            except Exception as err:  # fail what is in flight, keep serving
                log.exception("the decode loop failed")
                self._fail_all(err)
            if serving and watch.programs:
                self._log_compile(watch, *waiting)
            # Answered after the step's compile line and count: a caller who reads the log or
            # /metrics once its answer came finds the compile that delayed it there.
            self._deliver()

    def _log_compile(self, watch: CompileWatch, busy: int, queued: int) -> None:
        """The worker's last step compiled (a length bucket and a pool's programs compile in
        the background, :meth:`_log_background_compile`, so only a shape met for the first time
        that neither covers) while every row in flight, and every item queued, waited: says
        which and how long, once (a shape once seen compiles nothing)."""
        with self._lock:
            self._compiles += 1
            self._compile_seconds += watch.seconds
        what = "; ".join(self._firsts) or "a shape"
        log.info("compiled %d program(s) in %.1f s for %s met for the first time: the %d decode "
                 "row(s) in flight and the %d item(s) waiting to start (the one that met it "
                 "among them) waited for it; %s", watch.programs, watch.seconds, what, busy,
                 queued, WARMUP_HINT)

    def _log_background_compile(self, job: _Compile) -> None:
        """A bucket or a pool compiled in the background while the rows in flight decoded: says
        which, how long and who waited (the items that met it), once, as a compile that
        stalled."""
        requests = len({id(req) for req, _ in job.waiters})
        who = (f"the {len(job.waiters)} item(s) of {requests} request(s) that met it waited for "
               "it to start" if job.waiters else
               "no request waits for it any more (those that met it were cancelled)")
        log.info("compiled %d program(s) in %.1f s for %s met for the first time: %s, while the "
                 "rows in flight decoded on (%d chunk(s)); %s", job.programs, job.seconds,
                 job.what, who, self.chunks - job.started_chunk,
                 POOL_HINT if job.pool else WARMUP_HINT)

    def _finish_compiles(self) -> None:
        """Takes up the bucket and pool compiles done in the background: a compiled one is
        logged and counted (met by traffic) and its items may start; a failed one fails the
        requests that waited for it with its error (their other rows freed), and the next item
        that meets that bucket or combination compiles it again."""
        with self._lock:
            done = [job for job in self._compiling.values() if job.done]
            for job in done:
                del self._compiling[job.key]
                # A request cancelled meanwhile waits no more: not counted, not failed again.
                job.waiters = [(req, item) for req, item in job.waiters if not req.cancelled]
                if job.error is None:
                    (self._compiled_pools if job.pool else self._compiled_buckets).add(job.key)
                    if job.serving and job.programs:
                        self._compiles += 1
                        self._compile_seconds += job.seconds
                    continue
                for req, _ in job.waiters:
                    if not req.future.done():
                        req.future.set_exception(job.error)
                    if not req.cancelled:
                        req.cancelled = True
                        self._cancel.append(req)
        for job in done:
            if job.error is not None:
                log.error("compiling %s failed: the %d request(s) waiting for it fail with "
                          "its error (the next request that meets it compiles it again)",
                          job.what, len({id(req) for req, _ in job.waiters}),
                          exc_info=job.error)
            elif job.serving and job.programs:
                self._log_background_compile(job)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancel = self._cancel, []
            for req in cancelled:
                if req in self._queue:
                    self._queue.remove(req)
                    self._queued_items -= len(req.waiting)
        for pool in self._pools.values():
            rows = [o is not None and o[0].cancelled for o in pool.owner]
            if any(rows):
                pool.state = _free(pool.state, np.asarray(rows))
                for r, cancelled in enumerate(rows):
                    if cancelled:
                        pool.owner[r] = None

    def _admit(self) -> None:
        """Moves waiting items into free rows, oldest request first. A pool for new settings
        (its programs compiled in the background first, :meth:`_pool_compiled`) is allocated
        outside the lock, so /health and /metrics are answered meanwhile."""
        placed: dict = collections.defaultdict(list)  # pool -> [(request, item, group)]
        while True:
            with self._lock:
                wanted = self._place(placed)
            if wanted is None:
                break
            req, key = wanted
            method, penalty, k = key
            try:
                pool = _Pool(self, method, penalty, k)
            except Exception as err:  # its cache does not fit, say: this request fails
                log.exception("no decode pool for a request's settings %s", req.settings)
                with self._lock:
                    if req in self._queue:
                        self._queue.remove(req)
                        self._queued_items -= len(req.waiting)
                if not req.future.done():
                    req.future.set_exception(err)
                continue
            with self._lock:
                self._pools[key] = pool
            self._firsts.append(f"a decode pool for num_samples={k}, {_sampling(req.settings)}")
        for pool in list(self._pools.values()):
            if placed[id(pool)]:
                self._prefill_into(pool, placed[id(pool)])

    def _place(self, placed: dict) -> Optional[tuple]:
        """Under the lock: places waiting items into the free groups of existing pools. Returns
        (request, pool key) when the request at which it stopped needs a pool that fits once
        allocated, None when nothing more can be placed now."""
        # Pools an earlier request still waits in (for its bucket's compile): not given away to
        # a later request's settings, however idle.
        waited_in: set = set()
        for req in list(self._queue):
            key = self._pool_key(req.settings)
            if key in self._pools:
                self._pools.move_to_end(key)
            elif not self._pool_compiled(req, key):
                # Its pool's programs compile in the background: it waits in its place in the
                # queue, and the requests behind it go on meanwhile. Its items' buckets are
                # queued on that thread right behind them, when the request is first met, so it
                # waits one pass of that queue (not the pool's compile, then the buckets').
                for item in req.waiting:
                    self._bucket_compiled(req, item)
                continue
            elif self._make_room(req.settings, waited_in):
                return req, key
            else:
                return None  # its rows are busy elsewhere: later requests wait behind it
            pool = self._pools[key]
            free = pool.free_groups()
            k = pool.k
            for item in list(req.waiting):
                # An item whose bucket is compiling waits for it, in its place in the queue;
                # the items behind it whose buckets are compiled take the free rows meanwhile.
                if not self._bucket_compiled(req, item) or not free:
                    continue
                req.waiting.remove(item)
                group, free = free[0], free[1:]
                for sample in range(k):
                    pool.owner[group * k + sample] = (req, item, sample)
                placed[id(pool)].append((req, item, group))
                self._queued_items -= 1
                if req.started_chunk is None:
                    req.started_chunk = self.chunks
            if req.waiting:
                waited_in.add(key)
            else:
                self._queue.remove(req)
        return None

    @staticmethod
    def _bucket_key(settings: Settings, length: int) -> tuple:
        """(K, with a repetition penalty, prefill bucket): what a bucket's compile is kept by
        (as :meth:`_Pool.bucket_key` for the pool of ``settings``)."""
        return settings.num_samples, float(settings.repetition_penalty) != 1.0, length

    def _bucket_compiled(self, req: _Request, item: int) -> bool:
        """Under the lock: whether the prefill bucket of ``item`` is compiled for the pool of
        ``req``'s settings (which need not exist yet); if not, the item waits for its compile,
        which starts in the background the first time an item meets the bucket (one compile at a
        time, in the order met)."""
        length = bucket_length(len(req.prefixes[item]))
        k, penalty = req.settings.num_samples, float(req.settings.repetition_penalty)
        return self._compiled(
            self._bucket_key(req.settings, length), [(req, item)],
            lambda: (f"prefill bucket {length} at batch sizes 1 to {self.rows_for(k) // k} "
                     f"(num_samples={k})", self._compile_bucket_of, (penalty, k, length)))

    def _pool_compiled(self, req: _Request, key: tuple) -> bool:
        """Under the lock: whether the programs of a pool for ``req``'s sampling combination
        ``key`` are compiled; if not, the request's items wait for their compile, which starts
        in the background the first time a request meets the combination (on the thread and in
        the queue of the buckets' compiles: one at a time, in the order met)."""
        return self._compiled(
            key, [(req, item) for item in req.waiting],
            lambda: (f"a decode pool for num_samples={req.settings.num_samples}, "
                     f"{_sampling(req.settings)}", self._compile_pool, key), pool=True)

    def _compiled(self, key: tuple, waiters: list, start, pool: bool = False) -> bool:
        """Under the lock: whether the bucket (or, with ``pool``, the pool's programs) of
        ``key`` is compiled; if not, ``waiters`` [(request, item)] wait for its compile (each
        once), which starts in the background the first time ``key`` is met: ``start()`` gives
        what the log names it, the compile function and its arguments."""
        if key in (self._compiled_pools if pool else self._compiled_buckets):
            return True
        job = self._compiling.get(key)
        if job is None:
            what, compile_fn, args = start()
            job = _Compile(key, what, self.ready, self.chunks, pool=pool)
            self._compiling[key] = job
            self._compiler.submit(self._compile_in_background, job, compile_fn, *args)
        if not job.done:
            met = {(id(r), i) for r, i in job.waiters}
            job.waiters.extend((r, i) for r, i in waiters if (id(r), i) not in met)
        return False

    def _compile_in_background(self, job: _Compile, compile_fn, *args) -> None:
        """Runs on the compile thread: ``compile_fn(*args)`` compiles the bucket or the pool,
        then the worker is woken."""
        error, watch = None, CompileWatch()
        try:
            with watch:
                compile_fn(*args)
        except BaseException as err:  # noqa: BLE001 - fails the requests that waited for it
            error = err
        with self._lock:
            job.programs, job.seconds, job.error = watch.programs, watch.seconds, error
            job.done = True
            self._lock.notify_all()
        job.finished.set()

    def _prefill_into(self, pool: _Pool, placed: list) -> None:
        by_bucket = collections.defaultdict(list)
        for req, item, group in placed:
            by_bucket[bucket_length(len(req.prefixes[item]))].append((req, item, group))
        s, k = pool.rows, pool.k
        for length, group in sorted(by_bucket.items()):
            b = 1 << max(len(group) - 1, 0).bit_length()  # a power of two: few compiled sizes
            prefixes = [req.prefixes[item] for req, item, _ in group]
            ids, mask = pad_prefixes(prefixes + [prefixes[0]] * (b - len(group)), length,
                                     self.pad_id)
            logits, small = prefill(self.params, ids, mask, cfg=self.cfg, cache_len=length,
                                    rules=tuple(SAMPLE_RULES))
            seen = (None if pool.penalty == 1.0 else
                    _seen(ids, mask, vocab_size=self.cfg.vocab_size))
            content = content_row_ids(prefixes)
            groups, group_src = [], []
            rows, src, seeds, row_content, samples, budgets = [], [], [], [], [], []
            for j, (req, item, g) in enumerate(group):
                groups.append(g)
                group_src.append(j)
                for sample in range(k):  # its keys are derived in _insert
                    rows.append(g * k + sample)
                    src.append(j)
                    seeds.append(req.settings.seed)
                    row_content.append(content[j])
                    samples.append(sample)
                    budgets.append(req.settings.max_critique_tokens)
            n, ng = len(rows), len(groups)
            groups += [pool.groups] * (pool.groups - ng)
            group_src += [0] * (pool.groups - ng)
            for per_row, pad in ((rows, s), (src, 0), (seeds, 0), (row_content, 0),
                                 (samples, 0), (budgets, 0)):
                per_row += [pad] * (s - n)
            i32 = functools.partial(np.asarray, dtype=np.int32)  # no eager conversion to compile
            u32 = functools.partial(np.asarray, dtype=np.uint32)
            pool.state = _insert(pool.state, small, logits, seen, i32(groups), i32(group_src),
                                 i32(rows), i32(src), u32(seeds), u32(row_content), i32(samples),
                                 i32(budgets))

    def _pool_shape(self, penalty: float, k: int) -> _PoolShape:
        """The sizes and state shapes of a pool of these settings, as :func:`_new_state` makes
        them (traced, not run): what a bucket's compile needs, known before the pool exists."""
        args = self.state_args(penalty, k)
        state = jax.eval_shape(functools.partial(_new_state, *args))
        return _PoolShape(k, args[2], args[1], penalty,
                          jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))

    def _compile_bucket_of(self, penalty: float, k: int, length: int) -> None:
        """Runs on the compile thread: :meth:`_compile_bucket` for the pool of these settings."""
        self._compile_bucket(self._pool_shape(penalty, k), length)

    def _compile_bucket(self, pool: _PoolShape, length: int) -> None:
        """Compiles (without running) the prefill, the insert and, for a repetition penalty's
        pool, the record of the tokens each prefix holds (``_seen``), for every batch size
        ``_prefill_into`` can take in prefill bucket ``length`` of a pool of this shape, so how
        many items happen to arrive together never compiles anything later. Called on the
        compile thread the first time an item meets the bucket (and by ``start`` for
        ``--warmup buckets``); reads no state the worker changes."""
        groups = jax.ShapeDtypeStruct((pool.groups,), jnp.int32)
        rows = jax.ShapeDtypeStruct((pool.rows,), jnp.int32)
        keyed = jax.ShapeDtypeStruct((pool.rows,), jnp.uint32)  # rows' seeds, content ids
        static = dict(cfg=self.cfg, cache_len=length, rules=tuple(SAMPLE_RULES))
        b = 1
        while True:
            ids = jax.ShapeDtypeStruct((b, length), jnp.int32)
            prefill.lower(self.params, ids, ids, **static).compile()
            logits, small = jax.eval_shape(functools.partial(prefill, **static), self.params,
                                           ids, ids)
            seen = None
            if pool.penalty != 1.0:
                _seen.lower(ids, ids, vocab_size=self.cfg.vocab_size).compile()
                seen = jax.eval_shape(functools.partial(_seen, vocab_size=self.cfg.vocab_size),
                                      ids, ids)
            _insert.lower(pool.state, small, logits, seen, groups, groups, rows, rows, keyed,
                          keyed, rows, rows).compile()
            if b >= pool.groups:
                break
            b *= 2

    def _compile_pool(self, method: SamplingMethod, penalty: float, k: int) -> None:
        """Compiles (without running) what a pool of these settings runs: its state's
        allocation, its decode chunk, the compaction of its decode segment and the freeing of
        cancelled rows, so that neither making the pool, nor its first chunk, first compaction
        or first cancelled request compiles on the worker. Called on the compile thread the
        first time a request meets the combination (start()'s warm-up request included); reads
        no state the worker changes."""
        args = self.state_args(penalty, k)
        _new_state.lower(*args).compile()
        state = jax.eval_shape(functools.partial(_new_state, *args))
        _chunk.lower(self.params, state, self.stop_ids, cfg=self.cfg, method=method,
                     penalty=penalty, steps=self.chunk_steps, pad_id=self.pad_id).compile()
        _compact.lower(state).compile()
        _free.lower(state, state.done).compile()

    def _decode(self) -> None:
        """Runs a chunk of every pool with live rows; counts a chunk if any ran (a step in which
        every item waits for its bucket's compile decodes nothing)."""
        ran = False
        for pool in list(self._pools.values()):
            if pool.busy() == 0:
                continue
            ran = True
            if int(pool.state.cache.end) + self.chunk_steps > pool.capacity:
                pool.state = _compact(pool.state)
            pool.state = _chunk(self.params, pool.state, self.stop_ids, cfg=self.cfg,
                                method=pool.method, penalty=pool.penalty,
                                steps=self.chunk_steps, pad_id=self.pad_id)
            self._collect(pool)
        if ran:
            self.chunks += 1

    def _collect(self, pool: _Pool) -> None:
        done = np.asarray(pool.state.done)
        finished = [r for r, o in enumerate(pool.owner) if o is not None and done[r]]
        if not finished:
            return
        # Whole arrays, not the finished rows: a gather shaped by how many rows ended in this
        # chunk would compile again for every new count.
        tokens, steps, rewards, truncated = jax.device_get(
            (pool.state.tokens, pool.state.step, pool.state.rewards, pool.state.truncated))
        complete = []
        for r in finished:
            req, item, sample = pool.owner[r]
            pool.owner[r] = None
            n = int(steps[r])
            req.results[item][sample] = (tokens[r, :n].tolist(), float(rewards[r]),
                                         bool(truncated[r]))
            self._tokens += n
            req.rows_left -= 1
            if req.rows_left == 0:
                req.finished_chunk = self.chunks
                self.spans[req.future] = (req.started_chunk, req.finished_chunk)
                while len(self.spans) > 1024:
                    self.spans.popitem(last=False)
                complete.append(req)
        self._complete.extend(complete)

    def _deliver(self) -> None:
        """Answers the requests whose last row ended in the worker's last step."""
        complete, self._complete = self._complete, []
        for req in complete:
            if req.cancelled or req.future.done():
                continue
            try:
                req.future.set_result(self._results(req))
            except Exception as err:  # noqa: BLE001 - that request fails, the server serves on
                log.exception("reading the results of a request failed")
                req.future.set_exception(err)

    def _results(self, req: _Request) -> list[ItemResult]:
        tok, layout = self.rm.tokenizer, chat_layout(self.rm.tokenizer)
        out = []
        for samples in req.results:
            rewards = np.asarray([s[1] for s in samples], np.float32)
            out.append(ItemResult(
                reward=float(rewards.mean()), sample_rewards=[float(x) for x in rewards],
                reward_std=float(rewards.std()),
                critiques=[layout.critique_text(tok.decode(s[0], skip_special_tokens=True),
                                                self.prefix, self.version) for s in samples],
                truncated=[s[2] for s in samples]))
        return out

    def _fail_all(self, err: Exception) -> None:
        """Fails every request with rows in flight (their items still queued leave the queue)
        and drops the pools: a program that failed on the device has consumed the state donated
        to it, so the next request of each combination gets a pool of its own (its programs are
        compiled: making it compiles nothing)."""
        failed = []
        for pool in self._pools.values():
            for owner in pool.owner:
                if owner is not None:
                    if not owner[0].future.done():
                        owner[0].future.set_exception(err)
                    failed.append(owner[0])
        with self._lock:
            self._pools.clear()
            for req in failed:
                if not req.cancelled:
                    req.cancelled = True
                    self._cancel.append(req)
