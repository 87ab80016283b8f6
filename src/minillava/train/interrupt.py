"""Ctrl-C during training: finish the step under way, save a checkpoint to resume from, and say how to go on.

The first Ctrl-C only sets a flag; the loop reads it with the counts every step already sums over processes, after
drawing the step's batches and before running them, so every process stops at the same step and the saved
checkpoint is a step boundary, like the ``--save-every`` ones, which ``--resume`` continues bit for bit. Data
loader workers ignore Ctrl-C so that they survive until then. A second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path


class StopRequest:
    """Ctrl-C during a run: the first one lets the step under way finish, then the run saves a checkpoint to resume
    from and stops; a second one stops at once, without saving."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: finishing this step, then saving a checkpoint to resume from (Ctrl-C again stops at once, "
            "without saving)",
            file=sys.stderr,
            flush=True,
        )


def ignore_sigint(worker_id: int) -> None:
    """Data loader workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupted_message(step: int, path: Path) -> str:
    if not step:
        return "interrupted before the first step finished: nothing to save"
    return f"interrupted after step {step}: saved {path}; to go on, run the same command with --resume"
