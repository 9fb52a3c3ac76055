"""``--profile DIR`` of the benches: one more step under ``jax.profiler.trace``, and where its
time went, read back from the trace.

The trace (an XSpace protobuf, ``DIR/plugins/profile/<run>/<host>.xplane.pb``) opens in
TensorBoard's or XProf's profile viewer. The bench also reads it itself
(``jax.profiler.ProfileData``) and prints the XLA operations that took the most time, so a run on
a machine one cannot keep (a lent GPU) brings its profile summary back in its output and JSON:

- on an accelerator, the events of its device planes (``/device:...``): kernels, each counted
  under the HLO operation that launched it where the trace names one (the ``hlo_op`` stat), and
  the "XLA Ops" line alone where the trace has one;
- on a CPU, the host events that name an HLO operation (XLA:CPU's thunks).

Shares are of the summed time of those events. Operations that overlap (several streams) are
each counted in full, so the shares say where device time went, not what a shorter step needs.

:func:`loop_kernels` reads a compiled program instead of a trace: the operations each iteration
of its loops launches (the sampling decode's steps), for ``bench sample`` and ``aot``.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import time
from typing import Callable, Optional

import jax

# Derived timeline lines that span many operations; counting them would count time twice.
_SPANNING_LINES = ("XLA Modules", "Steps", "Framework Ops", "TensorFlow Ops", "Source code",
                   "XLA TraceMe", "Launch Stats")


def trace(fn: Callable[[], object], log_dir: str) -> str:
    """Runs ``fn`` once under the profiler (it must block until its work is done); returns the
    trace file written."""
    os.makedirs(log_dir, exist_ok=True)
    start = time.time()
    with jax.profiler.trace(log_dir):
        fn()
    # The newest trace written since the start: a second trace in the same second may reuse
    # the run directory's name and overwrite the file of the first.
    written = [path for path in glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"),
                                          recursive=True) if os.path.getmtime(path) >= start - 1]
    if not written:
        raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    return max(written, key=os.path.getmtime)


def _stat(event, name: str) -> Optional[str]:
    for key, value in event.stats:
        if key == name:
            return str(value)
    return None


def op_times(path: str) -> tuple[str, dict[str, float], dict[str, str]]:
    """(where the times come from, {operation: summed nanoseconds}, {operation: the name of one of
    its events where that differs, e.g. the GPU kernel it launched}) of one trace file."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    times: dict[str, float] = collections.defaultdict(float)
    kernels: dict[str, str] = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = [line for line in plane.lines if line.name not in _SPANNING_LINES]
        ops_line = [line for line in lines if line.name == "XLA Ops"]
        for line in ops_line or lines:
            for event in line.events:
                op = _stat(event, "hlo_op") or event.name
                times[op] += event.duration_ns
                if event.name != op:
                    kernels.setdefault(op, event.name)
    if times:
        return "device", dict(times), kernels
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                op = _stat(event, "hlo_op")
                if op is not None:
                    times[op] += event.duration_ns
    return "host", dict(times), kernels


def _kind(op: str) -> str:
    """An operation's name without its instance number: fusion.12 -> fusion."""
    return re.sub(r"\.\d+$", "", op)


def summary(path: str, top: int = 12) -> dict:
    """The ``top`` operations by time and the time of each kind of operation (the name without
    its number: ``fusion``, ``dot``, ``custom-call``, ...): ``{"trace", "source", "total_ms",
    "top": [{"op", "ms", "share", "kernel"}], "by_kind": [{"kind", "ms", "share", "ops"}]}``."""
    source, times, kernels = op_times(path)
    total = sum(times.values())

    def share(ns: float) -> float:
        return round(ns / total, 4) if total else 0.0

    kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for op, ns in times.items():
        kinds[_kind(op)][0] += ns
        kinds[_kind(op)][1] += 1
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {"trace": path, "source": source, "total_ms": round(total / 1e6, 3),
            "top": [{"op": op, "ms": round(ns / 1e6, 3), "share": share(ns),
                     "kernel": kernels.get(op)} for op, ns in ranked],
            "by_kind": [{"kind": kind, "ms": round(ns / 1e6, 3), "share": share(ns), "ops": n}
                        for kind, (ns, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:top]]}


def report(summary_: dict, what: str) -> str:
    """Printable lines of :func:`summary`."""
    lines = [f"profile of {what}: {summary_['total_ms']:.1f} ms in XLA operations "
             f"({summary_['source']} events), trace {summary_['trace']}", "  by kind:"]
    lines += [f"  {row['share']:6.1%} {row['ms']:10.3f} ms  {row['kind']} ({row['ops']} ops)"
              for row in summary_["by_kind"]]
    lines.append("  top operations:")
    lines += [f"  {row['share']:6.1%} {row['ms']:10.3f} ms  {row['op']}"
              + (f"  [{row['kernel']}]" if row["kernel"] else "") for row in summary_["top"]]
    return "\n".join(lines)


def traced_summary(fn: Callable[[], object], log_dir: str, what: str, prefix: str = "") -> dict:
    """:func:`summary` of one run of ``fn`` under the profiler, printed (the first line after
    ``prefix``); never raises.

    A profile is what a bench adds to its measurements, so it must not cost them: where tracing
    or reading the trace fails (a GPU container that refuses the profiler its counters, a trace
    this JAX cannot read), the bench prints why and records ``{"error", "trace_dir"}`` in place
    of the summary, and its timed numbers and record are written as without ``--profile``.
    """
    try:
        result = summary(trace(fn, log_dir))
    except Exception as err:  # noqa: BLE001 - whatever the profiler raises is reported
        lines = str(err).strip().splitlines()
        error = type(err).__name__ + (f": {lines[0]}" if lines else "")
        print(f"{prefix}profile of {what}: not taken ({error}); the measurements stand",
              flush=True)
        return {"error": error, "trace_dir": log_dir}
    print(prefix + report(result, what), flush=True)
    if not result["top"]:
        print("  the trace holds no timed XLA operations (on a GPU: does this container let the "
              "profiler read the device's activity, CUPTI?)", flush=True)
    return result


def loop_kernels(compiled, text: Optional[str] = None) -> list[int]:
    """For each loop of the compiled program's entry computation, the operations one iteration
    launches: fusions, library calls, copies (not tuples, bitcasts or constants), an inner loop's
    counted once per trip where the compiler knows its trip count."""
    text = (compiled.as_text() if text is None else text) or ""
    bodies, current = {}, None
    for line in text.splitlines():
        head = re.match(r"(ENTRY )?%(\S+) .*\{$", line)
        if head and not line.startswith(" "):
            current = "ENTRY" if head.group(1) else head.group(2)
            bodies[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    free = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all"}

    def body_of(line: str) -> Optional[str]:
        m = re.search(r"body=%([^,\s]+)", line)
        return m.group(1) if m else None

    def launches(name: str) -> int:
        total = 0
        for line in bodies.get(name, ()):
            op = re.match(r"\s*(?:ROOT )?%\S+ = .*?\s([a-z][a-z\-]*)\(", line)
            if not op or op.group(1) in free:
                continue
            body = body_of(line) if op.group(1) == "while" else None
            if body:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                total += launches(body) * (int(trips.group(1)) if trips else 1)
            else:
                total += 1
        return total

    return [launches(body) for line in bodies.get("ENTRY", ())
            if " while(" in line and (body := body_of(line))]
