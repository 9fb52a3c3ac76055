"""The contract between the HTTP front and the backends that score requests.

A backend takes a request (items plus its sampling settings), queues it and answers it through a
``concurrent.futures.Future``. A request's result never depends on what else is in flight: it
equals ``rm.score`` on the same items and settings.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Optional, Protocol, Sequence, Union

# A prompt is a string (one user turn) or a list of chat messages ({"role", "content"}).
Prompt = Union[str, list]


class QueueFull(Exception):
    """The backend's bounded queue has no room: the caller should retry later (HTTP 503)."""

    def __init__(self, limit: int, retry_after_s: float = 1.0):
        super().__init__(f"the request queue is full ({limit} items waiting, the server's "
                         "--max-queue); retry later, or serve with a --max-queue as large as the "
                         "items clients send at once")
        self.limit = limit
        self.retry_after_s = retry_after_s


class InputTooLong(ValueError):
    """An item's prefill is longer than the server's maximum (HTTP 413): its --max-length, or
    fewer where the model's positions allow fewer (``what`` says which)."""

    def __init__(self, index: int, length: int, limit: int, what: str = "its --max-length"):
        super().__init__(f"items[{index}] is {length} tokens long; this server takes at most "
                         f"{limit} ({what})")
        self.index, self.length, self.limit, self.what = index, length, limit, what


class ShuttingDown(Exception):
    """The backend no longer admits requests (SIGTERM received): HTTP 503."""


@dataclasses.dataclass(frozen=True)
class Item:
    prompt: Prompt
    response: str


@dataclasses.dataclass(frozen=True)
class Settings:
    """Per-request sampling settings; the fields and defaults of ``ScoreConfig``'s sampling part."""

    num_samples: int = 1
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_critique_tokens: int = 256
    seed: int = 0
    repetition_penalty: float = 1.0

    def score_kwargs(self) -> dict:
        """The keyword arguments of ``rm.score`` these settings stand for."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """What every backend is built with: ``StaticBackend(rm, options)`` (``static.py``) and
    ``ContinuousBackend(rm, options)`` (``engine.py``)."""

    slots: int = 16  # decode rows in flight at most (an item takes num_samples rows)
    max_queue: int = 256  # items admitted but not started at most; beyond it: QueueFull
    max_length: int = 2048  # prefill tokens per item at most; beyond it: InputTooLong
    max_critique_tokens: int = 1024  # the largest per-request max_critique_tokens accepted
    defaults: Settings = Settings()  # a request's settings start from these
    # Serve without critiques (micro-batched forwards); None: as the checkpoint says (a
    # ``vanilla`` model is classic), False scores even a classic checkpoint with critiques.
    classic: Optional[bool] = None
    # What ``start()`` compiles for the default settings: "request", what a one-item request
    # compiles; "buckets", every prefill length bucket a request can meet (up to max_length), at
    # every batch size, so that requests with these settings compile nothing later.
    warmup: str = "request"


WARMUP = ("request", "buckets")

# The largest request body the server reads by default (--max-body-mib): far above what a full
# queue of the longest items takes, far below what would strain a host's memory.
DEFAULT_MAX_BODY_MIB = 64


@dataclasses.dataclass(frozen=True)
class ItemResult:
    reward: float  # mean over the samples
    sample_rewards: list[float]  # [K]
    reward_std: float  # population std over the samples
    critiques: list[str]  # [K]; empty strings for a classic model
    truncated: list[bool]  # [K]: the critique hit its token budget


@dataclasses.dataclass(frozen=True)
class BackendStats:
    queue_depth: int  # items admitted but not yet started
    busy_slots: int  # decode rows in use
    total_slots: int  # decode rows in all (--slots)
    critique_tokens: int  # critique tokens generated since start (a counter)
    # Shapes first met under traffic (after start()) whose programs were compiled while requests
    # waited, and the seconds those compiles took (counters).
    compiles: int = 0
    compile_seconds: float = 0.0


class Backend(Protocol):
    """What the HTTP front needs from whatever produces results. All methods are thread-safe."""

    def start(self) -> None:
        """Loads and compiles; after it returns, the backend is ready (GET /health says so)."""

    def submit(self, items: Sequence[Item], settings: Settings) -> "Future[list[ItemResult]]":
        """Queues a request. Raises QueueFull, InputTooLong, ShuttingDown or ValueError (bad
        settings) at once; the future carries the results in item order."""

    def cancel(self, future: Future) -> None:
        """The client went away: free the request's queue entries and decode slots."""

    def stats(self) -> BackendStats: ...

    def close(self, drain: bool = True) -> None:
        """Stops admitting; with drain, finishes every request already accepted, then returns."""
