"""Telling the user what a long job is doing, on stderr: a progress line (training, conversion) and a notice for
waits that may be long (loading a model).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class ProgressBar:
    """``[#######.........] 3/10 text | 12s, eta 28s`` on stderr.

    On a terminal the line is redrawn in place at every update; elsewhere (a log file) one line is printed every
    ``every`` updates and at the end. ``enabled=False`` prints nothing. The time left is estimated from the
    average pace since the bar started, counting from ``first`` (a resumed run starts at its checkpoint's step).
    """

    def __init__(self, every: int = 1, enabled: bool = True, width: int = 24, first: int = 0) -> None:
        self.every, self.enabled, self.width, self.first = every, enabled, width, first
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last_width = 0

    def update(self, done: int, total: int, text: str = "") -> None:
        finished = done >= total
        if not self.enabled or (not self.tty and done % self.every and not finished):
            return
        filled = self.width * done // max(total, 1)
        elapsed = self.elapsed()
        timing = f"{elapsed:.0f}s"
        if not finished and done > self.first:
            timing += f", eta {duration(elapsed / (done - self.first) * (total - done))}"
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {text} | {timing}"
        end = "" if self.tty and not finished else "\n"
        padded, self.last_width = line.ljust(self.last_width), len(line)  # overwrite a longer previous line
        print(("\r" if self.tty else "") + padded, end=end, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line of its own, shown even when the bar is not (on a terminal it replaces the bar, which the next
        update redraws)."""
        redraw = self.enabled and self.tty
        print(("\r" if redraw else "") + text.ljust(self.last_width if redraw else 0), file=sys.stderr, flush=True)
        self.last_width = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``95`` -> ``"1m35s"``, ``7.2`` -> ``"7s"``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def human_bytes(n: int) -> str:
    """``13476 MB`` -> ``"13.5 GB"``: decimal units, as file managers and the hub show sizes."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


@contextmanager
def notice_if_slow(message: str, after: float = 1.0) -> Iterator[None]:
    """Print ``message`` on stderr if the block is still running ``after`` seconds in, and then how long it took;
    a quick block prints nothing."""
    start = time.monotonic()
    shown = threading.Event()

    def show() -> None:
        shown.set()
        print(message, file=sys.stderr, flush=True)

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        if shown.is_set():
            print(f"ready after {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
