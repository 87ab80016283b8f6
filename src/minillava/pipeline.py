"""One object for the common case: a converted checkpoint's model, processor and chat template.

    pipe = Pipeline("path/to/converted", dtype=torch.bfloat16)
    print(pipe.chat("What is in this image?", images=["cat.jpg"]))
    for piece in pipe.stream("Describe it.", images=["cat.jpg"]):
        print(piece, end="", flush=True)

    conv = pipe.conversation()                       # multi-turn: the cache is reused between turns
    conv.chat("What is in this image?", images=["cat.jpg"])
    conv.chat("And what color is it?")               # prefills only the new tokens; the image is not re-encoded

Text comes out through the tokenizer's incremental decoder and is cut at the template's stop strings; a stop
string may straddle tokens, so text that could be the start of one is held back until it cannot be.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import torch

from .cache import KVCache
from .chat import ChatTemplate, get_template
from .checkpoint import load
from .config import BUNDLED_MODEL
from .generate import GenerationConfig, resolve_eos, settings, stream_generate
from .hub import resolve
from .image import ImageInput, check_image_count, image_list, pad_tiles
from .processor import load_processor
from .textrow import TextRow
from .tokenizer import IMAGE_MARKER

ANSWER_MARKER = IMAGE_MARKER.replace(">", " >")
"""How ``<image>`` inside an earlier answer is written into later prompts: as text, never as an image marker."""


def with_image_markers(text: str, n_images: int) -> str:
    """Put one ``<image>`` line per image before ``text`` unless it already places its markers itself
    (original LLaVA's CLI writes ``"<image>\\n" + question``)."""
    if n_images and IMAGE_MARKER not in text:
        return (IMAGE_MARKER + "\n") * n_images + text
    return text


class Pipeline:
    """Model + processor + chat template of a checkpoint (any layout minillava reads, or a hub id).

    Args:
        path: a checkpoint directory of any layout minillava reads, or a Hugging Face hub id such as
            ``llava-hf/llava-1.5-7b-hf`` (:mod:`minillava.hub`); default: the bundled model.
        dtype: weights' dtype, or its name (default: as stored). ``torch.bfloat16`` is how a 7B model fits a CPU
            machine.
        device: where the model runs: ``"auto"`` (a CUDA GPU when there is one, else the CPU), ``"cpu"``,
            ``"cuda"``, ``"mps"`` or a ``torch.device`` (:func:`minillava.device.resolve_device`).
        template: a chat template name (default: the checkpoint's).
        image_mode: ``"crop"`` or ``"pad"`` to override the checkpoint's image preprocessing.
        generation: default generation settings; unset fields take the checkpoint's (``config.json``'s
            ``generation``), then :class:`~minillava.generate.GenerationConfig`'s.
        compile: decode through a ``torch.compile``'d step (see :func:`minillava.generate.generate`).
        quantize: ``"int8"`` or ``"int4"``: the decoder's linear layers quantised while loading (see
            :func:`minillava.load`).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "auto",
        template: str | ChatTemplate | None = None,
        image_mode: str | None = None,
        generation: GenerationConfig | None = None,
        compile: bool = False,
        quantize: str | None = None,
    ) -> None:
        if path is None:
            if not (BUNDLED_MODEL / "config.json").is_file():
                raise FileNotFoundError(f"no model path given and no bundled model at {BUNDLED_MODEL}")
            path = BUNDLED_MODEL
        self.path = resolve(path)
        self.processor = load_processor(self.path, image_mode=image_mode)
        self.template = get_template(template) if template is not None else self.processor.template
        self.model = load(self.path, dtype=dtype, device=device, quantize=quantize)  # load resolves "auto"
        defaults = {k: v for k, v in self.model.config.generation.items() if k in _SETTINGS}
        try:
            self.generation = GenerationConfig(**defaults) if generation is None else generation
        except ValueError as err:
            raise ValueError(f"{self.path / 'config.json'}: its generation defaults: {err}") from None
        self.compile = compile

    @property
    def context_length(self) -> int:
        return self.model.config.text.max_position_embeddings

    def conversation(self, system: str | None = None) -> Conversation:
        """A multi-turn conversation that keeps its KV cache between turns."""
        return Conversation(self, system)

    def chat(
        self,
        prompt: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        *,
        system: str | None = None,
        config: GenerationConfig | None = None,
        **overrides,
    ) -> str:
        """Answer one user message (a fresh conversation each call).

        Args:
            prompt: the user's message; ``<image>`` marks where images go, else one per image is put first.
            images: the message's images (paths, bytes or PIL images).
            system: replaces the template's system prompt.
            config: generation settings (default: the pipeline's); keyword arguments (``max_new_tokens=``,
                ``temperature=``, ``top_k=``, ``top_p=``, ``seed=``, ``stop_strings=``, ...) override its fields.
                Without an explicit ``max_new_tokens`` the answer is also capped by what the context window has
                left.
        """
        return "".join(self.stream(prompt, images, system=system, config=config, **overrides))

    def chat_batch(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[ImageInput]] | None = None,
        *,
        system: str | None = None,
        config: GenerationConfig | None = None,
        **overrides,
    ) -> list[str]:
        """Answer several independent user messages as one left-padded batch; ``images`` holds one list per
        prompt. Each answer is what :meth:`chat` gives for that prompt alone (greedy)."""
        if isinstance(prompts, str):
            raise ValueError("chat_batch takes a list of prompts; use chat() for one")
        prompts = list(prompts)
        groups = [[] for _ in prompts] if images is None else [image_list(g) for g in images]
        if len(groups) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(groups)} image lists; pass one list per prompt")
        texts = [self._prompt_text(p, len(g), system) for p, g in zip(prompts, groups, strict=True)]
        batch = self.processor(texts, images=groups, padding_side="left")
        gen = self.generation_settings(config, overrides, batch["input_ids"].shape[1])
        rows = self.text_rows(len(texts), gen)
        inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        steps = self._steps(*inputs, rows, gen, image_sizes=batch.get("image_sizes"))
        for _ in steps:
            pass
        for row in rows:
            row.finish()
        return [row.take() for row in rows]

    def stream(
        self,
        prompt: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        *,
        system: str | None = None,
        config: GenerationConfig | None = None,
        **overrides,
    ) -> Iterator[str]:
        """Like :meth:`chat`, yielding text pieces as they are generated; joined they are the answer."""
        return Conversation(self, system).stream(prompt, images, config=config, **overrides)

    def generation_settings(
        self, config: GenerationConfig | None, overrides: dict, prompt_tokens: int
    ) -> GenerationConfig:
        """The call's settings. A length given in the call is kept (and refused if it does not fit); the default
        length is capped by what the context window has left."""
        gen = settings(config or self.generation, **overrides)
        if config is None and overrides.get("max_new_tokens") is None:
            room = self.context_length - prompt_tokens
            if room < 1:
                raise ValueError(
                    f"the prompt is {prompt_tokens} tokens: it fills the context window of "
                    f"{self.context_length} tokens and leaves no room for an answer"
                )
            gen = gen.replace(max_new_tokens=min(gen.max_new_tokens, room))
        return gen

    def eos_ids(self, gen: GenerationConfig) -> list[int]:
        """The EOS ids plus every stop string that is a single special token of the tokenizer (so it stops
        generation even though decoding drops it from the text)."""
        ids = resolve_eos(self.model, gen.eos_token_id)
        for stop in self.template.stop_strings:
            token = self.processor.tokenizer.token_to_id(stop)
            if token is not None and token not in ids:
                ids.append(token)
        return ids

    def text_rows(self, n: int, gen: GenerationConfig) -> list[TextRow]:
        """``n`` fresh :class:`~minillava.textrow.TextRow` s that stop on the template's and ``gen``'s stop strings."""
        stops = (*self.template.stop_strings, *gen.stop_strings)
        return [TextRow(self.processor, stops, self.eos_ids(gen)) for _ in range(n)]

    # -- shared machinery ------------------------------------------------------------------------------------

    def _prompt_text(self, prompt: str, n_images: int, system: str | None) -> str:
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": with_image_markers(prompt, n_images)})
        return self.template.format(messages)

    def _steps(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rows: list[TextRow],
        gen: GenerationConfig,
        cache: KVCache | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """Run generation, feeding each step's tokens to ``rows`` (which decide stop strings)."""

        def should_stop(tokens: torch.Tensor) -> list[bool]:
            return [row.push(t) for row, t in zip(rows, tokens.tolist(), strict=True)]

        return stream_generate(
            self.model,
            input_ids,
            pixel_values,
            attention_mask,
            gen.replace(eos_token_id=self.eos_ids(gen)),
            cache=cache,
            compile=self.compile,
            should_stop=should_stop,
            image_sizes=image_sizes,
        )


_SETTINGS = {f.name for f in dataclasses.fields(GenerationConfig)}


def _as_prompt(message: dict[str, str]) -> dict[str, str]:
    """A message of the history as later prompts show it: an answer's ``<image>`` is text, not a marker."""
    if message["role"] != "assistant":
        return message
    return {**message, "content": message["content"].replace(IMAGE_MARKER, ANSWER_MARKER)}


class Conversation:
    """A multi-turn chat with one :class:`Pipeline`.

    Each turn renders the whole conversation with the template, then prefills only what this conversation's
    KV cache does not already hold: the cache is cropped to the longest common prefix of the new ids and the
    ids it holds, and only the rest runs. Images of earlier turns are not encoded again unless the reused prefix
    ends inside them. The cache is this conversation's own value (:attr:`cache`): other generations on the same
    model never touch it.

    Only the user's messages place images: an answer that contains the text ``<image>`` is kept as said in
    :attr:`messages` and written as :data:`ANSWER_MARKER` into later prompts.
    """

    def __init__(self, pipe: Pipeline, system: str | None = None) -> None:
        self.pipe = pipe
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.messages: list[dict[str, str]] = []
        self.pixels: list[torch.Tensor] = []  # preprocessed images, in placeholder order
        self.image_sizes: list[torch.Tensor] = []  # (height, width) of each image, with LLaVA-1.6 tiling
        self.cache: KVCache | None = None
        self._cached: list[int] = []  # the ids whose keys/values the cache holds, slot by slot
        self.last_prefill = 0  # tokens the last turn prefilled (for tests and benchmarks)

    def chat(
        self,
        prompt: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        *,
        config: GenerationConfig | None = None,
        **overrides,
    ) -> str:
        """Send one user message; return the assistant's answer (also kept in :attr:`messages`)."""
        return "".join(self.stream(prompt, images, config=config, **overrides))

    def stream(
        self,
        prompt: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        *,
        config: GenerationConfig | None = None,
        **overrides,
    ) -> Iterator[str]:
        """Send one user message; yield the answer's text pieces as they are generated.

        Stopping early (closing the iterator, or Ctrl-C) keeps the text so far as the answer. A turn whose
        answer is empty is dropped from the conversation.
        """
        pipe = self.pipe
        images = image_list(images)
        new_pixels, new_sizes = [], []
        if images:
            pixels, sizes, _ = pipe.processor.images(images)
            new_pixels = list(pixels)
            new_sizes = list(sizes) if sizes is not None else []
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        user = {"role": "user", "content": with_image_markers(prompt, len(new_pixels))}
        messages += [_as_prompt(m) for m in self.messages] + [user]
        text = pipe.template.format(messages)
        # The earlier turns' markers have their images: what is left over belongs to this message.
        check_image_count(text.count(IMAGE_MARKER) - len(self.pixels), len(new_pixels), "the message: ")
        pixels, sizes = self.pixels + new_pixels, self.image_sizes + new_sizes
        anyres = pipe.processor.image_config.mode == "anyres"
        k = pipe.processor.num_image_tokens
        counts = [pipe.processor.image_tokens(*size.tolist()) for size in sizes] if anyres else [k] * len(pixels)
        ids = pipe.processor.encode(text, counts)
        prefix = self._reusable_prefix(ids)
        # The images whose placeholders lie after the reused prefix (it never ends inside an image).
        left, n_new_images = sum(1 for i in ids[prefix:] if i == pipe.processor.image_token_id), 0
        while left > 0:
            n_new_images += 1
            left -= counts[-n_new_images]
        suffix_pixels = suffix_sizes = None
        if n_new_images and anyres:
            suffix_pixels, suffix_sizes = pad_tiles(pixels[-n_new_images:]), torch.stack(sizes[-n_new_images:])
        elif n_new_images:
            suffix_pixels = torch.stack(pixels[-n_new_images:])
        gen = pipe.generation_settings(config, overrides, len(ids))
        if self.cache is None:
            self.cache = pipe.model.new_cache(1, len(ids) + gen.max_new_tokens)
        self.cache.crop(prefix)
        self._cached = ids[:prefix]
        rows = pipe.text_rows(1, gen)
        # Checks arguments and sizes the cache now, so that errors surface here rather than at the first piece.
        suffix = torch.tensor([ids[prefix:]])
        steps = pipe._steps(suffix, suffix_pixels, None, rows, gen, cache=self.cache, image_sizes=suffix_sizes)
        self.last_prefill = len(ids) - prefix
        return self._turn(steps, rows[0], ids, user, (new_pixels, new_sizes))

    def _turn(
        self, steps: Iterator[torch.Tensor], row: TextRow, ids: list[int], user: dict, new_images: tuple[list, list]
    ) -> Iterator[str]:
        answer_ids: list[int] = []
        answer: list[str] = []
        try:
            for token in steps:
                answer_ids.append(int(token[0]))
                piece = row.take()
                if piece:
                    answer.append(piece)
                    yield piece
            row.finish()
            piece = row.take()
            if piece:
                answer.append(piece)
                yield piece
        finally:
            # Also on Ctrl-C or an abandoned iterator: what the user saw is the answer. An empty answer drops
            # the turn (a template cannot render an empty message). The cache holds every token fed through the
            # model: the prompt and all answer tokens but the last one yielded.
            self._cached = (ids + answer_ids)[: self.cache.filled]
            text = "".join(answer).strip()
            if text:
                self.messages += [user, {"role": "assistant", "content": text}]
                self.pixels += new_images[0]
                self.image_sizes += new_images[1]

    def _reusable_prefix(self, ids: list[int]) -> int:
        """How many leading ``ids`` the KV cache already holds for this conversation (never all of them: the
        last prompt token must run to give the first answer token's logits), not ending inside an image."""
        n = 0
        for a, b in zip(self._cached, ids, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)
        image_id = self.pipe.processor.image_token_id
        while 0 < n < len(ids) and ids[n] == image_id and ids[n - 1] == image_id:
            n -= 1  # back off to the start of the image's placeholders: the image is then encoded again
        return n
