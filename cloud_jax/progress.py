"""Progress of long work (training, ``critique``, ``score``, ``evaluate``, stage 2 of the
pipeline): a tqdm bar on a terminal, plain lines in a log.

On a terminal the bar redraws one line with carriage returns. In a file or a pipe (``2> run.log``,
a job's or a TPU worker's log) those redraws would pile up into one ever-growing line, a redraw a
batch; there each report is a line of its own instead, at most one every ``LOG_INTERVAL_S``
seconds, and one more when the work ends (or stops), e.g.

    critique: 1200/40000 responses (3.0%), 41.3 responses/s, 00:29 elapsed, 15:39 left, tokens_per_s=2900.1

The rate is that since the line before (since the start, in the first line and the end line), so
that work that slows down shows it, and the time left is what the rest takes at that rate.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

# Seconds between two progress lines in a log.
LOG_INTERVAL_S = 30.0


def bar(total: int, unit: str, *, desc: str = "", disable: bool = False,
        file: Optional[TextIO] = None, initial: int = 0):
    """A progress bar over ``total`` items with tqdm's ``update(n)``, ``set_postfix(**kw)`` and
    ``close()`` (and ``with``): tqdm where ``file`` (default: stderr) is a terminal, a
    :class:`LogProgress` elsewhere; nothing at all with ``disable``. ``initial``: items done
    before (a resumed run), counted in the total but not in the rate."""
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    if disable or _is_terminal(file):
        return tqdm(total=total, unit=unit, desc=desc or None, dynamic_ncols=True, file=file,
                    disable=disable, initial=initial)
    return LogProgress(total, unit, desc=desc, file=file, initial=initial)


def _is_terminal(file: TextIO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LogProgress:
    """Progress as plain lines (see the module's doc): one when ``interval`` seconds have passed
    since the last, and one when closed if any item was counted since."""

    def __init__(self, total: int, unit: str, *, desc: str = "", file: TextIO,
                 interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 initial: int = 0):
        self.total, self.unit, self.desc, self.file = total, unit, desc, file
        self.interval, self.clock = interval, clock
        self.n = self.initial = initial  # initial: done before this start (a resumed run)
        self.postfix = ""
        self.start = self.last = clock()
        self.reported = initial  # the count the last line showed
        self.lines = 0
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._line()

    def set_postfix(self, refresh: bool = True, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self.closed and self.n != self.reported:
            self.closed = True
            self._line()
        self.closed = True

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> None:
        from tqdm import tqdm

        now = self.clock()
        elapsed = now - self.start
        since, done = ((self.start, self.n - self.initial) if self.closed or not self.lines
                       else (self.last, self.n - self.reported))
        rate = done / (now - since) if now > since else None
        parts = [f"{self.n}/{self.total} {self.unit}"
                 + (f" ({100 * self.n / self.total:.1f}%)" if self.total else "")]
        if rate:
            parts.append(f"{rate:.1f} {self.unit}/s")
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        if rate and self.n < self.total:
            parts.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        print((f"{self.desc}: " if self.desc else "") + ", ".join(parts), file=self.file,
              flush=True)
        self.last, self.reported = now, self.n
        self.lines += 1
