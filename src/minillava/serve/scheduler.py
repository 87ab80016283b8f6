"""Continuous batching over the rows of one KV cache.

The scheduler owns a static :class:`~minillava.cache.KVCache` of ``slots`` rows and runs in a thread of its own.
Each turn of its loop it

1. drops the requests whose client went away (their rows are free at once);
2. admits waiting requests while rows are free: each is prefilled *alone*, into a one-row cache of its own (the
   same ``forward`` call :meth:`Pipeline.chat <minillava.pipeline.Pipeline.chat>` makes, so its first token is the
   one a solo run gives), then copied into a free row so that it ends at the batch's current column
   (:meth:`KVCache.write_row <minillava.cache.KVCache.write_row>`: earlier slots of the row are masked, like left
   padding);
3. runs one decode step for every active row together and hands each row's token to its request.

Attention, RoPE positions and sampling are per row, so a row's tokens do not depend on what runs beside it: the
answers are the ones each request gets alone (greedy; sampled with a seed, too, since each row draws from its own
generator). When the shared column nears the end of the buffers, or most of it holds slots no active row uses,
the cache is compacted (:meth:`KVCache.compact <minillava.cache.KVCache.compact>`) and decoding goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..generate import GenerationConfig, sample_next
from ..model import Llava
from ..textrow import TextRow

log = logging.getLogger("minillava.serve")


@dataclass(frozen=True)
class Piece:
    """Newly final answer text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The answer is complete. ``reason`` is OpenAI's ``finish_reason``: ``"stop"`` (EOS or a stop string) or
    ``"length"`` (``max_new_tokens`` reached)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed on the server's side (HTTP ``status``)."""

    status: int
    message: str


Event = Piece | Finished | Failed


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it.

    Attributes:
        ids: the prompt's token ids, image placeholders included.
        pixel_values: ``[N, 3, S, S]`` images in placeholder order (LLaVA-1.6: ``[N, T, 3, S, S]`` tiles), or None.
        config: ``max_new_tokens`` and the sampling settings (``eos_token_id`` and stop strings are ``text``'s).
        text: turns tokens into answer text and decides when the answer stops.
        emit: receives the job's events, called from the scheduler's thread; it must not raise or block.
    """

    ids: list[int]
    pixel_values: torch.Tensor | None
    config: GenerationConfig
    text: TextRow
    emit: Callable[[Event], None]
    image_sizes: torch.Tensor | None = None  # [N, 2] (height, width) of LLaVA-1.6 images
    cancelled: bool = False
    generated: int = 0  # tokens sampled so far
    length: int = 0  # slots of the cache this job's row holds real tokens in
    token: int = 0  # the last sampled token: the next step's input
    generator: torch.Generator | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Free the job's row at the next step (the client went away). Safe from any thread."""
        self.cancelled = True


class Scheduler:
    """Continuous batching over ``slots`` rows of one KV cache of ``max_len`` slots per row.

    Args:
        model: the model; every forward call happens in the scheduler's thread.
        slots: rows of the cache, the most requests decoded together.
        max_len: slots per row (default: the model's context window). Every job must satisfy
            ``len(ids) + config.max_new_tokens <= max_len``; :meth:`submit` refuses others.
    """

    def __init__(self, model: Llava, slots: int, max_len: int | None = None) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        self.model = model
        self.max_len = max_len or model.config.text.max_position_embeddings
        with torch.no_grad():
            self.cache = model.new_cache(slots, self.max_len)
        self.rows: list[Job | None] = [None] * slots
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._device = model.llm.embed_tokens.weight.device
        self._image_id = model.config.image_token_id
        self._vocab = model.config.text.vocab_size

    # -- the outside: any thread ---------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; its events arrive through ``job.emit``."""
        need = len(job.ids) + job.config.max_new_tokens
        if need > self.max_len:
            raise ValueError(f"the job needs {need} slots, the cache has {self.max_len} per row")
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            self._pending.append(job)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        """Rows in use, requests waiting, and counts of requests finished, cancelled and failed so far."""
        with self._wake:
            queued = len(self._pending)
        active = sum(job is not None for job in self.rows)
        return {"slots": len(self.rows), "active": active, "queued": queued, **self.counts}

    def start(self) -> None:
        """Run the loop in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="minillava-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop; requests still waiting or running fail with 503."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in [*self._pending, *(j for j in self.rows if j is not None)]:
            job.emit(Failed(503, "the server is shutting down"))
        self._pending.clear()
        self.rows = [None] * len(self.rows)

    # -- the loop: the scheduler's thread (or a test calling step()) --------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not any(self.rows):
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled jobs, admit waiting ones into free rows, then decode one token for every active row."""
        for i, job in enumerate(self.rows):
            if job is not None and job.cancelled:
                self.rows[i] = None
                self.counts["cancelled"] += 1
        while None in self.rows:
            with self._wake:
                job = self._pending.popleft() if self._pending else None
            if job is None:
                break
            if job.cancelled:
                self.counts["cancelled"] += 1
            else:
                self._admit(job)
        if any(self.rows):
            self._decode()
        else:
            self.cache.crop(0)  # idle: the next request starts from slot 0

    def _admit(self, job: Job) -> None:
        """Prefill ``job`` alone, emit its first token, and give it a row unless it is already finished."""
        config = job.config
        if config.seed is not None and config.temperature > 0:
            job.generator = torch.Generator(device=self._device).manual_seed(config.seed)
        try:
            solo = self.model.new_cache(1, len(job.ids))
            pixels = None if job.pixel_values is None else job.pixel_values.to(self._device)
            ids = torch.tensor([job.ids], device=self._device)
            out = self.model(ids, pixels, past_key_values=solo, logits_to_keep=1, image_sizes=job.image_sizes)
            logits = out.logits[:, -1]
            token = self._pick(logits, [job])[0]
        except Exception as err:  # a failure inside the model fails this request alone
            log.exception("prefill failed")
            self.counts["failed"] += 1
            job.emit(Failed(500, f"the model failed on this request: {type(err).__name__}: {err}"))
            return
        job.length = len(job.ids)
        if self._accept(job, token):
            return
        row = self.rows.index(None)
        end = max(self.cache.filled, solo.filled)
        self.cache.write_row(row, solo, end)
        self.rows[row] = job

    def _decode(self) -> None:
        """One token for every active row, through the first rows of the cache up to the last active one."""
        active = [i for i, job in enumerate(self.rows) if job is not None]
        longest = max(self.rows[i].length for i in active)
        if self.cache.filled >= self.max_len or self.cache.filled > 2 * longest + 32:
            self.cache.compact(active)
        n = active[-1] + 1
        rows = self.rows[:n]
        cache = self.cache if n == len(self.rows) else _first_rows(self.cache, n)
        tokens = torch.tensor([[0 if job is None else job.token] for job in rows], device=self._device)
        try:
            embeds = self.model.llm.embed_tokens(tokens)
            logits = self.model(inputs_embeds=embeds, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            picked = self._pick(logits, rows)
        except Exception as err:  # the batch's state is unknown: fail its requests, keep serving new ones
            log.exception("decode step failed")
            for i in active:
                self.rows[i].emit(Failed(500, f"the model failed during decoding: {type(err).__name__}: {err}"))
                self.rows[i] = None
                self.counts["failed"] += 1
            self.cache.crop(0)
            return
        self.cache.filled = cache.filled
        for i in active:
            job = self.rows[i]
            job.length += 1
            if self._accept(job, picked[i]):
                self.rows[i] = None

    def _pick(self, logits: torch.Tensor, jobs: list[Job | None]) -> list[int]:
        """Each row's next token, with its own job's settings (as ``generate`` picks for a batch of one)."""
        logits = logits.float()
        if 0 <= self._image_id < self._vocab:
            logits[:, self._image_id] = float("-inf")  # never generate the image placeholder
        tokens = logits.argmax(dim=-1)
        for i, job in enumerate(jobs):
            c = None if job is None else job.config
            if c is not None and c.temperature > 0:
                tokens[i] = sample_next(logits[i : i + 1], c.temperature, c.top_k, c.top_p, job.generator)[0]
        return tokens.tolist()

    def _accept(self, job: Job, token: int) -> bool:
        """Hand ``token`` to ``job``; emit its new text; return True (and emit :class:`Finished`) when it is done."""
        job.generated += 1
        job.token = token
        stopped = job.text.push(token)
        at_limit = job.generated >= job.config.max_new_tokens
        if at_limit and not stopped:
            job.text.finish()
        piece = job.text.take()
        if piece:
            job.emit(Piece(piece))
        if stopped or at_limit:
            job.emit(Finished("stop" if stopped else "length", len(job.ids), job.generated))
            self.counts["finished"] += 1
            return True
        return False


def _first_rows(cache: KVCache, n: int) -> KVCache:
    """A cache over the first ``n`` rows of ``cache`` that writes through to its buffers (its ``filled`` is its
    own: copy it back after a forward)."""
    view = KVCache([k[:n] for k in cache.keys], [v[:n] for v in cache.values], cache.mask[:n], cache.filled)
    view.padded = cache.padded
    return view
