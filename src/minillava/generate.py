"""Token-level generation: prefill once through ``forward``, then one token per step through the same cache.

The loop is plain, gpt-fast style. The prompt (its images encoded once) runs through
:meth:`Llava.forward <minillava.model.Llava.forward>` and fills a :class:`~minillava.cache.KVCache` sized for
the prompt plus ``max_new_tokens``; each step then feeds one token per row through ``forward`` again (or, with
``compile=True``, through the compiled static :meth:`~minillava.model.Llava.decode_step`) and asks the lm_head
for one row of logits. Positions, masks and the image splice are the model's business, in one place.

A batch is left-padded. A row that finishes (EOS, or a stop condition of the caller) keeps being fed the pad id;
attention is per row, so it cannot influence the others. The image placeholder id is never generated (its logit
is masked): it would otherwise come back as a marker in the next turn's prompt. Logits that stop being finite
(NaN weights or pixels, a float16 overflow) raise an error instead of producing token 0 over and over.

Sampling follows transformers' semantics (temperature divides the logits, then top-k, then top-p keeps the
smallest set whose probability reaches ``top_p``), and draws with the exponential-race trick (``argmax p / E``
with ``E ~ Exp(1)``), which is an exact sample from ``p`` and consumes the same random numbers every step
whatever the rows do, so one seed reproduces a run and a row's draws never depend on other rows finishing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .image import check_image_count
from .model import Llava

StopHook = Callable[[torch.Tensor], Sequence[bool] | None]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: length, sampling, and when to stop. Every generation entry point takes one (or its
    fields as keyword arguments).

    Attributes:
        max_new_tokens: the most tokens to generate per row.
        temperature: 0 is greedy; > 0 samples from ``softmax(logits / temperature)``.
        top_k: keep only the ``top_k`` most likely tokens before sampling (None: all).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p``, in (0, 1] (None: all).
        seed: seeds the sampling generator; the same seed gives the same tokens. None: torch's global generator.
        eos_token_id: ids that end a row. None: the checkpoint's EOS; an int or list sets them; ``[]`` disables.
        stop_strings: text that ends an answer (cut from it), on top of the chat template's; needs a tokenizer,
            so only the text-level API (:class:`~minillava.pipeline.Pipeline`) reads it.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None to disable), got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        eos = self.eos_token_id
        if eos is not None and not _is_int(eos):
            if isinstance(eos, (str, bytes)) or not isinstance(eos, Sequence) or not all(_is_int(i) for i in eos):
                raise ValueError(f"eos_token_id must be an int, a list of ints, or None; got {eos!r}")
            object.__setattr__(self, "eos_token_id", tuple(eos))
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) for s in self.stop_strings):
            raise ValueError(f"stop_strings must be a list of strings, got {self.stop_strings!r}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    def replace(self, **changes) -> GenerationConfig:
        """A copy with ``changes`` applied (``None`` values keep this config's)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def settings(config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """``config`` (default: :class:`GenerationConfig`'s defaults) with the non-None ``overrides`` applied."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    return (config or GenerationConfig()).replace(**overrides)


def resolve_eos(model: Llava, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """EOS ids to stop on: ``None`` takes the checkpoint's, an int or a sequence sets them, ``[]`` disables."""
    if eos_token_id is None:
        eos_token_id = model.config.text.eos_token_id
        if eos_token_id is None:
            return []
    ids = [eos_token_id] if _is_int(eos_token_id) else list(eos_token_id)
    vocab = model.config.text.vocab_size
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        raise ValueError(f"eos_token_id {outside} outside the vocabulary [0, {vocab}): it could never be generated")
    return ids


def resolve_pad(model: Llava, eos_ids: Sequence[int]) -> int:
    """The id finished rows are filled with: the checkpoint's pad id, else its first EOS (as transformers), else 0."""
    config = model.config
    for candidate in (config.generation.get("pad_token_id"), config.text.pad_token_id):
        if _is_int(candidate):
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


COMPILE_BUCKET = 256
"""With ``compile=True`` a new cache's length is rounded up to a multiple of this, so that prompts of other
lengths reuse the compiled step instead of compiling it again for a new buffer size."""


def _check_inputs(
    model: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past: int,
    image_sizes: torch.Tensor | None = None,
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got {shape}")
    if attention_mask is not None:
        want = (input_ids.shape[0], past + input_ids.shape[1])
        if tuple(attention_mask.shape) != want:
            covers = "input_ids'" if not past else f"the {past} cached + {input_ids.shape[1]} new tokens'"
            raise ValueError(f"attention_mask must have {covers} shape {list(want)}, got {list(attention_mask.shape)}")
        real = attention_mask.bool()
        if not bool(real[:, -1].all()):
            rows = [i for i, ok in enumerate(real[:, -1].tolist()) if not ok]
            raise ValueError(
                f"rows {rows} end in padding: generation needs left padding (pad at the start, the last column real)"
            )
    if pixel_values is not None:
        v = model.config.vision
        tiles = "tiles, " if image_sizes is not None else ""
        want = (v.num_channels, v.image_size, v.image_size)
        if pixel_values.dim() != (5 if tiles else 4) or tuple(pixel_values.shape[-3:]) != want:
            raise ValueError(
                f"pixel_values must be [N, {tiles}{v.num_channels}, {v.image_size}, {v.image_size}], "
                f"got {list(pixel_values.shape)}"
            )
        bad = int((~pixel_values.isfinite()).sum())
        if bad:
            raise ValueError(
                f"pixel_values hold {bad} NaN or infinite value(s); preprocess the images with the checkpoint's "
                "processor (minillava.load_processor)"
            )
    config = model.config
    placeholders = int((input_ids == config.image_token_id).sum())
    images = 0 if pixel_values is None else pixel_values.shape[0]
    per_image: int | list[int] = config.num_image_tokens
    if image_sizes is not None and pixel_values is not None:
        if tuple(image_sizes.shape) != (images, 2):
            raise ValueError(f"image_sizes must be [{images}, 2] (height, width), got {list(image_sizes.shape)}")
        per_image = [config.anyres_token_count(h, w) for h, w in image_sizes.tolist()]
    check_image_count(placeholders, images, per_image=per_image, placeholder_id=config.image_token_id)


def stream_generate(
    model: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    cache: KVCache | None = None,
    compile: bool = False,
    should_stop: StopHook | None = None,
    image_sizes: torch.Tensor | None = None,
    **overrides,
) -> Iterator[torch.Tensor]:
    """Generate after ``input_ids``, yielding each step's tokens ``[B]`` as they come (finished rows get the pad
    id). Arguments as :func:`generate`, plus:

    Args:
        should_stop: called with each step's tokens; rows it returns True for finish after that token (the
            text-level API checks stop strings this way).

    The arguments are checked now; the prefill runs on the first ``next()``.
    """
    config = settings(config, **overrides)
    eos_ids = resolve_eos(model, config.eos_token_id)
    past = 0 if cache is None else cache.filled
    _check_inputs(model, input_ids, pixel_values, attention_mask, past, image_sizes)
    batch, length = input_ids.shape
    if cache is not None and cache.batch != batch:
        raise ValueError(f"the KV cache has {cache.batch} rows but input_ids has {batch}")
    total = past + length + config.max_new_tokens
    context = model.config.text.max_position_embeddings
    if total > context:
        prompt = f"{length} tokens" if not past else f"{past} cached + {length} new tokens"
        raise ValueError(
            f"the prompt is {prompt} and max_new_tokens is {config.max_new_tokens}: {total} exceeds the context "
            f"window of {context} tokens"
        )
    if attention_mask is not None:
        if not bool(attention_mask.bool().any(dim=1).all()):
            raise ValueError("a row of attention_mask has no real token")
        if bool(attention_mask.bool().all()):
            attention_mask = None
    if cache is None:
        size = total if not compile else min(-(-total // COMPILE_BUCKET) * COMPILE_BUCKET, max(total, context))
        with torch.no_grad():  # plain tensors, not inference tensors: the caller may keep using the cache
            cache = model.new_cache(batch, size)
    else:
        with torch.no_grad():
            cache.grow(total)
    step = _compiled_step(model) if compile else None
    return _loop(model, input_ids, pixel_values, attention_mask, config, eos_ids, cache, step, should_stop, image_sizes)


def _compiled_step(model: Llava) -> Callable:
    """``model.decode_step`` compiled as one graph (compiled once per model and cache shape, then reused)."""
    if model.llm.rotary.dynamic:
        raise ValueError("compile=True does not support dynamic RoPE scaling (its frequencies depend on the length)")
    mode = "reduce-overhead" if model.llm.embed_tokens.weight.is_cuda else None
    return torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)


@torch.inference_mode()
def _loop(
    model: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    eos_ids: list[int],
    cache: KVCache,
    compiled_step: Callable | None,
    should_stop: StopHook | None,
    image_sizes: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    device = cache.device
    batch = input_ids.shape[0]
    pad_id = resolve_pad(model, eos_ids)
    generator = None
    if config.seed is not None and config.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    image_id = model.config.image_token_id
    vocab = model.config.text.vocab_size

    def pick(logits: torch.Tensor, index: int) -> torch.Tensor:
        """The next token per row; finished rows get the pad id; rows that finish now are marked."""
        logits = logits.float()
        broken = ~logits.isfinite().all(dim=-1) & ~finished
        if bool(broken.any()):
            raise ValueError(
                f"the model gave NaN or infinite logits at generated token {index + 1} (rows "
                f"{broken.nonzero().flatten().tolist()}): its weights or inputs hold NaN or infinite values, or "
                "float16 overflowed. Check the checkpoint (python -m weights_convert names non-finite weights), or "
                "run in bfloat16 or float32"
            )
        if 0 <= image_id < vocab:
            logits[:, image_id] = float("-inf")
        token = sample_next(logits, config.temperature, config.top_k, config.top_p, generator)
        token = token.masked_fill(finished, pad_id)
        if eos is not None:
            finished.logical_or_(torch.isin(token, eos))
        if should_stop is not None:
            stop = should_stop(token)
            if stop is not None:
                finished.logical_or_(torch.as_tensor(stop, dtype=torch.bool, device=device))
        return token

    out = model(
        input_ids.to(device),
        None if pixel_values is None else pixel_values.to(device),
        None if attention_mask is None else attention_mask.to(device),
        past_key_values=cache,
        logits_to_keep=1,
        image_sizes=image_sizes,
    )
    token = pick(out.logits[:, -1], 0)
    input_pos = torch.tensor([cache.filled], device=device) if compiled_step is not None else None
    for step in range(config.max_new_tokens):
        yield token
        if step + 1 == config.max_new_tokens or bool(finished.all()):
            return
        # The token is embedded directly: it is never a placeholder (pick masks that id).
        if compiled_step is not None:
            logits = compiled_step(token[:, None], input_pos, cache)
            cache.filled += 1
            input_pos += 1
        else:
            embeds = model.llm.embed_tokens(token[:, None])
            logits = model(inputs_embeds=embeds, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        token = pick(logits, step + 1)


def generate(
    model: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    cache: KVCache | None = None,
    compile: bool = False,
    image_sizes: torch.Tensor | None = None,
    **overrides,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids``.

    Args:
        model: a :class:`~minillava.model.Llava`.
        input_ids: [B, T] prompt ids, left-padded, with ``config.num_image_tokens`` placeholders per image.
        pixel_values: [N, 3, S, S], the images in placeholder order across the batch, or None; LLaVA-1.6 tiles
            [N, T, 3, S, S] with ``image_sizes``.
        attention_mask: [B, T], 1 for real tokens, 0 for (left) padding; None means no padding. With a filled
            ``cache``, [B, cached + T] as in ``forward``.
        config: a :class:`GenerationConfig`; keyword arguments (``max_new_tokens=``, ``temperature=``, ...)
            override its fields.
        cache: continue this :class:`~minillava.cache.KVCache` (``input_ids`` are then the tokens after what it
            holds); it grows if it lacks room, and holds every fed token afterwards. None: a new one.
        compile: run each decode step through ``torch.compile(model.decode_step, fullgraph=True)``. The first
            call compiles (seconds to a minute); later calls with the same cache size reuse it.
        image_sizes: [N, 2] (height, width) of LLaVA-1.6 images, as the processor returns them.

    Returns:
        The new tokens only, ``[B, n_new]`` with ``n_new <= max_new_tokens`` (generation ends when every row has
        finished); a row that finished early is filled with the pad id after its EOS.

    Raises:
        ValueError: prompt length + ``max_new_tokens`` past the context window, a setting out of range,
            ``pixel_values`` whose count or size does not match the placeholders, or a right-padded
            ``attention_mask``.
    """
    steps = stream_generate(
        model,
        input_ids,
        pixel_values,
        attention_mask,
        config,
        cache=cache,
        compile=compile,
        image_sizes=image_sizes,
        **overrides,
    )
    return torch.stack(list(steps), dim=1)
