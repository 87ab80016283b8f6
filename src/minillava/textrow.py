"""One generated sequence's text: tokens in, final text out, cut at the first stop string.

Used by :class:`~minillava.pipeline.Pipeline` for each row of a batch and by the server for each request.
"""

from __future__ import annotations

from collections.abc import Sequence

from .processor import Processor


class TextRow:
    """Feed tokens with :meth:`push`, collect text with :meth:`take`.

    Text that could still grow into a stop string is held back until it cannot; :attr:`done` turns True on an
    EOS id or a stop string (the stop string and everything after it are dropped).
    """

    def __init__(self, processor: Processor, stop_strings: Sequence[str], eos_ids: Sequence[int]) -> None:
        self.decoder = processor.incremental_decoder(skip_special_tokens=True)
        self.stops = [s for s in stop_strings if s]
        self.eos = set(eos_ids)
        self.raw = ""  # everything decoded so far
        self.released = 0  # characters of ``raw`` handed out
        self.done = False

    def push(self, token: int) -> bool:
        """Add a token (ignored once done); return True when this row just finished."""
        if self.done:
            return False
        if token in self.eos:
            self.done = True
            self.raw += self.decoder.flush()
            self._cut()
            return True
        self.raw += self.decoder.push(token)
        return self._cut()

    def finish(self) -> None:
        """End of generation (max tokens): release what was held back."""
        if not self.done:
            self.raw += self.decoder.flush()
            self._cut()
            self.done = True

    def _cut(self) -> bool:
        for stop in self.stops:
            at = self.raw.find(stop, max(0, self.released - len(stop) + 1))
            if at >= 0:
                self.raw = self.raw[:at]
                self.done = True
                return True
        return False

    def take(self) -> str:
        """The newly final text since the last call."""
        end = len(self.raw)
        if not self.done:
            # Hold back the longest tail that is a proper prefix of a stop string.
            for stop in self.stops:
                for n in range(min(len(stop) - 1, len(self.raw)), 0, -1):
                    if self.raw.endswith(stop[:n]):
                        end = min(end, len(self.raw) - n)
                        break
        end = max(end, self.released)
        piece = self.raw[self.released : end]
        self.released = end
        return piece
