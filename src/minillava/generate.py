"""Token-level generation: prefill once, then one token per step through the model's own KV cache.

The loop is deliberately plain, gpt-fast style: the prompt (with its images, each encoded once) is run through
the decoder in one call that fills the cache, then each step feeds one token per row and asks the lm_head for
exactly one row of logits. Nothing is recomputed and nothing grows: the cache is preallocated for the prompt
plus ``max_new_tokens`` slots.

A batch is left-padded. Cache slots are shared by all rows (slot ``t`` holds every row's ``t``-th column), RoPE
positions are per row and follow the attention mask, so the first real token of a padded row sits at position 0
and each row computes exactly what it would alone. A row that finishes (EOS or a stop condition of the caller)
keeps being fed the pad id; attention is per row, so it cannot influence the others.

Sampling follows transformers' semantics (temperature divides the logits, then top-k, then top-p keeps the
smallest set whose probability reaches ``top_p``), and draws with the exponential-race trick (``argmax p / E``
with ``E ~ Exp(1)``), which is an exact sample from ``p`` and consumes the same random numbers every step
whatever the rows do, so one seed reproduces a run and a row's draws never depend on other rows finishing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .fusion import embed_with_images
from .model import Llava, positions_from_mask

# Per model: the generation that last wrote its KV cache, as (owner, call). A multi-turn chat may reuse the cache
# it filled only while it is still the owner (see :func:`cache_owner`); a suspended stream checks that no other
# generation took the cache over before it resumes.
_CACHE_WRITERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_owner(model: Llava) -> object | None:
    """The ``owner`` token passed to the last :func:`generate_steps` on ``model`` (``None`` for :func:`generate`,
    or while a prefill is in progress)."""
    return _CACHE_WRITERS.get(model, (None, None))[0]


def check_generation_args(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int | None = None
) -> None:
    """Raise ``ValueError`` naming the value for each argument out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None to disable), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


def resolve_eos(model: Llava, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """EOS ids to stop on: ``None`` takes the checkpoint's, an int or a sequence sets them, ``[]`` disables."""
    if eos_token_id is None:
        eos_token_id = model.config.text.eos_token_id
        if eos_token_id is None:
            return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    ids = list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an int, a list of ints, or None; got {eos_token_id!r}")
    return ids


def resolve_pad(model: Llava, eos_ids: Sequence[int]) -> int:
    """The id finished rows are filled with: the checkpoint's pad id, else its first EOS (as transformers), else 0."""
    config = model.config
    for candidate in (config.generation.get("pad_token_id"), config.text.pad_token_id):
        if isinstance(candidate, int):
            return candidate
    eos = config.text.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is not None:
        return eos
    return eos_ids[0] if eos_ids else 0


def process_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature, then top-k, then top-p on fp32 ``logits`` [B, V]; filtered entries become ``-inf``.

    Same semantics as transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``
    (top-p always keeps at least the most likely token). ``temperature`` must be > 0 here.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending: the tail to drop comes first
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1:] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from fp32 ``logits`` [B, V]: argmax when ``temperature == 0``, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    # Exponential race: argmax(p_i / E_i), E_i ~ Exp(1) i.i.d., picks i with probability p_i. Clamp keeps a
    # (practically impossible) zero draw from dividing by zero.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


SMALL_MODEL_BYTES = 64 * 2**20
"""A part of the model (vision tower + projector, or decoder) with fewer weight bytes runs on one intra-op thread.

A small model's matrix products are too small for threads to pay: splitting them costs synchronisation, and on a
busy machine a descheduled worker stalls every parallel op. On the 2-core development machine under load, the
tiny benchmark model (15 MB decoder) decoded at 115 tokens/s on 1 thread and 15 on 2, while a decode step of the
7B-sized slice (2 GB of weights per token) took 160 ms on 2 threads and 190 ms on 1. Parts above this size keep
``torch.get_num_threads()``.
"""


def _threads_for(*modules: torch.nn.Module) -> int | None:
    """1 when ``modules`` hold fewer than :data:`SMALL_MODEL_BYTES` of weights, else None (keep the setting)."""
    size = sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())
    return 1 if size < SMALL_MODEL_BYTES else None


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads (None: unchanged); the setting is restored before anything else
    (a generator's caller) runs."""
    old = torch.get_num_threads()
    if n is None or n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _ensure_cache(model: Llava, batch: int, needed: int, keep: int = 0) -> None:
    """Make sure the KV cache holds ``batch`` rows and ``needed`` slots, keeping slots ``< keep`` if it grows.

    An existing cache that is large enough is reused as is: generation only reads slots it wrote itself.
    """
    llm = model.llm
    layers = list(llm.layers)
    if not layers:
        return
    dtype = llm.embed_tokens.weight.dtype
    old = [layer.self_attn.kv_cache for layer in layers]
    if old[0] is not None and old[0].k.shape[0] == batch and old[0].k.shape[2] >= needed and old[0].k.dtype == dtype:
        return
    llm.setup_cache(batch, needed)
    if keep:
        if old[0] is None or old[0].k.shape[0] != batch or old[0].k.shape[2] < keep:
            raise ValueError(f"cannot keep {keep} cached slots: the KV cache does not hold them")
        for layer, cache in zip(layers, old, strict=True):
            layer.self_attn.kv_cache.k[:, :, :keep] = cache.k[:, :, :keep]
            layer.self_attn.kv_cache.v[:, :, :keep] = cache.v[:, :, :keep]


def _check_inputs(
    model: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cached_prefix: int = 0,
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got {shape}")
    if not 0 <= cached_prefix < input_ids.shape[1]:
        raise ValueError(f"cached_prefix must be in [0, {input_ids.shape[1]}), got {cached_prefix}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got {list(attention_mask.shape)}"
            )
        real = attention_mask.bool()
        if not bool(real[:, -1].all()):
            rows = [i for i, ok in enumerate(real[:, -1].tolist()) if not ok]
            raise ValueError(
                f"rows {rows} end in padding: generation needs left padding (pad at the start, the last column real)"
            )
    if pixel_values is not None:
        v = model.config.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values must be [N, {want[0]}, {want[1]}, {want[2]}], got {list(pixel_values.shape)}"
            )
    config = model.config
    k = config.num_image_tokens
    placeholders = int((input_ids[:, cached_prefix:] == config.image_token_id).sum())
    images = 0 if pixel_values is None else pixel_values.shape[0]
    if placeholders != images * k:
        raise ValueError(
            f"input_ids hold {placeholders} image placeholders (id {config.image_token_id}, {k} per image) but "
            f"pixel_values holds {images} image(s), which need {images * k}"
        )


def generate_steps(
    model: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    *,
    cached_prefix: int = 0,
    should_stop: Callable[[torch.Tensor], Sequence[bool] | None] | None = None,
    owner: object | None = None,
) -> Iterator[torch.Tensor]:
    """Check the arguments and return the generation loop: an iterator of each step's tokens ``[B]`` (finished
    rows get the pad id). The KV cache is sized and the prefill runs on the first ``next()``.

    Arguments as :func:`generate`, plus three hooks for :class:`~minillava.pipeline.Pipeline`:

    Args:
        cached_prefix: the KV cache already holds ``input_ids[:, :cached_prefix]`` at slots ``0..cached_prefix-1``
            (written by an earlier call with the same ``owner``); only the rest is prefilled. ``pixel_values`` then
            holds just the images whose placeholders lie in the rest.
        should_stop: called with each step's tokens; rows it returns True for finish after that token (stop
            strings are checked this way, on decoded text).
        owner: recorded as the cache's writer once the prefill is done (see :func:`cache_owner`).
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p, seed)
    eos_ids = resolve_eos(model, eos_token_id)
    _check_inputs(model, input_ids, pixel_values, attention_mask, cached_prefix)
    batch, length = input_ids.shape
    context = model.config.text.max_position_embeddings
    if length + max_new_tokens > context:
        raise ValueError(
            f"the prompt is {length} tokens and max_new_tokens is {max_new_tokens}: {length + max_new_tokens} "
            f"exceeds the context window of {context} tokens"
        )
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if padded and not bool(attention_mask.bool().any(dim=1).all()):
        raise ValueError("a row of attention_mask has no real token")
    return _loop(
        model,
        input_ids,
        pixel_values,
        attention_mask if padded else None,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        eos_ids,
        resolve_pad(model, eos_ids),
        cached_prefix,
        should_stop,
        owner,
    )


@torch.inference_mode()
def _loop(
    model: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    eos_ids: list[int],
    pad_id: int,
    cached_prefix: int,
    should_stop: Callable[[torch.Tensor], Sequence[bool] | None] | None,
    owner: object | None,
) -> Iterator[torch.Tensor]:
    llm = model.llm
    device = llm.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    batch, length = input_ids.shape
    total = length + max_new_tokens
    # From here on the cache no longer holds what its previous writer left. Allocated as normal tensors (not
    # inference tensors) so that plain no_grad callers of the model can keep using it.
    _CACHE_WRITERS[model] = (None, None)
    with torch.inference_mode(False), torch.no_grad():
        _ensure_cache(model, batch, total, keep=cached_prefix)

    # The padding mask over every slot this call can write; None when no row is padded (then SDPA takes its
    # plain causal path and decode steps build no mask at all).
    if attention_mask is not None:
        mask = torch.ones(batch, total, dtype=torch.bool, device=device)
        mask[:, :length] = attention_mask.to(device).bool()
        positions = positions_from_mask(mask[:, :length])
    else:
        mask = None
        positions = torch.arange(length, device=device).expand(batch, length)
    slots = torch.arange(total, device=device)

    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        """The next token per row; finished rows get the pad id; rows that finish now are marked."""
        token = sample_next(logits, temperature, top_k, top_p, generator).masked_fill(finished, pad_id)
        if eos is not None:
            finished.logical_or_(torch.isin(token, eos))
        if should_stop is not None:
            stop = should_stop(token)
            if stop is not None:
                finished.logical_or_(torch.as_tensor(stop, dtype=torch.bool, device=device))
        return token

    # Prefill: encode the images once, splice them in, fill the cache, keep one row of logits per sequence.
    rows = None
    if pixel_values is not None:
        with _intra_op_threads(_threads_for(model.vision, model.projector)):
            rows = model.encode_images(pixel_values.to(device))
    decoder_threads = _threads_for(llm.layers, llm.lm_head if llm.lm_head is not None else llm.embed_tokens)
    with _intra_op_threads(decoder_threads):
        embeds = embed_with_images(llm.embed_tokens, input_ids[:, cached_prefix:], rows, model.config.image_token_id)
        hidden = llm(
            embeds,
            positions[:, cached_prefix:],
            None if mask is None else mask[:, :length],
            slots[cached_prefix:length],
        )
        token = pick(llm.logits(hidden[:, -1]).float())
    call = object()
    _CACHE_WRITERS[model] = (owner, call)

    pos = positions[:, -1:].clone()  # [B, 1]: the RoPE position of the last fed token, per row
    for step in range(max_new_tokens):
        yield token
        if step + 1 == max_new_tokens or bool(finished.all()):
            return
        if _CACHE_WRITERS.get(model, (None, None))[1] is not call:
            raise RuntimeError(
                "another generation on this model started while this stream was paused and overwrote its KV cache; "
                "finish (or close) one stream before starting the next"
            )
        # Decode: feed this token at the next slot, one row of logits out. The token is embedded directly (not
        # through model.embed), as transformers does: a generated placeholder id is just a token here.
        slot = length + step
        pos += 1
        with _intra_op_threads(decoder_threads):
            hidden = llm(
                llm.embed_tokens(token[:, None]),
                pos,
                None if mask is None else mask[:, : slot + 1],
                slots[slot : slot + 1],
            )
            token = pick(llm.logits(hidden[:, -1]).float())


def generate(
    model: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stream: bool = False,
) -> torch.Tensor | Iterator[torch.Tensor]:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids``.

    Args:
        model: a :class:`~minillava.model.Llava` (its KV cache is (re)allocated for prompt + ``max_new_tokens``).
        input_ids: [B, T] prompt ids, left-padded, with ``config.num_image_tokens`` placeholders per image.
        pixel_values: [N, 3, S, S], the images in placeholder order across the batch, or None.
        attention_mask: [B, T], 1 for real tokens, 0 for (left) padding; None means no padding.
        max_new_tokens: the most tokens to generate per row (>= 1).
        temperature: 0 is greedy; > 0 samples from ``softmax(logits / temperature)``.
        top_k: keep only the ``top_k`` most likely tokens before sampling (None: all).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p``, in (0, 1] (None: all).
        seed: seeds the sampling generator; the same seed gives the same tokens. None: torch's global generator.
        eos_token_id: ids that end a row. None: the checkpoint's EOS; an int or list sets them; ``[]`` disables.
        stream: return an iterator yielding each step's tokens ``[B]`` as they are generated.

    Returns:
        The new tokens only, ``[B, n_new]`` with ``n_new <= max_new_tokens`` (generation ends when every row has
        finished); a row that finished early is filled with the pad id after its EOS. With ``stream=True``, an
        iterator of ``[B]`` tensors instead.

    Raises:
        ValueError: prompt length + ``max_new_tokens`` past the context window, a negative ``temperature``,
            ``top_p`` outside (0, 1], ``top_k < 1``, ``max_new_tokens < 1``, ``pixel_values`` whose count or size
            does not match the placeholders, or a right-padded ``attention_mask``.
    """
    steps = generate_steps(
        model, input_ids, pixel_values, attention_mask, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id
    )
    if stream:
        return steps
    tokens = list(steps)
    return torch.stack(tokens, dim=1)
