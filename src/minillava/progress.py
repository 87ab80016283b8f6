"""One progress line on stderr, for the long jobs (training, conversion)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """``[#######.........] 3/10 text | 12s`` on stderr.

    On a terminal the line is redrawn in place at every update; elsewhere (a log file) one line is printed every
    ``every`` updates and at the end. ``enabled=False`` prints nothing.
    """

    def __init__(self, every: int = 1, enabled: bool = True, width: int = 24) -> None:
        self.every, self.enabled, self.width = every, enabled, width
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last_width = 0

    def update(self, done: int, total: int, text: str = "") -> None:
        finished = done >= total
        if not self.enabled or (not self.tty and done % self.every and not finished):
            return
        filled = self.width * done // max(total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {text} | {self.elapsed():.0f}s"
        end = "" if self.tty and not finished else "\n"
        padded, self.last_width = line.ljust(self.last_width), len(line)  # overwrite a longer previous line
        print(("\r" if self.tty else "") + padded, end=end, file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start
