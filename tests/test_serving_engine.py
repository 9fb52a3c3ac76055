"""The continuous-batching engine: results equal ``rm.score`` for mixed concurrent requests,
finished rows are refilled while others decode (chunk counters), and the queue, length, cancel
and shutdown rules of the backend contract."""

import dataclasses
import logging
import threading
import time

import jax
import numpy as np
import pytest
from model_helpers import tiny_reward_model

import cloud_jax
from cloud_jax.serving.engine import ContinuousBackend
from cloud_jax.sampling import bucket_length
from cloud_jax.serving.protocol import InvalidField, item_lengths

from cloud_jax.serving import protocol
from cloud_jax.serving.protocol import InvalidField
from cloud_jax.serving.static import StaticBackend
from cloud_jax.serving.types import (BackendOptions, InputTooLong, Item, QueueFull, Settings,
                                     ShuttingDown)

PROMPTS = ["What is 2+2?", "Name a colour.", "Hi", "Why is the sky blue?", "Say: " + "la " * 9]
RESPONSES = ["4", "Blue.", "Hello there!", "Rayleigh scattering.", "la la la"]


@pytest.fixture(scope="module")
def rm():
    return tiny_reward_model(3)


def _engine(rm, **options):
    options = {"slots": 6, "max_critique_tokens": 40, "max_length": 256, **options}
    engine = ContinuousBackend(rm, BackendOptions(**options), chunk_steps=4)
    engine.start()
    return engine


def _items(idx):
    return [Item(PROMPTS[i], RESPONSES[i]) for i in idx]


def _check(out, rm, idx, st):
    want = rm.score([PROMPTS[i] for i in idx], [RESPONSES[i] for i in idx],
                    num_samples=st.num_samples, temperature=st.temperature, top_k=st.top_k,
                    top_p=st.top_p, max_critique_tokens=st.max_critique_tokens, seed=st.seed,
                    repetition_penalty=st.repetition_penalty)
    assert len(out) == len(idx)
    for i, o in enumerate(out):
        assert o.critiques == want.critiques[i]
        np.testing.assert_allclose(o.sample_rewards, want.sample_rewards[i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(o.reward, want.rewards[i], atol=1e-5, rtol=0)
        assert o.truncated == want.truncated[i].tolist()


def test_mixed_concurrent_requests_equal_score(rm):
    engine = _engine(rm)
    jobs = [([0, 1], Settings(num_samples=2, temperature=0.9, max_critique_tokens=20, seed=1)),
            ([2, 3], Settings(num_samples=1, temperature=0.0, max_critique_tokens=7)),
            ([1, 2, 4], Settings(num_samples=3, temperature=0.9, max_critique_tokens=12, seed=2)),
            ([4], Settings(num_samples=2, temperature=1.2, top_k=20, max_critique_tokens=15)),
            ([3, 0], Settings(num_samples=2, temperature=0.8, top_p=0.9, max_critique_tokens=9,
                              seed=5)),
            ([0], Settings(num_samples=1, temperature=0.0, max_critique_tokens=25,
                           repetition_penalty=1.5)),
            ([2], Settings(num_samples=4, temperature=0.9, max_critique_tokens=3, seed=1))]
    futures = [None] * len(jobs)
    # However the settings mix, the pools' KV caches together hold at most --slots rows.
    most_rows = []
    admit = engine._admit

    def admit_and_count():
        admit()
        most_rows.append(sum(p.rows for p in engine._pools.values()))

    engine._admit = admit_and_count

    def submit(j):
        time.sleep(0.01 * j)
        futures[j] = engine.submit(_items(jobs[j][0]), jobs[j][1])

    threads = [threading.Thread(target=submit, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (idx, st), future in zip(jobs, futures):
        _check(future.result(timeout=300), rm, idx, st)
    assert engine.stats().busy_slots == 0 and engine.stats().critique_tokens > 0
    assert most_rows and max(most_rows) <= 6, most_rows
    engine.close()


def test_a_request_whose_pool_cannot_be_made_fails_alone(rm, monkeypatch):
    """A decode pool that cannot be allocated (the device is out of memory, say) fails the
    request that needed it; the requests behind it are served."""
    from cloud_jax.serving import engine as engine_module

    engine = _engine(rm)
    pool = engine_module._Pool

    def allocate(owner, method, penalty, k):
        if k == 3:
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory allocating the KV cache")
        return pool(owner, method, penalty, k)

    monkeypatch.setattr(engine_module, "_Pool", allocate)
    doomed = engine.submit(_items([0]), Settings(num_samples=3, max_critique_tokens=4))
    fine = Settings(num_samples=2, temperature=0.9, max_critique_tokens=4, seed=1)
    after = engine.submit(_items([1]), fine)
    with pytest.raises(MemoryError):
        doomed.result(timeout=60)
    _check(after.result(timeout=60), rm, [1], fine)
    assert engine.stats().queue_depth == 0
    engine.close()


def test_a_decode_chunk_that_fails_on_the_device_fails_its_requests_and_the_engine_serves_on(
        rm, monkeypatch):
    """A decode chunk that fails while it runs (the device out of memory, say) has consumed the
    pool's state it was given (donated): the engine freed the failed rows on that deleted state,
    which raised again and ended its loop, so every later request waited forever while /health
    said ok. The requests in flight fail with the error; the next ones are served."""
    import functools

    from cloud_jax.serving import engine as engine_module

    engine = _engine(rm)
    chunk = engine_module._chunk

    def fail(_):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while running a decode chunk")

    @functools.partial(jax.jit, donate_argnums=(0,))
    def failing(s):  # a program that fails on the device after taking the donated state
        jax.debug.callback(fail, s.step)
        return s

    failures = []

    def chunk_once_failing(params, s, *args, **kwargs):
        if not failures:
            failures.append(1)
            return failing(s)
        return chunk(params, s, *args, **kwargs)

    monkeypatch.setattr(engine_module, "_chunk", chunk_once_failing)
    st = Settings(max_critique_tokens=4)  # the defaults' pool: compiled at start
    doomed = engine.submit(_items([0]), st)
    with pytest.raises(Exception, match="out of memory while running a decode chunk"):
        doomed.result(timeout=60)
    _check(engine.submit(_items([1, 2]), st).result(timeout=60), rm, [1, 2], st)
    assert engine.stats().busy_slots == 0 and engine.stats().queue_depth == 0
    engine.close()


def test_stats_are_answered_while_a_pool_is_being_allocated(rm, monkeypatch):
    """Allocating a new settings' KV cache can take a while on a big model: /health and /metrics
    (``stats``) and new submissions do not wait for it."""
    from cloud_jax.serving import engine as engine_module

    engine = _engine(rm)
    pool = engine_module._Pool
    allocating, release = threading.Event(), threading.Event()

    def slow(owner, method, penalty, k):
        if k == 3:
            allocating.set()
            release.wait(60)
        return pool(owner, method, penalty, k)

    monkeypatch.setattr(engine_module, "_Pool", slow)
    st = Settings(num_samples=3, max_critique_tokens=4)
    future = engine.submit(_items([0]), st)
    assert allocating.wait(60)
    answered = []
    probe = threading.Thread(target=lambda: answered.append(engine.stats()))
    probe.start()
    probe.join(10)
    try:
        assert answered, "stats() waited for the pool's allocation"
        later = engine.submit(_items([1]), st)
    finally:
        release.set()
    _check(future.result(timeout=60), rm, [0], st)
    _check(later.result(timeout=60), rm, [1], st)
    engine.close()


def test_total_slots_is_the_slots_option_whatever_the_pools_hold(rm):
    """cloud_total_slots is --slots: the rows a pool of K rows per item holds (a multiple of K)
    are not what a dashboard compares the busy rows with. It reported 4 of 6 after a K=4
    request."""
    engine = _engine(rm)
    assert engine.stats().total_slots == 6
    st = Settings(num_samples=4, max_critique_tokens=3)
    _check(engine.submit(_items([0]), st).result(timeout=60), rm, [0], st)
    assert sum(p.rows for p in engine._pools.values()) == 4
    assert engine.stats().total_slots == 6
    engine.close()


def test_options_no_request_could_be_served_under_are_refused(rm):
    from cloud_jax.errors import ConfigError

    for backend in (ContinuousBackend, StaticBackend):
        with pytest.raises(ConfigError, match=r"--num-samples\) 8 needs 8 decode rows"):
            backend(rm, BackendOptions(slots=4, defaults=Settings(num_samples=8)))
        with pytest.raises(ConfigError, match=r"warmup \(--warmup\) 'all': expected one of "
                                              r"request, buckets"):
            backend(rm, BackendOptions(warmup="all"))
    static = StaticBackend(rm, BackendOptions(slots=4, max_queue=3, max_length=256))
    with pytest.raises(InvalidField, match="num_samples"):
        static.submit(_items([0]), Settings(num_samples=100000))
    # More items than the queue ever holds: a permanent error, not "queue full, retry".
    with pytest.raises(InvalidField, match=r"4 items in one request.*--max-queue 3"):
        static.submit(_items([0, 1, 2, 3]), Settings())


def test_options_under_which_not_even_an_empty_item_fits_are_refused(rm):
    """A --max-length below what the chat template and critique prefix take alone (or a model
    with fewer positions than that) leaves no request that could be served. The continuous
    engine crashed at start with JAX's "Incompatible types for broadcasting" and the static
    batcher with "input 0: the critique prefill is ... over max_length", about its own warm-up
    input; both are a ConfigError naming the limit before anything compiles."""
    from cloud_jax.errors import ConfigError

    empty = item_lengths(rm, [Item("", "")], False, Settings())[0]
    few = cloud_jax.RewardModel(dataclasses.replace(rm.config, max_position_embeddings=empty),
                                rm.params, rm.tokenizer)
    for backend in (ContinuousBackend, StaticBackend):
        with pytest.raises(ConfigError, match=rf"max_length \(--max-length\) {empty - 1}: "
                                              rf"not even an empty item fits: it takes {empty} "
                                              r"tokens"):
            backend(rm, BackendOptions(max_length=empty - 1))
        with pytest.raises(ConfigError, match=rf"it takes {empty} tokens.*the model's "
                                              rf"max_position_embeddings={empty}"):
            backend(few, BackendOptions(max_length=256))
    # An empty item just fits: the server starts and scores it.
    st = Settings(max_critique_tokens=3)
    want = rm.score([""], [""], max_critique_tokens=3)
    for backend in (ContinuousBackend, StaticBackend):
        server = backend(rm, BackendOptions(slots=2, max_length=empty, max_critique_tokens=8,
                                            defaults=st))
        server.start()
        [out] = server.submit([Item("", "")], st).result(timeout=120)
        assert out.critiques == want.critiques[0]
        np.testing.assert_allclose(out.reward, want.rewards[0], atol=1e-5, rtol=0)
        server.close()


def _hold_decode_at_chunk(engine, chunk: int) -> tuple[threading.Event, threading.Event]:
    """Holds the engine's loop before decode chunk ``chunk`` until the test sets ``submitted``
    (``held`` tells it the loop is there), so a request submitted then arrives while earlier
    rows decode however late the test's thread runs on a loaded machine."""
    held, submitted = threading.Event(), threading.Event()
    decode = engine._decode

    def decode_held():
        if engine.chunks == chunk and not submitted.is_set():
            held.set()
            assert submitted.wait(60)
        decode()

    engine._decode = decode_held
    return held, submitted


def test_a_request_that_arrives_later_starts_and_ends_before_a_long_one(rm):
    engine = _engine(rm, slots=4, max_critique_tokens=120)
    # The engine is held before its third chunk until the short request is in, so the short one
    # arrives while the long one decodes however late this thread runs on a loaded machine (with
    # a race instead, a starved submitting thread once saw the long critique end first).
    held, submitted = _hold_decode_at_chunk(engine, 2)
    # One long critique in one row (a random tiny model rarely stops on its own: it runs into
    # its budget of 30 chunks), then a short one that arrives while it decodes.
    long_settings = Settings(num_samples=1, temperature=0.9, max_critique_tokens=120, seed=3)
    long = engine.submit(_items([3]), long_settings)
    assert held.wait(60) and not long.done()
    # The same sampling method and K: the long one's pool, whose free rows the short one takes.
    short_settings = Settings(num_samples=1, temperature=0.9, max_critique_tokens=3, seed=4)
    short = engine.submit(_items([0]), short_settings)
    submitted.set()
    _check(short.result(timeout=60), rm, [0], short_settings)
    _check(long.result(timeout=60), rm, [3], long_settings)
    long_start, long_end = engine.spans[long]
    short_start, short_end = engine.spans[short]
    assert long_start < short_start < long_end and short_end < long_end, engine.spans
    engine.close()


def test_queue_length_cancel_and_shutdown_rules(rm):
    # The hog's pool and both its items' buckets are compiled at start-up, so its two items take
    # both rows at once (a bucket compiling under traffic let the first item's critique end before
    # the second started).
    engine = _engine(rm, slots=2, max_queue=2, warmup="buckets",
                     defaults=Settings(temperature=0.9, max_critique_tokens=40))
    hog = Settings(num_samples=1, temperature=0.9, max_critique_tokens=40, seed=9)
    running = engine.submit(_items([0, 1]), hog)  # fills both rows
    deadline = time.monotonic() + 60
    while engine.stats().busy_slots < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    waiting = engine.submit(_items([2, 3]), hog)  # two items wait: the queue is full
    with pytest.raises(QueueFull):
        engine.submit(_items([4]), hog)
    with pytest.raises(InputTooLong, match="at most 256"):
        engine.submit([Item("x" * 400, "y")], hog)
    with pytest.raises(InvalidField, match="num_samples"):
        engine.submit(_items([0]), Settings(num_samples=3, max_critique_tokens=4))
    # Cancelling the running request frees its rows for the waiting one.
    engine.cancel(running)
    _check(waiting.result(timeout=120), rm, [2, 3], hog)
    assert running.cancelled() and engine.stats().busy_slots == 0
    # Draining answers what was accepted, then nothing more is admitted.
    last = engine.submit(_items([4]), hog)
    engine.close(drain=True)
    _check(last.result(timeout=1), rm, [4], hog)
    with pytest.raises(ShuttingDown):
        engine.submit(_items([0]), hog)


def test_a_classic_model_is_served_by_micro_batched_forwards(rm):
    classic = cloud_jax.RewardModel(rm.config, rm.params, rm.tokenizer, feedback_method="vanilla")
    # Served with critiques when asked to (serve --no-classic).
    assert isinstance(ContinuousBackend(classic, BackendOptions(slots=4, classic=False)),
                      ContinuousBackend)
    backend = ContinuousBackend(classic, BackendOptions(slots=4))
    assert isinstance(backend, StaticBackend)
    backend.start()
    out = backend.submit(_items([0, 1]), Settings()).result(timeout=60)
    want = classic.score(PROMPTS[:2], RESPONSES[:2])
    np.testing.assert_allclose([o.reward for o in out], want.rewards, atol=1e-6, rtol=0)
    assert out[0].critiques == [""]
    backend.close()


def test_an_item_past_the_models_positions_is_refused_not_read_past_them(rm):
    # A model built for 256 positions, served with the default --max-length (2048): an item's
    # prefill, its critique budget and the end-of-turn token must fit the positions.
    short = cloud_jax.RewardModel(dataclasses.replace(rm.config, max_position_embeddings=256),
                                  rm.params, rm.tokenizer)
    options = BackendOptions(slots=2, max_critique_tokens=16)
    item = [Item("p" * 400, "r")]
    for backend in (ContinuousBackend(short, options), StaticBackend(short, options)):
        with pytest.raises(InputTooLong, match=r"items\[0\] is \d+ tokens long; this server "
                                               r"takes at most 247 \(what the model's "
                                               r"max_position_embeddings=256 leaves after "
                                               r"max_critique_tokens=8 and the end-of-turn"):
            backend.submit(item, Settings(max_critique_tokens=8))
    classic = cloud_jax.RewardModel(short.config, short.params, short.tokenizer,
                                    feedback_method="vanilla")
    with pytest.raises(InputTooLong, match=r"at most 256 \(the model's "
                                           r"max_position_embeddings=256\)"):
        StaticBackend(classic, options).submit(item, Settings(max_critique_tokens=8))


def test_the_static_backend_scores_up_to_its_limits_without_a_positions_warning(rm, caplog):
    # --max-length 4096 on a model built for 256 positions: the server refuses what does not
    # fit with 413 itself, so scoring gives no "more than the model's positions allow" warning
    # (it did, for any --max-length but 2048). Each item, batched with one of another critique
    # budget, still gets the whole prefill its own budget leaves: 240 tokens fit under a budget
    # of 2 (253 left), not under one of 40 (215 left).
    from cloud_jax.scoring import rewards

    short = cloud_jax.RewardModel(dataclasses.replace(rm.config, max_position_embeddings=256),
                                  rm.params, rm.tokenizer)
    static = StaticBackend(short, BackendOptions(slots=2, max_length=4096,
                                                 max_critique_tokens=40))
    base = protocol.item_lengths(short, [Item("p", "r")], False, Settings())[0]
    items = [Item("p" * (241 - base), "r"), Item("q", "s")]
    assert protocol.item_lengths(short, items[:1], False, Settings()) == [240]
    rewards._warn_once.cache_clear()  # warned once per process
    with caplog.at_level("WARNING", logger="cloud_jax.scoring.rewards"):
        out, _ = static._score(items, Settings(max_critique_tokens=2), [2, 40])
    assert "positions allow" not in caplog.text
    for item, budget, got in zip(items, (2, 40), out):
        want = short.score([item.prompt], [item.response], max_critique_tokens=budget)
        assert got.critiques == want.critiques[0]
        np.testing.assert_allclose(got.sample_rewards, want.sample_rewards[0], atol=1e-5, rtol=0)


def test_nothing_compiles_once_a_bucket_has_been_seen(rm):
    # However many items arrive together, however many rows end in one chunk, and when the decode
    # segment is first compacted: no compile once one request of each bucket was answered.
    engine = _engine(rm, slots=4, max_critique_tokens=24)
    for i in range(4):  # the pool and the buckets of these items, one chunk each
        engine.submit(_items([i]), Settings(temperature=0.9, max_critique_tokens=1)).result(120)
    # 33 decode slots a row (24 + 1 + 2 chunks of 4), 4 written a chunk: not compacted yet.
    assert engine.chunks * 4 + 4 <= 33, engine.chunks
    compiles = []

    def count(event, seconds, **kwargs):  # a lowering: XLA compiles, or reads its disk cache
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        with engine._lock:  # all four are admitted together: one prefill of 4 items
            futures = [engine.submit(_items([i]), Settings(temperature=0.9, seed=i,
                                                           max_critique_tokens=b))
                       for i, b in zip(range(4), (2, 2, 8, 8))]  # two rows end in one chunk
        for f in futures:
            f.result(timeout=120)
        for i in range(4):  # one at a time, until the decode segment is compacted
            engine.submit(_items([i]), Settings(temperature=0.9, max_critique_tokens=8)).result(120)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert engine.chunks * 4 > 33, engine.chunks
    assert compiles == []
    engine.close()


def test_static_batches_compile_nothing_new_for_the_requests_arriving_together(rm):
    # A batch of fewer items than fit the slots is filled up with copies to a power of two:
    # once a batch of three (run as four) has been seen, four and then three arriving together
    # (each with its own budget) compile nothing and equal rm.score.
    static = StaticBackend(rm, BackendOptions(slots=4, max_critique_tokens=24, max_length=256))
    static.start()
    warm = Settings(temperature=0.9, max_critique_tokens=8)
    static.submit(_items([0]), warm).result(120)
    with static._lock:
        warmed = [static.submit(_items([i]), warm) for i in range(3)]
    [f.result(120) for f in warmed]
    compiles = []

    def count(event, seconds, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    settings = [Settings(temperature=0.9, seed=1, max_critique_tokens=b) for b in (2, 8, 5, 3)]
    outs = []
    try:
        for batch in (settings, settings[:3]):
            with static._lock:  # taken as one batch
                futures = [static.submit(_items([i]), st) for i, st in enumerate(batch)]
            outs.append([f.result(timeout=120) for f in futures])
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    for batch, results in zip((settings, settings[:3]), outs):
        for i, (out, st) in enumerate(zip(results, batch)):
            _check(out, rm, [i], st)
    static.close()


def _count_compiles():
    """Starts counting lowerings (XLA compiles, or reads of its disk cache); returns the list
    they are appended to and the function that stops counting."""
    compiles = []

    def count(event, seconds, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    return compiles, lambda: jax.monitoring.unregister_event_duration_listener(count)


def _admit_once_compiled(engine):
    """Admits what was submitted to an engine whose worker steps the test drives, waiting for
    the compiles in the background it meets (a new pool's programs, its items' buckets)."""
    engine._admit()
    while engine._compiling:
        for job in list(engine._compiling.values()):
            assert job.finished.wait(120)
        engine._finish_compiles()
        engine._admit()


def test_cancelling_any_number_of_rows_compiles_nothing(rm):
    # Clients that disconnect cancel their rows; however many rows are freed at once, freeing
    # them must not compile during traffic. The test drives the worker's steps itself (the
    # engine is not started), so the rows are still decoding when they are cancelled.
    engine = ContinuousBackend(rm, BackendOptions(slots=4, max_critique_tokens=8,
                                                  max_length=256), chunk_steps=4)
    settings = Settings(temperature=0.9, max_critique_tokens=8)

    def admit(n):
        future = engine.submit(_items([0] * n), settings)
        _admit_once_compiled(engine)
        assert engine.stats().busy_slots == n
        return future

    first = admit(1)  # makes the pool and compiles the prefill of the item's bucket
    compiles, stop = _count_compiles()
    try:
        for n in (1, 2, 3, 4):
            engine.cancel(first if n == 1 else admit(n))
            engine._drop_cancelled()
            assert engine.stats().busy_slots == 0
    finally:
        stop()
    assert compiles == []


def test_static_batches_compile_nothing_new_for_another_budget(rm):
    # A batch decodes for the server's budget limit, each row to its own budget: once a batch
    # shape was seen, budgets from 0 to the limit compile nothing and equal rm.score.
    static = StaticBackend(rm, BackendOptions(slots=4, max_critique_tokens=40, max_length=256))
    static.start()
    static.submit(_items([0]), Settings(temperature=0.9, max_critique_tokens=2)).result(120)
    compiles, stop = _count_compiles()
    budgets = (0, 17, 40, 33)  # 16, 32 and 64 rounded up to a power of two
    try:
        outs = [static.submit(_items([0]), Settings(temperature=0.9, max_critique_tokens=b))
                .result(120) for b in budgets]
    finally:
        stop()
    assert compiles == []
    for out, b in zip(outs, budgets):
        _check(out, rm, [0], Settings(temperature=0.9, max_critique_tokens=b))
    static.close()


@pytest.mark.parametrize("backend", ["static", "continuous", "classic"])
def test_a_server_warmed_up_for_every_bucket_compiles_nothing_for_its_settings(rm, backend):
    # --warmup buckets: with the default settings, no item length, number of items arriving
    # together, budget or seed compiles anything once the server is started.
    classic = backend == "classic"
    if classic:
        rm = cloud_jax.RewardModel(rm.config, rm.params, rm.tokenizer, feedback_method="vanilla")
    defaults = Settings(temperature=0.9, max_critique_tokens=6)
    longest = 60 if classic else 200  # two or three buckets
    server = (StaticBackend if backend == "static" else ContinuousBackend)(
        rm, BackendOptions(slots=4, max_critique_tokens=12, max_length=longest,
                           defaults=defaults, warmup="buckets"))
    server.start()
    items = [Item("Hi", "a"), Item("Why? " * 8, "b"), Item("x" * 52, "c"),
             Item("q" * (55 if classic else 87), "")]
    # The shortest and the longest items fall in the first and the last bucket a server with
    # this --max-length can meet.
    lengths = item_lengths(rm, items + [Item("", "")], classic, defaults)
    assert bucket_length(lengths[0]) == bucket_length(lengths[-1])
    assert max(lengths) == longest
    compiles, stop = _count_compiles()
    try:
        for batch in ([0], [1], [2], [3], [0, 3, 1], [2, 1], [3, 2, 1, 0]):
            with server._lock:  # taken together
                futures = [server.submit([items[i]], dataclasses.replace(
                    defaults, seed=i, max_critique_tokens=(0, 12, 3, 7)[i])) for i in batch]
            [f.result(120) for f in futures]
    finally:
        stop()
    assert compiles == []
    server.close()


def test_buckets_compiled_for_greedy_serve_sampled_requests_of_the_same_k(rm):
    # A greedy pool and a sampling pool of one K copy a prefill into their rows with the same
    # program (both hold every step's uniform numbers, the greedy one unread): the buckets that
    # --warmup buckets compiled for greedy defaults compile nothing again for a sampled request.
    engine = _engine(rm, slots=4, max_critique_tokens=12, warmup="buckets")
    assert engine.options.defaults.temperature == 0.0
    met = []
    compile_bucket = engine._compile_bucket
    engine._compile_bucket = lambda *args: (met.append(args), compile_bucket(*args))
    st = Settings(num_samples=1, temperature=0.9, max_critique_tokens=6, seed=4)
    _check(engine.submit(_items([0, 4]), st).result(120), rm, [0, 4], st)
    assert met == [] and not engine._compiling
    engine.close()


@pytest.mark.parametrize("backend", ["static", "continuous"])
def test_a_shape_first_met_under_traffic_is_logged_once_and_counted(backend, caplog):
    # The default warm-up compiles a one-item request's shapes only. A request of a length
    # bucket not seen yet compiles while it (and everything queued) waits: one INFO line names
    # the bucket, the batch and the compile time, and /metrics counts it; a second request of
    # that bucket compiles nothing and logs nothing. A model of its own: compiled programs are
    # cached for the process, so no other test may have met its shapes.
    from model_helpers import TINY
    from cloud_jax.serving.server import Metrics

    width = 48 if backend == "static" else 40  # nor the other backend's
    rm = tiny_reward_model(5, dataclasses.replace(TINY, intermediate_size=width))
    make = StaticBackend if backend == "static" else ContinuousBackend
    server = make(rm, BackendOptions(slots=4, max_critique_tokens=12, max_length=200,
                                     defaults=Settings(temperature=0.9)))
    server.start()
    st = Settings(temperature=0.9, max_critique_tokens=3)
    short, long = Item("Hi", "a"), Item("Why? " * 12, "b")
    short_len, long_len = item_lengths(rm, [short, long], False, st)
    assert bucket_length(short_len) == 128 and bucket_length(long_len) == 256

    def compile_lines():
        return [r for r in caplog.records if r.name.startswith("cloud_jax.serving")
                and r.levelno == logging.INFO and "compiled" in r.getMessage()]

    caplog.set_level(logging.INFO, logger="cloud_jax.serving")
    server.submit([short], st).result(120)  # the warm-up's shape
    assert compile_lines() == []
    assert server.stats().compiles == 0
    server.submit([long], st).result(120)
    lines = compile_lines()
    assert len(lines) == 1, [r.getMessage() for r in lines]
    text = lines[0].getMessage()
    assert "bucket 256" in text and "--warmup buckets" in text
    if backend == "static":
        assert "batch of 1" in text
    else:  # compiled in the background: who waited is the request that met the bucket
        assert "batch sizes 1 to 4" in text
        assert "the 1 item(s) of 1 request(s) that met it waited for it" in text
    stats = server.stats()
    assert stats.compiles == 1 and stats.compile_seconds > 0
    metrics = Metrics(server).render().decode()
    assert "cloud_compiles_total 1.0" in metrics
    assert "cloud_compile_seconds_total" in metrics
    caplog.clear()
    server.submit([long], dataclasses.replace(st, seed=5)).result(120)
    assert compile_lines() == []
    assert server.stats().compiles == 1
    server.close()


def _blocked_bucket_compiles(engine, length=256):
    """Makes the engine's compile of prefill bucket ``length`` (``_compile_bucket(pool, length)``)
    wait for ``release`` (set by the test); ``started`` is set, and the chunk counter recorded,
    when it begins."""
    compile_bucket = engine._compile_bucket
    started, release, at_chunk = threading.Event(), threading.Event(), []

    def blocked(pool, bucket):
        if bucket == length:
            at_chunk.append(engine.chunks)
            started.set()
            assert release.wait(120), "the test never released the compile"
        return compile_bucket(pool, bucket)

    engine._compile_bucket = blocked
    return started, release, at_chunk


def test_rows_in_flight_decode_on_while_a_new_bucket_compiles(rm):
    # A request of a length bucket not met before compiles that bucket in the background: the
    # rows already decoding go on chunk after chunk meanwhile (the engine's loop compiled it
    # itself, and every row stalled for the whole compile), and so does a later request whose
    # bucket is compiled; the request that met the bucket starts once its compile is done.
    engine = _engine(rm, slots=4, max_critique_tokens=120)
    started, release, at_chunk = _blocked_bucket_compiles(engine)
    # A long critique (a random tiny model rarely stops on its own: it runs into its budget of 30
    # chunks), held at its second chunk (the warm-up took one) until the new bucket's request is
    # in.
    held, submitted = _hold_decode_at_chunk(engine, 2)
    # Items 0 and 2 fall in the warm-up's bucket (128), item 3 in one not met yet (256).
    lengths = item_lengths(rm, _items([0, 2, 3]), False, Settings())
    assert [bucket_length(n) for n in lengths] == [128, 128, 256]
    long_settings = Settings(num_samples=1, temperature=0.9, max_critique_tokens=120, seed=0)
    long = engine.submit(_items([0]), long_settings)
    assert held.wait(60) and not long.done()
    new_settings = Settings(num_samples=1, temperature=0.9, max_critique_tokens=3, seed=4)
    new = engine.submit(_items([3]), new_settings)
    submitted.set()
    try:
        assert started.wait(60)
        # A later request of a compiled bucket goes ahead of the one waiting for its compile.
        later = engine.submit(_items([2]), new_settings)
        later_out, long_out = later.result(timeout=60), long.result(timeout=60)
        assert not new.done()
        assert engine.spans[long][1] > at_chunk[0] + 2, (engine.spans, at_chunk)
    finally:
        release.set()
    _check(new.result(timeout=60), rm, [3], new_settings)
    _check(later_out, rm, [2], new_settings)
    _check(long_out, rm, [0], long_settings)
    assert engine.stats().busy_slots == 0 and engine.stats().queue_depth == 0
    engine.close()


def test_a_bucket_compile_that_fails_fails_the_requests_waiting_for_it(rm):
    # An error in a background compile (the device out of memory, say) fails the requests that
    # waited for that bucket with it, a request's rows already decoding included, and no other
    # (the loop's own compile failed every request in flight); the engine serves on, and the next
    # request of that bucket compiles it again.
    engine = _engine(rm, slots=4, max_critique_tokens=40)
    compile_bucket = engine._compile_bucket
    broken = [True]

    def compile_or_fail(pool, length):
        if length == 256 and broken[0]:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory compiling the prefill")
        return compile_bucket(pool, length)

    engine._compile_bucket = compile_or_fail
    st = Settings(temperature=0.9, max_critique_tokens=40, seed=1)
    bystander_settings = dataclasses.replace(st, seed=0)
    with engine._lock:  # met together: both wait for the compile of bucket 256
        bystander = engine.submit(_items([0]), bystander_settings)  # bucket 128, 10 chunks
        alone = engine.submit(_items([3]), st)
        mixed = engine.submit(_items([0, 3]), st)  # item 0 (bucket 128) starts decoding
    for future in (alone, mixed):
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
            future.result(timeout=60)
    # Served on: mixed's decoding row was freed when it failed.
    _check(bystander.result(timeout=60), rm, [0], bystander_settings)
    _check(engine.submit(_items([2]), st).result(timeout=60), rm, [2], st)
    assert engine.stats().busy_slots == 0 and engine.stats().queue_depth == 0
    broken[0] = False
    _check(engine.submit(_items([3]), st).result(timeout=60), rm, [3], st)
    engine.close()


def test_cancel_and_shutdown_while_a_bucket_compiles(rm):
    # A request waiting for its bucket's compile can be cancelled; draining waits for the
    # compile and answers the requests that waited for it; closing without draining fails them
    # at once and does not wait for the compile.
    st = Settings(temperature=0.9, max_critique_tokens=4)
    engine = _engine(rm, slots=4)
    started, release, _ = _blocked_bucket_compiles(engine)
    try:
        dropped = engine.submit(_items([3]), st)
        kept = engine.submit(_items([3]), dataclasses.replace(st, seed=2))
        assert started.wait(60)
        engine.cancel(dropped)
        closer = threading.Thread(target=engine.close, kwargs={"drain": True})
        closer.start()
        with pytest.raises(ShuttingDown):
            while True:  # until close() has begun
                engine.submit(_items([0]), st).result(timeout=60)
        assert not kept.done() and closer.is_alive()
    finally:
        release.set()
    closer.join(120)
    assert not closer.is_alive() and dropped.cancelled()
    _check(kept.result(timeout=1), rm, [3], dataclasses.replace(st, seed=2))

    engine = _engine(rm, slots=4)
    started, release, _ = _blocked_bucket_compiles(engine)
    try:
        waiting = engine.submit(_items([3]), st)
        assert started.wait(60)
        engine.close(drain=False)
        with pytest.raises(ShuttingDown):
            waiting.result(timeout=1)
    finally:
        release.set()


def _blocked_pool_compiles(engine, k):
    """Makes the engine's compile of a new sampling combination's pool of ``k`` samples an item
    (``_compile_pool(method, penalty, k)``) wait for ``release`` (set by the test); ``started``
    is set, and the chunk counter recorded, when it begins."""
    compile_pool = engine._compile_pool
    started, release, at_chunk = threading.Event(), threading.Event(), []

    def blocked(method, penalty, num_samples):
        if num_samples == k:
            at_chunk.append(engine.chunks)
            started.set()
            assert release.wait(120), "the test never released the compile"
        return compile_pool(method, penalty, num_samples)

    engine._compile_pool = blocked
    return started, release, at_chunk


def test_rows_in_flight_decode_on_while_a_new_sampling_combination_compiles(caplog):
    # A request whose sampling combination (method, penalty, K) has no pool yet compiles the
    # pool's decode chunk, compaction and freeing in the background: the rows in flight in
    # another pool decode on chunk after chunk meanwhile, and a later request of their
    # combination is served (the engine's loop compiled the pool itself); the request that met
    # the combination starts once its programs are compiled and the rows are free. Its compile
    # is logged once, naming who waited, and counted; the loop compiles nothing for it. A model
    # of its own (compiled programs are cached for the process).
    from model_helpers import TINY
    from cloud_jax.serving.server import Metrics

    rm = tiny_reward_model(5, dataclasses.replace(TINY, intermediate_size=56))
    hot = Settings(temperature=0.9)
    engine = _engine(rm, slots=4, max_critique_tokens=120, defaults=hot)
    started, release, at_chunk = _blocked_pool_compiles(engine, 2)
    # A long critique in the warm-up's pool (a random tiny model rarely stops on its own: it runs
    # into its budget of 30 chunks), held at its second chunk (the warm-up took one) until the
    # new combination's request is in.
    held, submitted = _hold_decode_at_chunk(engine, 2)
    # From the third chunk on, the loop waits for the background compile to begin before it
    # decodes on: on a loaded machine that thread once began after the long critique had ended.
    decode = engine._decode

    def decode_once_compiling():
        if engine.chunks > 2:
            started.wait(60)
        decode()

    engine._decode = decode_once_compiling
    long_settings = dataclasses.replace(hot, max_critique_tokens=120)
    long = engine.submit(_items([0]), long_settings)
    assert held.wait(60) and not long.done()
    caplog.set_level(logging.INFO, logger="cloud_jax.serving")
    new_settings = Settings(num_samples=2, temperature=0.9, max_critique_tokens=3, seed=4)
    new = engine.submit(_items([1]), new_settings)
    submitted.set()
    try:
        assert started.wait(60)
        # A later request of the rows' combination goes ahead of the one waiting for its pool.
        later_settings = dataclasses.replace(hot, max_critique_tokens=3, seed=4)
        later = engine.submit(_items([2]), later_settings)
        later_out, long_out = later.result(timeout=60), long.result(timeout=60)
        assert not new.done()
        assert engine.spans[long][1] > at_chunk[0] + 2, (engine.spans, at_chunk)
    finally:
        release.set()
    _check(new.result(timeout=60), rm, [1], new_settings)
    _check(later_out, rm, [2], later_settings)
    _check(long_out, rm, [0], long_settings)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("cloud_jax.serving")
             and "compiled" in r.getMessage()]
    pool_lines = [line for line in lines if "decode pool" in line]
    assert len(pool_lines) == 1, lines
    assert "a decode pool for num_samples=2, temperature=0.9 met for the first time" \
        in pool_lines[0]
    assert "the 1 item(s) of 1 request(s) that met it waited for it to start, while the rows " \
           "in flight decoded on" in pool_lines[0]
    chunks = int(pool_lines[0].split("decoded on (")[1].split(" ")[0])
    assert chunks > 2, pool_lines[0]
    # The other line is the new K's prefill bucket (also in the background); the loop itself
    # compiled nothing ("decode row(s) in flight ... waited" is its line).
    assert len(lines) == 2 and not any("waited for it;" in line for line in lines), lines
    assert engine.stats().compiles == 2
    assert "cloud_compiles_total 2.0" in Metrics(engine).render().decode()
    assert engine.stats().busy_slots == 0 and engine.stats().queue_depth == 0
    engine.close()


def test_a_pool_compile_that_fails_fails_the_requests_waiting_for_it(rm):
    # An error compiling a new sampling combination's pool (the device out of memory, say) fails
    # the requests that waited for it with it, and no other; the engine serves on, and the next
    # request of that combination compiles it again.
    engine = _engine(rm, slots=4, max_critique_tokens=40)
    compile_pool = engine._compile_pool
    broken = [True]

    def compile_or_fail(method, penalty, k):
        if k == 2 and broken[0]:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory compiling the decode chunk")
        return compile_pool(method, penalty, k)

    engine._compile_pool = compile_or_fail
    st = Settings(num_samples=2, temperature=0.9, max_critique_tokens=5, seed=1)
    greedy = Settings(max_critique_tokens=40)  # the warm-up's pool
    with engine._lock:  # met together: both wait for the compile of the K=2 pool
        bystander = engine.submit(_items([0]), greedy)
        alone = engine.submit(_items([3]), st)
        two = engine.submit(_items([1, 2]), dataclasses.replace(st, seed=2))
    for future in (alone, two):
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
            future.result(timeout=60)
    _check(bystander.result(timeout=60), rm, [0], greedy)
    _check(engine.submit(_items([2]), greedy).result(timeout=60), rm, [2], greedy)
    assert engine.stats().busy_slots == 0 and engine.stats().queue_depth == 0
    broken[0] = False
    _check(engine.submit(_items([3]), st).result(timeout=60), rm, [3], st)
    engine.close()


class _QueuedCompiles:
    """Stands in for the engine's compile thread: keeps what is queued on it, in order, and runs
    it when the test says."""

    def __init__(self):
        self.queued = []

    def submit(self, fn, *args):
        self.queued.append((fn, args))

    def run(self, count=None) -> None:
        """Runs the first ``count`` compiles queued (all of them by default)."""
        count = len(self.queued) if count is None else count
        queued, self.queued = self.queued[:count], self.queued[count:]
        for fn, args in queued:
            fn(*args)

    def shutdown(self, **kwargs) -> None:
        pass


def test_a_new_sampling_combination_queues_its_pool_and_bucket_compiles_at_once(rm):
    # The first request of a combination that has no pool queues the compile of the pool's
    # programs and, right behind it, of its items' prefill buckets, when it is first met: it
    # waits one pass of the compile thread's queue (not a pool compile, then a round of the loop,
    # then a bucket compile). The test drives the worker's steps and runs the queue itself.
    engine = ContinuousBackend(rm, BackendOptions(slots=4, max_critique_tokens=4,
                                                  max_length=256), chunk_steps=4)
    compiler = engine._compiler = _QueuedCompiles()
    st = Settings(num_samples=2, temperature=0.9, max_critique_tokens=4, seed=3)
    lengths = item_lengths(rm, _items([0, 3]), False, st)
    assert [bucket_length(n) for n in lengths] == [128, 256]
    future = engine.submit(_items([0, 3]), st)
    engine._admit()
    jobs = list(engine._compiling.values())
    assert [job.key for job in jobs] == [engine._pool_key(st), (2, False, 128), (2, False, 256)]
    assert [[item for _, item in job.waiters] for job in jobs] == [[0, 1], [0], [1]]
    assert len(compiler.queued) == 3 and engine.stats().busy_slots == 0
    compiler.run()  # the thread runs them back to back
    # What they compiled (the buckets before the pool existed) is what the pool runs.
    compiles, stop = _count_compiles()
    try:
        engine._finish_compiles()
        engine._admit()
        assert compiler.queued == [] and not engine._compiling
        assert engine.stats().busy_slots == 4 and engine.stats().queue_depth == 0
        for _ in range(8):  # a budget of 4 tokens: one or two chunks of 4 steps
            engine._decode()
            engine._deliver()
            if future.done():
                break
    finally:
        stop()
    assert compiles == []
    _check(future.result(timeout=0), rm, [0, 3], st)
    engine.close()


def _queued_engine(rm, slots=4):
    """An engine whose worker steps the test drives (:func:`_steps`), its compile thread a
    :class:`_QueuedCompiles`."""
    engine = ContinuousBackend(rm, BackendOptions(slots=slots, max_critique_tokens=4,
                                                  max_length=256), chunk_steps=4)
    return engine, _QueuedCompiles()


def _steps(engine, futures, limit=12):
    """Runs the worker's steps (as its loop does) until every one of ``futures`` is done."""
    for _ in range(limit):
        engine._finish_compiles()
        engine._drop_cancelled()
        engine._admit()
        engine._decode()
        engine._deliver()
        if all(f.done() for f in futures):
            return
    raise AssertionError(f"not done in {limit} steps: {futures}")


def test_a_request_cancelled_while_its_combinations_compiles_are_queued(rm):
    # The first request of a new combination queues its pool's and its buckets' compiles, then
    # is cancelled: it leaves the queue at once, the compiles still finish (kept for the next
    # request), and once taken up nothing refers to it. A later request of that combination
    # queues nothing and compiles nothing.
    engine, compiler = _queued_engine(rm)
    engine._compiler = compiler
    st = Settings(num_samples=2, temperature=0.9, max_critique_tokens=4, seed=3)
    dropped = engine.submit(_items([0, 3]), st)
    engine._admit()
    assert len(compiler.queued) == 3
    engine.cancel(dropped)
    engine._drop_cancelled()
    assert dropped.cancelled() and not engine._queue and engine.stats().queue_depth == 0
    # A request of the combination met meanwhile waits for the same compiles (none queued anew).
    kept_settings = dataclasses.replace(st, seed=4)
    kept = engine.submit(_items([3]), kept_settings)
    engine._admit()
    assert len(compiler.queued) == 3
    compiler.run()
    engine._finish_compiles()
    assert not engine._compiling and not engine._cancel
    assert engine._pool_key(st) in engine._compiled_pools
    assert {(2, False, 128), (2, False, 256)} <= engine._compiled_buckets
    compiles, stop = _count_compiles()
    try:
        _steps(engine, [kept])
        later = engine.submit(_items([0, 3]), st)
        _steps(engine, [later])
        assert compiler.queued == [] and not engine._compiling
    finally:
        stop()
    assert compiles == []
    _check(kept.result(timeout=0), rm, [3], kept_settings)
    _check(later.result(timeout=0), rm, [0, 3], st)
    assert engine.stats().busy_slots == 0 and engine.stats().queue_depth == 0
    engine.close()


def test_a_failed_pool_compile_with_its_buckets_compiled_fails_its_request_once(rm, caplog):
    # The pool's compile fails, the buckets' queued behind it succeed (on the thread, the
    # worker may take up the failure before they finish): the request fails with the pool's
    # error, once; the buckets compiled are kept, so the next request of the combination queues
    # only the pool's compile again, and is served.
    engine, compiler = _queued_engine(rm)
    engine._compiler = compiler
    compile_pool, broken = engine._compile_pool, [True]

    def compile_or_fail(method, penalty, k):
        if broken[0]:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory compiling the decode chunk")
        return compile_pool(method, penalty, k)

    engine._compile_pool = compile_or_fail
    st = Settings(num_samples=2, temperature=0.9, max_critique_tokens=4, seed=3)
    failing = engine.submit(_items([0, 3]), st)
    engine._admit()
    assert len(compiler.queued) == 3
    answers = []
    failing.add_done_callback(answers.append)
    caplog.set_level(logging.INFO, logger="cloud_jax.serving")
    compiler.run(1)  # the pool's compile fails; the buckets' are still queued
    engine._finish_compiles()
    engine._drop_cancelled()
    with pytest.raises(RuntimeError, match="compiling the decode chunk"):
        failing.result(timeout=0)
    assert not engine._queue and engine.stats().queue_depth == 0
    compiler.run()  # the buckets compile, and are taken up: the failed request is left alone
    engine._finish_compiles()
    engine._drop_cancelled()
    assert len(answers) == 1 and "decode chunk" in str(failing.exception())
    assert not engine._compiling and engine._pool_key(st) not in engine._compiled_pools
    assert {(2, False, 128), (2, False, 256)} <= engine._compiled_buckets
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].startswith("compiling a decode pool for num_samples=2")
    assert "the 1 request(s) waiting for it fail" in failed[0], failed
    broken[0] = False
    again = engine.submit(_items([0, 3]), st)
    engine._admit()
    assert [job.key for job in engine._compiling.values()] == [engine._pool_key(st)]
    assert len(compiler.queued) == 1
    compiler.run()
    _steps(engine, [again])
    _check(again.result(timeout=0), rm, [0, 3], st)
    engine.close()


def test_a_penalty_and_a_plain_combination_of_one_k_arriving_together(rm):
    # Two requests of the same K, one with a repetition penalty, met in one step: each queues
    # its own pool and its own buckets (a penalty's prefill also records the tokens seen), the
    # second pool waits for the first to drain (each takes every row), and both are served as
    # rm.score scores them, nothing compiling once their compiles ran.
    engine, compiler = _queued_engine(rm)
    engine._compiler = compiler
    plain = Settings(num_samples=2, temperature=0.9, max_critique_tokens=4, seed=3)
    penalised = dataclasses.replace(plain, repetition_penalty=1.3)
    first = engine.submit(_items([0, 3]), plain)
    second = engine.submit(_items([0, 3]), penalised)
    engine._admit()
    keys = [job.key for job in engine._compiling.values()]
    assert keys == [engine._pool_key(plain), (2, False, 128), (2, False, 256),
                    engine._pool_key(penalised), (2, True, 128), (2, True, 256)]
    assert len(compiler.queued) == 6
    compiler.run()
    compiles, stop = _count_compiles()
    try:
        _steps(engine, [first, second])
    finally:
        stop()
    assert compiles == [] and compiler.queued == [] and not engine._compiling
    _check(first.result(timeout=0), rm, [0, 3], plain)
    _check(second.result(timeout=0), rm, [0, 3], penalised)
    assert engine.spans[first][1] <= engine.spans[second][0]
    engine.close()


def test_the_rows_keys_derived_in_one_program_are_the_per_row_ones():
    # _sample_keys derives every row's key at once; the keys (and so the critiques of a seed) are
    # bit for bit those of fold_in(row_keys(seed, [content id])[0], sample), row by row, the
    # seeds and content ids at the ends of their uint32 range included.
    from cloud_jax.sampling import row_keys
    from cloud_jax.serving.engine import _sample_keys

    seeds = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 123456789]
    content = [0, 5, 2**31, 2**32 - 1, 99, 12345, 4000000000]
    want, args = [], ([], [], [])
    for seed, content_id in zip(seeds, content):
        base = row_keys(seed, np.asarray([content_id], np.uint32))[0]
        for sample in range(3):
            want.append(jax.random.key_data(jax.random.fold_in(base, sample)))
            for arg, value in zip(args, (seed, content_id, sample)):
                arg.append(value)
    got = jax.jit(_sample_keys)(np.asarray(args[0], np.uint32), np.asarray(args[1], np.uint32),
                                np.asarray(args[2], np.int32))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(got)), np.stack(want))


def test_an_admission_derives_its_rows_keys_in_its_insert_program(rm, monkeypatch):
    # An admission derives the key of every row it starts (from its request's seed, its item's
    # content id and its sample) in the program that copies the prefills into the rows: no key
    # operation of its own per row (it took rows x K small dispatches). The critiques are those of
    # rm.score for each seed. The test drives the worker's steps itself.
    engine = ContinuousBackend(rm, BackendOptions(slots=4, max_critique_tokens=4,
                                                  max_length=256), chunk_steps=4)
    st = Settings(num_samples=2, temperature=0.9, max_critique_tokens=4)

    def finish(futures):
        for _ in range(8):  # a budget of 4 tokens: one or two chunks of 4 steps
            engine._decode()
            engine._deliver()
            if all(f.done() for f in futures):
                return
        raise AssertionError("the rows did not finish")

    first = engine.submit(_items([0]), st)
    _admit_once_compiled(engine)
    finish([first])
    calls = []
    for name in ("key", "fold_in", "split", "key_data", "wrap_key_data"):
        fn = getattr(jax.random, name)
        monkeypatch.setattr(jax.random, name,
                            lambda *a, _fn=fn, _name=name, **kw: (calls.append(_name),
                                                                  _fn(*a, **kw))[1])
    seeds = (2**32 - 1, 5)
    with engine._lock:  # admitted together: one prefill of two items of two seeds
        futures = [engine.submit(_items([i]), dataclasses.replace(st, seed=seed))
                   for i, seed in zip((0, 2), seeds)]
    engine._admit()
    assert engine.stats().busy_slots == 4 and engine.stats().queue_depth == 0
    assert calls == []
    monkeypatch.undo()
    finish(futures)
    for i, seed, future in zip((0, 2), seeds, futures):
        _check(future.result(timeout=0), rm, [i], dataclasses.replace(st, seed=seed))
    engine.close()


def test_a_compiles_log_line_counts_only_the_requests_still_waiting(rm, caplog):
    # A request cancelled while the compiles it met are queued no longer waits for them: the
    # line a finished compile logs counts the items and requests that still wait (here the one
    # item of the request met later), and a compile no request waits for any more says so.
    engine, compiler = _queued_engine(rm)
    engine._compiler = compiler
    engine.ready = True  # after the warm-up: the compiles are met by traffic, logged and counted
    st = Settings(num_samples=2, temperature=0.7, max_critique_tokens=4, seed=3)
    dropped = engine.submit(_items([0, 4]), st)
    engine._admit()
    kept = engine.submit(_items([4]), dataclasses.replace(st, seed=4))
    engine._admit()
    buckets = {bucket_length(n) for n in item_lengths(rm, _items([0, 4]), False, st)}
    assert buckets == {128, 256}  # item 0 alone meets one of them
    engine.cancel(dropped)
    engine._drop_cancelled()
    compiler.run()
    for job in engine._compiling.values():
        job.programs = max(job.programs, 1)  # logged whether or not this process compiled it
    caplog.set_level(logging.INFO, logger="cloud_jax.serving")
    engine._finish_compiles()
    lines = sorted(r.getMessage() for r in caplog.records if "compiled" in r.getMessage())
    assert len(lines) == 3, lines
    pool = [line for line in lines if "decode pool" in line]
    assert len(pool) == 1
    assert "the 1 item(s) of 1 request(s) that met it waited for it" in pool[0]
    only_dropped = bucket_length(item_lengths(rm, _items([0]), False, st)[0])
    alone = next(line for line in lines if f"bucket {only_dropped} " in line)
    assert "no request waits for it any more" in alone and "waited for it" not in alone
    _steps(engine, [kept])
    _check(kept.result(timeout=0), rm, [4], dataclasses.replace(st, seed=4))
    engine.close()
