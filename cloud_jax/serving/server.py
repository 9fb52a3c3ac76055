"""The HTTP front: a Starlette app over a backend, served by uvicorn.

    POST /get_reward   OpenRLHF's remote reward model: {"query", "prompts", "labels"} ->
                       {"rewards", "scores", "extra_logs": {"reward_std", "truncated_fraction"}}
    POST /v1/score     native: {"items": [...], settings} -> {"results": [...]}
    GET  /health       200 once the backend is loaded and compiled (the socket listens from then
                       on: connections before are refused), 503 while draining
    GET  /metrics      Prometheus text

Bad input is answered 400 (not JSON, not an object) or 422 (a field: missing, wrong type, out of
range, lengths that disagree), naming the field; an item longer than the server's maximum 413, and
a body larger than ``max_body_bytes`` 413 too, before the rest of it is read; a full queue 503
with Retry-After. A client that goes away has its request cancelled. SIGTERM (or
Ctrl-C) stops admitting, lets every accepted request finish, then the process exits 0; a second
SIGTERM while it does so is ignored, and a second Ctrl-C quits without waiting for them. SIGTERM
while the model loads and compiles (before the socket listens, nothing accepted) stops there, and
the process exits 0 too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cloud_jax.serving.protocol import ChatMarkers, InvalidField, parse_openrlhf, parse_score
from cloud_jax.serving.types import (DEFAULT_MAX_BODY_MIB, Backend, BackendStats, InputTooLong,
                                     ItemResult, QueueFull, Settings, ShuttingDown)

log = logging.getLogger(__name__)

class BodyTooLarge(Exception):
    """A request body past the server's limit (HTTP 413): refused without reading the rest."""

    def __init__(self, limit: int, size: Optional[int] = None):
        said = f"{size} bytes" if size is not None else "more bytes than that"
        super().__init__(f"the request body holds {said}; this server reads at most {limit} "
                         f"bytes ({limit / 2**20:g} MiB, the serve command's --max-body-mib): send "
                         "fewer items per request, or raise --max-body-mib")
        self.limit = limit


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, or BodyTooLarge as soon as it is known to hold more than ``limit``
    bytes: at once from its Content-Length, else once as much has arrived (a chunked body)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self, backend: Backend):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("cloud_queue_depth", "items admitted but not yet started",
                                 registry=r)
        self.busy_slots = Gauge("cloud_busy_slots", "decode rows in use", registry=r)
        self.total_slots = Gauge("cloud_total_slots", "decode rows in all (--slots)", registry=r)
        self.latency = Histogram("cloud_request_latency_seconds",
                                 "time from a request's arrival to its answer", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                 registry=r)
        self.requests = Counter("cloud_requests_total", "answered requests", ["endpoint", "status"],
                                registry=r)
        self.rejected = Counter("cloud_rejected_requests_total",
                                "requests refused before scoring", ["reason"], registry=r)
        self.items = Counter("cloud_scored_items_total", "items scored", registry=r)
        self.admitted = Counter("cloud_admitted_items_total", "items accepted into the queue",
                                registry=r)
        self._backend = backend
        self._stats: Optional[BackendStats] = None  # read once a scrape, by render
        # The backend's own counters: exported as counters (they only grow), not gauges, so that
        # rate() and the tools that go by a metric's type read them right.
        r.register(_BackendCounters(lambda: self._stats or backend.stats()))

    def render(self) -> bytes:
        s = self._stats = self._backend.stats()
        self.queue_depth.set(s.queue_depth)
        self.busy_slots.set(s.busy_slots)
        self.total_slots.set(s.total_slots)
        return generate_latest(self.registry)


class _BackendCounters:
    """A Prometheus collector of the counters a backend keeps (``BackendStats``)."""

    _COUNTERS = (
        ("cloud_critique_tokens", "critique_tokens",
         "critique tokens generated since start (rate() gives tokens/s)"),
        ("cloud_compiles", "compiles", "shapes first met under traffic whose programs were "
                                       "compiled while the requests in flight waited"),
        ("cloud_compile_seconds", "compile_seconds", "seconds those compiles took"))

    def __init__(self, stats):
        self._stats = stats

    def describe(self):  # the names, for the registry, without asking the backend
        return [CounterMetricFamily(name, doc) for name, _, doc in self._COUNTERS]

    def collect(self):
        s = self._stats()
        return [CounterMetricFamily(name, doc, value=getattr(s, field))
                for name, field, doc in self._COUNTERS]


def _error(status: int, message: str, field: Optional[str] = None, **headers) -> JSONResponse:
    body = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers or None)


def build_app(backend: Backend, defaults: Settings, tokenizer,
              max_body_bytes: int = DEFAULT_MAX_BODY_MIB * 2**20) -> Starlette:
    """The app over ``backend`` (already started, or started by the caller before serving);
    a request body of more than ``max_body_bytes`` is a 413."""
    metrics = Metrics(backend)
    markers = ChatMarkers.of(tokenizer) if tokenizer is not None else None
    state = {"draining": False}

    # Decoding, checking and tokenizing a request run on this one thread, not the event loop: a
    # long input (megabytes of prompt take seconds to tokenize) holds up only the requests being
    # admitted behind it, never /health, /metrics or the answers. One thread, because the
    # backends check requests with one tokenizer, and tokenizers are not thread-safe.
    admitter = ThreadPoolExecutor(1, thread_name_prefix="cloud-admit")

    def read_json(raw: bytes):
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InvalidField("body", f"malformed JSON: {err}", status=400) from None
        except ValueError:  # Python reads integers of at most 4300 digits
            raise InvalidField("body", "a JSON integer too long to read (more than 4300 digits)",
                               status=400) from None
        except RecursionError:
            raise InvalidField("body", "JSON nested too deeply to read", status=400) from None

    async def run(request: Request, endpoint: str, parse, answer, items_field: str = "items"):
        """``items_field``: what the endpoint's body calls its list of items (errors name it)."""
        started = time.monotonic()
        status = 200

        def named(field: str) -> str:
            return items_field + field[len("items"):] if field.startswith("items") else field

        try:
            if state["draining"] or not getattr(backend, "ready", True):
                raise ShuttingDown("the server is not ready" if not state["draining"] else
                                   "the server is shutting down")
            raw = await _read_body(request, max_body_bytes)

            def admit():
                items, settings = parse(read_json(raw))
                # No items (an empty /get_reward batch): nothing to score, an empty answer.
                return items, backend.submit(items, settings) if items else None

            items, future = await asyncio.get_running_loop().run_in_executor(admitter, admit)
            metrics.admitted.inc(len(items))
            results = [] if future is None else await _wait(request, backend, future)
            if results is None:  # the client went away
                status = 499
                return Response(status_code=499)
            metrics.items.inc(len(results))
            bad = [i for i, r in enumerate(results)
                   if not all(math.isfinite(x) for x in (r.reward, *r.sample_rewards))]
            if bad:
                status = 500
                log.error("%s: non-finite rewards for %s[%s]", endpoint, items_field, bad[:8])
                return _error(500, f"the model gave non-finite rewards (NaN or inf) for "
                                   f"{items_field}{bad[:8]}: its weights hold non-finite values, "
                                   "or its compute dtype overflows; the server is otherwise fine")
            return JSONResponse(answer(results))
        except ClientDisconnect:  # the client went away before its body arrived
            status = 499
            return Response(status_code=499)
        except InvalidField as err:
            status = err.status
            metrics.rejected.labels("invalid").inc()
            field = named(err.field)
            return _error(err.status, field + str(err)[len(err.field):], field)
        except BodyTooLarge as err:
            status = 413
            metrics.rejected.labels("body_too_large").inc()
            return _error(413, str(err), "body", Connection="close")
        except InputTooLong as err:
            status = 413
            metrics.rejected.labels("too_long").inc()
            field = f"{items_field}[{err.index}]"
            return _error(413, f"{field} is {err.length} tokens long; this server takes at most "
                               f"{err.limit} ({err.what})", field)
        except QueueFull as err:
            status = 503
            metrics.rejected.labels("queue_full").inc()
            _warn_queue_full(state, err)
            return _error(503, str(err), **{"Retry-After": str(max(1, round(err.retry_after_s)))})
        except ShuttingDown as err:
            status = 503
            metrics.rejected.labels("shutting_down").inc()
            return _error(503, str(err), **{"Retry-After": "5"})
        except Exception as err:  # a bug in one request must not take the server down
            status = 500
            log.exception("request to %s failed", endpoint)
            return _error(500, f"internal error: {type(err).__name__}: {err}")
        finally:
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.monotonic() - started)

    async def score(request: Request):
        return await run(request, "/v1/score", lambda body: parse_score(body, defaults),
                         lambda results: {"results": [_result_json(r) for r in results]})

    async def get_reward(request: Request):
        if markers is None:
            return _error(503, "the model has no tokenizer, so queries cannot be split")

        def parse(body):
            return parse_openrlhf(body, markers), defaults

        def answer(results: list[ItemResult]):
            rewards = [r.reward for r in results]
            return {"rewards": rewards, "scores": rewards, "extra_logs": {
                "reward_std": [r.reward_std for r in results],
                "truncated_fraction": [sum(r.truncated) / len(r.truncated) for r in results]}}

        return await run(request, "/get_reward", parse, answer, items_field="query")

    async def health(request: Request):
        ready = getattr(backend, "ready", True) and not state["draining"]
        return JSONResponse({"status": "ok" if ready else "unavailable"},
                            status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request):
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[
        Route("/v1/score", score, methods=["POST"]),
        Route("/get_reward", get_reward, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ])
    app.state.serving = state
    return app


# At most one queue-full warning in this many seconds (an overloaded server refuses many).
_QUEUE_FULL_WARN_S = 60.0


def _warn_queue_full(state: dict, err: QueueFull) -> None:
    """Logs that requests are refused for a full queue: a client that reports only the status
    (OpenRLHF prints "503 Server Error") leaves the server's log the place that names the fix."""
    now = time.monotonic()
    state["queue_full"] = state.get("queue_full", 0) + 1
    if now - state.get("queue_full_warned", -math.inf) < _QUEUE_FULL_WARN_S:
        return
    log.warning("%d request(s) refused with 503: the queue holds %d items waiting (--max-queue); "
                "a client that sends more at once (OpenRLHF sends each query of a rollout as a "
                "request of its own) needs --max-queue at least that large",
                state["queue_full"], err.limit)
    state["queue_full"], state["queue_full_warned"] = 0, now


def _result_json(r: ItemResult) -> dict:
    return {"reward": r.reward, "sample_rewards": r.sample_rewards, "reward_std": r.reward_std,
            "critiques": r.critiques, "truncated": r.truncated}


async def _wait(request: Request, backend: Backend, future: Future):
    """The request's results, or None (after cancelling it) if the client disconnects first.
    Waits on both events: no polling, so thousands of waiting requests cost nothing."""
    wrapped = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({wrapped, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if wrapped.done():
        return wrapped.result()
    backend.cancel(future)
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: its body has been read, so the next message the server
    gives the app is the disconnect (it comes when the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` as uvicorn binds one, or a ConfigError saying why it cannot
    be: bound before the model loads, so that a port in use is reported at once, not after the
    load and compile (and never after a "ready" line)."""
    from cloud_jax.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there "
                          f"({err.strerror or err}); choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def log_stopped_before_listening() -> None:
    """What SIGTERM while the server loads and compiles (it accepted nothing yet) logs, before
    the process exits 0 as after any SIGTERM."""
    log.warning("stopped by SIGTERM while loading and compiling, before listening: no request "
                "was accepted; exiting")


def serve(backend: Backend, defaults: Settings, tokenizer, *, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info",
          sock: Optional[socket.socket] = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_MIB * 2**20) -> int:
    """Starts the backend, serves until SIGTERM / Ctrl-C, drains, and returns 0. ``sock``: a
    socket from :func:`listen_socket` (default: one bound to ``host:port`` here);
    ``max_body_bytes``: the largest request body read (a larger one is a 413)."""
    import uvicorn

    if sock is None:
        sock = listen_socket(host, port)
    port = sock.getsockname()[1]  # the port the system chose for --port 0
    app = build_app(backend, defaults, tokenizer, max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=None, lifespan="off")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:  # the socket listens: a client that reads the line can connect
                # An IPv6 address is bracketed in a URL (http://[::1]:8000).
                log.info("ready on http://%s:%d", f"[{host}]" if ":" in host else host, port)

    server = Server(config)
    log.info("loading and compiling before accepting requests")
    from cloud_jax.errors import Preempted

    try:
        backend.start()
    except Preempted:  # SIGTERM (cloud_jax.cli.common.run_command's handler) before listening
        log_stopped_before_listening()
        backend.close(drain=False)
        return 0

    def on_signal(sig, frame):
        # Stop admitting at once; uvicorn then waits for the requests in flight. Handled here
        # rather than by uvicorn's own handler, which re-raises the signal after the shutdown
        # (the process would then die of SIGTERM instead of exiting 0).
        app.state.serving["draining"] = True
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    server.handle_exit = on_signal
    server.run(sockets=[sock])
    if server.force_exit:  # a second Ctrl-C: uvicorn stopped waiting, and so does the backend
        log.warning("forced to quit: the requests not yet started are dropped, and those "
                    "started end unanswered")
        backend.close(drain=False)
        return 0
    # uvicorn has answered its connections and restored the command's handlers; the backend may
    # still finish a batch. A SIGTERM now is ignored, as it is during uvicorn's wait above (the
    # command's handler would stop the drain with a preempted batch command's status 75).
    def on_sigterm_while_draining(sig, frame):
        log.warning("SIGTERM while draining: ignored; the requests accepted are still answered")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm_while_draining) if main_thread else None
    try:
        backend.close(drain=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    log.info("every accepted request answered; exiting")
    return 0
