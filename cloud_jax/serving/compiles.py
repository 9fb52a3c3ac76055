"""What a backend's worker compiles while it serves: a shape (a prefill length bucket, a batch
size, a new combination of sampling settings) that no request met before compiles its programs
the first time, and every request in flight waits for it. A :class:`CompileWatch` counts the
programs compiled on its thread and the seconds they took (JAX's compile events), so that the
backend can say in its log which shape stalled the requests and for how long, and count it in
``/metrics``.
"""

from __future__ import annotations

import threading

# The stages of a compile JAX reports the time span of: tracing to a jaxpr (a jitted function
# called inside another is traced within the outer trace, so spans nest), lowering to an MLIR
# module (once per program, whether XLA then compiles it or reads its disk cache) and XLA's
# compile. A program already compiled reports none of them.
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE = "/jax/core/compile/backend_compile_duration"

_local = threading.local()
_registered = False
_register_lock = threading.Lock()


def _on_span(event: str, start: float, end: float, **kwargs) -> None:
    watches = getattr(_local, "watches", None)
    if not watches or event not in (_TRACE, _LOWER, _COMPILE):
        return
    for watch in watches:
        watch._spans.append((start, end))
        if event == _LOWER:
            watch.programs += 1


def _register() -> None:
    global _registered
    with _register_lock:
        if not _registered:
            import jax

            jax.monitoring.register_event_time_span_listener(_on_span)
            _registered = True


class CompileWatch:
    """``with CompileWatch() as w: ...``: ``w.programs`` programs were compiled on this thread
    inside the block (XLA compiles, or reads of its compile cache), taking ``w.seconds`` of
    tracing, lowering and compiling. Compiles on other threads are not counted."""

    def __init__(self):
        self.programs = 0
        self._spans: list[tuple[float, float]] = []

    @property
    def seconds(self) -> float:
        """The time spent compiling: the union of the stages' spans (nested ones count once)."""
        total, reached = 0.0, float("-inf")
        for start, end in sorted(self._spans):
            if end > reached:
                total += end - max(start, reached)
                reached = end
        return total

    def __enter__(self) -> "CompileWatch":
        _register()
        if not hasattr(_local, "watches"):
            _local.watches = []
        _local.watches.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _local.watches.remove(self)


WARMUP_HINT = ("--warmup buckets compiles every length bucket and batch size of the default "
               "settings before the server starts")
