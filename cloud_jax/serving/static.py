"""The static batcher: waiting requests are taken as one batch and scored with ``rm.score``; every
request of the batch waits for the batch's longest critique.

It is the simplest backend behind the serving contract (``types.py``) and the baseline the
continuous-batching engine is measured against (``python -m cloud_jax bench serve``). Requests
whose settings differ at most in their critique budget share a batch (one scoring call, each input
with its own budget); a request's results equal ``rm.score`` on its own items, because each
input's random stream derives from its own tokens, never from its batch.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from typing import Optional, Sequence

import numpy as np

from cloud_jax.serving.compiles import WARMUP_HINT, CompileWatch
from cloud_jax.serving.types import (BackendOptions, BackendStats, Item, ItemResult,
                                     QueueFull, Settings, ShuttingDown)
from cloud_jax.serving.protocol import (WARMUP_ITEM, InvalidField, bucket_items,
                                        check_an_item_fits, check_options,
                                        check_request_size, check_item_lengths, check_settings,
                                        item_lengths, prompt_text)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Request:
    items: Sequence[Item]
    settings: Settings
    future: Future
    submitted: float


class StaticBackend:
    """See the module docstring; implements :class:`cloud_jax.serving.types.Backend`."""

    def __init__(self, rm, options: BackendOptions = BackendOptions()):
        self.rm = rm
        self.options = options
        self.classic = resolve_classic(rm, options)
        check_options(options, self.classic)
        self._lock = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_items = 0
        self._busy_rows = 0
        self._tokens = 0
        self._compiles = 0
        self._compile_seconds = 0.0
        self._closing = False
        self._worker: Optional[threading.Thread] = None
        self.ready = False
        # Tokenizers are not thread-safe (a call may switch settings for its duration): requests
        # are checked with a copy of the model's, the worker scores with the model's own.
        self._submit_tok = copy.deepcopy(rm.tokenizer)
        if rm.tokenizer is not None:
            check_an_item_fits(rm, options, self.classic, self._submit_tok)

    # -- Backend protocol ---------------------------------------------------------------------

    def start(self) -> None:
        """Compiles the prefill and decode shapes of a one-item request (the budgeted path every
        request takes), or with ``options.warmup == "buckets"`` those of every length bucket and
        batch size, then starts the worker."""
        warm = Settings(**{**dataclasses.asdict(self.options.defaults), "max_critique_tokens": 2})
        self._score([WARMUP_ITEM], warm, [warm.max_critique_tokens])
        if self.options.warmup == "buckets":
            self._warm_buckets()
        self._worker = threading.Thread(target=self._run, name="static-backend", daemon=True)
        self._worker.start()
        self.ready = True

    def submit(self, items: Sequence[Item], settings: Settings) -> Future:
        check_settings(settings, self.options, self.classic)
        if not items:
            raise InvalidField("items", "must not be empty")
        check_request_size(items, settings, self.options, self.classic)
        check_item_lengths(self.rm, items, self.classic, settings, self.options,
                           self._submit_tok)
        future: Future = Future()
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down and admits no new requests")
            if self._queued_items + len(items) > self.options.max_queue:
                raise QueueFull(self.options.max_queue)
            self._queue.append(_Request(list(items), settings, future, time.monotonic()))
            self._queued_items += len(items)
            self._lock.notify_all()
        return future

    def cancel(self, future: Future) -> None:
        """Drops a request still waiting; one already in a running batch finishes unseen."""
        with self._lock:
            for req in list(self._queue):
                if req.future is future:
                    self._queue.remove(req)
                    self._queued_items -= len(req.items)
                    break
        future.cancel()

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(queue_depth=self._queued_items, busy_slots=self._busy_rows,
                                total_slots=self.options.slots, critique_tokens=self._tokens,
                                compiles=self._compiles, compile_seconds=self._compile_seconds)

    def close(self, drain: bool = True) -> None:
        with self._lock:
            self._closing = True
            if not drain:
                while self._queue:
                    req = self._queue.popleft()
                    req.future.set_exception(ShuttingDown("the server stopped before this "
                                                          "request started"))
                self._queued_items = 0
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join()

    def _warm_buckets(self) -> None:
        """Scores, with the default settings and a budget of 0 (one decode step), a batch of
        every size a batch can take (powers of two below the items that fit the slots, and
        that many) in every length bucket an item can fall in: each shape compiles now."""
        started = time.perf_counter()
        items = bucket_items(self.rm, self.classic, self.options, self._submit_tok)
        k = 1 if self.classic else self.options.defaults.num_samples
        per_batch = max(1, self.options.slots // k)
        sizes = [1 << i for i in range(per_batch.bit_length()) if 1 << i < per_batch]
        sizes.append(per_batch)
        for item in items:
            for n in sizes:
                self._score([item] * n, self.options.defaults, [0] * n)
        log.info("warm-up: compiled %d length buckets x %d batch sizes in %.1f s", len(items),
                 len(sizes), time.perf_counter() - started)

    # -- the worker ---------------------------------------------------------------------------

    def _rows(self, req: _Request) -> int:
        return len(req.items) * (1 if self.classic else req.settings.num_samples)

    def _take_batch(self) -> Optional[list[_Request]]:
        """The oldest request and every later waiting one with the same settings, up to the
        slots (a request larger than that runs alone). None when closing with nothing left."""
        with self._lock:
            while not self._queue and not self._closing:
                self._lock.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            batch, rows = [first], self._rows(first)
            for req in list(self._queue):
                if (_batch_key(req.settings) == _batch_key(first.settings)
                        and rows + self._rows(req) <= self.options.slots):
                    self._queue.remove(req)
                    batch.append(req)
                    rows += self._rows(req)
            self._queued_items -= sum(len(r.items) for r in batch)
            self._busy_rows = rows
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            try:
                if live:
                    items = [item for r in live for item in r.items]
                    budgets = [r.settings.max_critique_tokens for r in live for _ in r.items]
                    with CompileWatch() as watch:
                        results, tokens = self._score(items, live[0].settings, budgets)
                    if watch.programs:
                        self._log_compile(watch, items, live[0].settings)
                    start = 0
                    for r in live:
                        r.future.set_result(results[start:start + len(r.items)])
                        start += len(r.items)
                    with self._lock:
                        self._tokens += tokens
            except Exception as err:  # one bad batch must not stop the server
                log.exception("scoring a batch of %d requests failed", len(live))
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(err)
            finally:
                with self._lock:
                    self._busy_rows = 0

    def _log_compile(self, watch: CompileWatch, items: Sequence[Item], settings: Settings) -> None:
        """A batch met a shape (length bucket, batch size, sampling settings) for the first time
        and compiled for it while it, and the requests queued behind it, waited: says which
        shape and how long, once per shape (the next batch of that shape compiles nothing)."""
        from cloud_jax.sampling import bucket_length

        k = 1 if self.classic else settings.num_samples
        per_batch = max(1, self.options.slots // k)
        lengths = item_lengths(self.rm, items, self.classic, settings)
        # As _score and rm.score run them: per_batch at a time (sorted by length, but for a
        # classic model), a batch of fewer items than fit the slots filled up to a power of two,
        # and on a mesh to a multiple of the devices the batch is split over.
        mesh = self.rm.mesh
        split = (1 if self.classic or mesh is None else
                 mesh.shape["data"] * mesh.shape["fsdp"])
        rows = min(per_batch, 1 << max(len(lengths) - 1, 0).bit_length())
        rows = -(-rows // split) * split
        lengths = lengths if self.classic else sorted(lengths)
        shapes = []
        for start in range(0, len(lengths), per_batch):
            chunk = lengths[start:start + per_batch]
            shape = f"prefill bucket {bucket_length(max(chunk))} x batch of {rows}"
            if shape not in shapes:
                shapes.append(shape)
        with self._lock:
            self._compiles += 1
            self._compile_seconds += watch.seconds
            queued = self._queued_items
        what = ("classic forward" if self.classic else
                f"num_samples={k}, {_sampling(settings)}")
        log.info("compiled %d program(s) in %.1f s for a shape met for the first time (%s; %s): "
                 "the batch of %d item(s), and the %d item(s) queued behind it, waited for it; %s",
                 watch.programs, watch.seconds, ", ".join(shapes), what, len(items), queued,
                 WARMUP_HINT)

    def _score(self, items: Sequence[Item], settings: Settings,
               budgets: Sequence[int]) -> tuple[list[ItemResult], int]:
        """``items`` scored with ``settings``, each with its own critique budget in ``budgets``
        (ignored by a classic model): (one result per item, critique tokens sampled)."""
        from cloud_jax.scoring.rewards import ScoreConfig, fit_max_length, score

        n = len(items)
        prompts = [prompt_text(item.prompt) for item in items]
        responses = [item.response for item in items]
        kwargs = settings.score_kwargs()
        kwargs["classic"] = self.classic
        if self.classic:
            kwargs["num_samples"] = 1
            budgets = None
        else:
            # Every batch decodes for the budget limit, each row stopping at its own budget: the
            # budgets never pick a compiled shape.
            kwargs["max_critique_tokens"] = self.options.max_critique_tokens
        per_batch = max(1, self.options.slots // kwargs["num_samples"])
        # A batch of fewer inputs than fit the slots is filled up with copies of its first input
        # (their results dropped) to a power of two, as rm.score fills a short last batch: a few
        # batch shapes per length bucket, each compiled the first time it occurs,
        # however many requests happen to arrive together; a lone request still decodes its own
        # rows only (on a CPU a decode step grows with its rows).
        fill = max(min(per_batch, 1 << max(n - 1, 0).bit_length()) - n, 0)
        prompts += prompts[:1] * fill
        responses += responses[:1] * fill
        if not self.classic:
            budgets = list(budgets) + list(budgets[:1]) * fill
        # --max-length held to what the positions leave the item with the smallest budget (the
        # limit rm.score applies to each item, after its own budget, is the same): submit has
        # refused every item over its limit with 413, so rm.score has nothing to warn about.
        reserved = 0 if self.classic else 1 + min(budgets)
        cfg = ScoreConfig(batch_size=per_batch, **kwargs,
                          max_length=fit_max_length(self.rm, self.options.max_length, reserved))
        res = score(self.rm, prompts, responses, cfg, budgets=budgets)
        return (results_from_score(res, self.classic)[:n],
                int(np.sum(res.critique_tokens[:n])))


def resolve_classic(rm, options: BackendOptions) -> bool:
    """Whether to serve without critiques: ``options.classic`` where set, else as the
    checkpoint says (a ``vanilla`` model is classic)."""
    from cloud_jax.scoring.rewards import ScoreConfig, resolve_classic as score_classic

    return score_classic(rm, ScoreConfig(classic=options.classic))


def _sampling(settings: Settings) -> str:
    """The settings that are compile-time constants of the decode, as a log line names them."""
    out = f"temperature={settings.temperature:g}"
    if settings.top_k is not None:
        out += f", top_k={settings.top_k}"
    if settings.top_p is not None:
        out += f", top_p={settings.top_p:g}"
    if settings.repetition_penalty != 1.0:
        out += f", repetition_penalty={settings.repetition_penalty:g}"
    return out


def _batch_key(settings: Settings) -> Settings:
    """What requests sharing a batch must agree on: everything but the critique budget."""
    return dataclasses.replace(settings, max_critique_tokens=0)


def results_from_score(res, classic: bool) -> list[ItemResult]:
    """``rm.score``'s arrays as one :class:`ItemResult` per item."""
    out = []
    for i in range(len(res.rewards)):
        k = res.sample_rewards.shape[1]
        out.append(ItemResult(
            reward=float(res.rewards[i]),
            sample_rewards=[float(x) for x in res.sample_rewards[i]],
            reward_std=float(res.reward_std[i]),
            critiques=[""] * k if classic else list(res.critiques[i]),
            truncated=[bool(x) for x in res.truncated[i]]))
    return out
