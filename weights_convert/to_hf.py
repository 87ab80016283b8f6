"""Export a minillava checkpoint in the llava-hf layout (``LlavaForConditionalGeneration``).

The weights get the transformers 4.x hub names (``language_model.model.*``, ``language_model.lm_head.weight``,
``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``), which every transformers version since
4.36 and the serving engines that read llava-hf load. ``config.json`` keeps ``rope_theta``/``rope_scaling`` at the
top of ``text_config`` (the 4.x form, which 5.x also reads). Tensors are copied byte for byte, so converting a
llava-hf checkpoint and exporting it again gives back the same tensors.

The export also says how minillava generates, in transformers' terms, so that ``generate(**inputs)`` and
``pipeline("image-text-to-text")`` give minillava's answers with no extra arguments: ``generation_config.json``
(greedy unless the checkpoint samples, its EOS plus the template's one-token stop strings, the pad id, and the
placeholder id, which minillava never generates, in ``suppress_tokens``) and ``chat_template.jinja`` (the
checkpoint's own chat template; see :mod:`weights_convert.hf_chat_template`).

A LLaVA-1.6 checkpoint becomes ``LlavaNextForConditionalGeneration`` (``llava_next``, its pinpoints as
``(height, width)`` in the recorded order, ``image_newline``). transformers always rounds in unpad and never cuts the
sequence, so a checkpoint converted from original LLaVA keeps its tie-break but follows transformers' other two rules
once exported (they differ on 32 of the 1.21 M sizes up to 1100 x 1100; ``docs/llava-next.md``).

Things llava-hf cannot express are refused: a projector other than ``mlp2x_gelu``, LLaVA-1.6's ``flat`` merge, and
a placeholder id outside the vocabulary (what original-LLaVA conversions use). transformers looks the placeholder id
up in the embedding before overwriting it, so it needs a row; ``pad_vocab`` appends rows as llava-hf's own
conversion did.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minillava.chat import ChatTemplate, default_template_for, get_template
from minillava.checkpoint import TOKENIZER_FILES
from minillava.config import LlavaConfig, VisionConfig, read_json
from minillava.folders import atomic_directory
from minillava.generate import GenerationConfig
from minillava.layouts.keymaps import HF_V4, UnmappedKeyError
from minillava.layouts.reading import ConversionError
from minillava.layouts.source import MinillavaSource, Planned, cast, cast_dtype, plan
from minillava.safetensors_io import (
    DEFAULT_SHARD_BYTES,
    ProgressFn,
    dtype_name,
    open_safetensors,
    write_shards,
)
from minillava.tokenizer import Tokenizer

from .hf_chat_template import image_suffix_for, jinja_chat_template

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")  # written fresh from the checkpoint's template
# transformers' generate refuses stop strings unless it is handed a tokenizer, and has no seed setting.
MINILLAVA_ONLY_SETTINGS = ("seed", "stop_strings")
VOCAB_MULTIPLE = 64  # llava-hf pads 32002 -> 32064 for tensor-core friendly shapes
PADDED_TENSORS = ("llm.embed_tokens.weight", "llm.lm_head.weight")


def padded_vocab(config: LlavaConfig, pad_vocab: bool) -> int:
    """The vocabulary size of the export: unchanged, or grown so the placeholder id has a row."""
    vocab, image_id = config.text.vocab_size, config.image_token_id
    if 0 <= image_id < vocab:
        return vocab
    if image_id < 0:
        raise ConversionError(f"image_token_id {image_id} is negative; llava-hf needs an id inside the vocabulary")
    if not pad_vocab:
        raise ConversionError(
            f"image_token_id {image_id} lies outside the vocabulary ({vocab} rows), as in conversions of original "
            "LLaVA checkpoints; llava-hf embeds placeholder ids, so it needs a row for it. Rerun with --pad-vocab to "
            f"append rows up to a multiple of {VOCAB_MULTIPLE} (their value: the mean row) and register {IMAGE_TOKEN} "
            f"as token {image_id} in the tokenizer"
        )
    return -(-(image_id + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def rope_scaling_4x(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    # ``type`` for transformers < 4.45 and some serving engines, ``rope_type`` for the rest.
    return {"type": scaling["rope_type"], **scaling}


def hf_config_dict(config: LlavaConfig, vocab_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """llava-hf ``config.json`` contents (transformers 4.x form, also read by 5.x)."""
    t, v = config.text, config.vision
    if config.projector_type != "mlp2x_gelu":
        raise ConversionError(
            f"projector {config.projector_type!r}: llava-hf's projector is two Linears with GELU between "
            "(mlp2x_gelu) and cannot express this one; keep the checkpoint in the minillava layout"
        )
    if config.anyres is not None and config.anyres.merge != "spatial_unpad":
        raise ConversionError(
            f"LLaVA-1.6 merge {config.anyres.merge!r}: transformers' LlavaNext only implements spatial_unpad; keep the "
            "checkpoint in the minillava layout"
        )
    text = {
        "model_type": t.model_type,
        "vocab_size": vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_theta,
        "rope_scaling": rope_scaling_4x(t.rope_scaling),
        "attention_bias": t.attention_bias,
        "mlp_bias": t.mlp_bias,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "torch_dtype": dtype_name(dtype),
    }
    if t.model_type == "mistral":
        text["sliding_window"] = None  # MistralConfig's default is 4096
    next_fields = {}
    if config.anyres is not None:
        next_fields = {"image_grid_pinpoints": [list(p) for p in config.anyres.grid_pinpoints]}
    return {
        "architectures": ["LlavaNextForConditionalGeneration" if next_fields else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if next_fields else "llava",
        **next_fields,
        "image_token_index": config.image_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "image_seq_length": config.num_image_tokens,
        "tie_word_embeddings": t.tie_word_embeddings,
        "torch_dtype": dtype_name(dtype),
        "text_config": text,
        "vision_config": clip_vision_dict(v),
    }


def clip_vision_dict(v: VisionConfig) -> dict[str, Any]:
    """A transformers ``CLIPVisionConfig`` for the tower ``v``."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
    }


def preprocessor_dict(config: LlavaConfig) -> dict[str, Any]:
    """The image processor settings; ``pad`` mode needs ``LlavaImageProcessor(do_pad=True)`` (transformers >= 4.51)."""
    image = config.image
    kind = "LlavaImageProcessor" if image.mode == "pad" else "CLIPImageProcessor"
    extra: dict[str, Any] = {}
    if config.anyres is not None:  # LlavaNext's do_pad pads the tile axis to the batch's most tiles
        kind, extra = (
            "LlavaNextImageProcessor",
            {"image_grid_pinpoints": [list(p) for p in config.anyres.grid_pinpoints]},
        )
    return {
        "image_processor_type": kind,
        "processor_class": processor_class(config),
        **extra,
        "do_pad": image.mode == "pad" or config.anyres is not None,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image.shortest_edge},
        "resample": image.resample,
        "do_center_crop": True,
        "crop_size": {"height": image.crop_size, "width": image.crop_size},
        "do_rescale": True,
        "rescale_factor": image.rescale_factor,
        "do_normalize": True,
        "image_mean": list(image.mean),
        "image_std": list(image.std),
    }


def processor_class(config: LlavaConfig) -> str:
    return "LlavaProcessor" if config.anyres is None else "LlavaNextProcessor"


def processor_dict(config: LlavaConfig) -> dict[str, Any]:
    # The processor expands <image> to (image_size / patch)^2 + 1 - (1 if strategy is "default") placeholders.
    return {
        "processor_class": processor_class(config),
        "image_token": IMAGE_TOKEN,
        "patch_size": config.vision.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,
    }


def add_image_token(directory: Path, token_id: int) -> None:
    """Register ``<image>`` as special token ``token_id`` in the tokenizer files present in ``directory``."""
    entry = {"content": IMAGE_TOKEN, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    path = directory / "tokenizer_config.json"
    if path.is_file():
        data = read_json(path)
        data.setdefault("added_tokens_decoder", {})[str(token_id)] = {**entry, "special": True}
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    path = directory / "tokenizer.json"
    if path.is_file():
        data = read_json(path)
        added = [t for t in data.get("added_tokens") or [] if t.get("content") != IMAGE_TOKEN]
        data["added_tokens"] = [*added, {"id": token_id, **entry, "special": True}]
        path.write_text(json.dumps(data, ensure_ascii=False) + "\n")
    path = directory / "added_tokens.json"
    data = read_json(path, missing_ok=True)
    data[IMAGE_TOKEN] = token_id
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def generation_dict(config: LlavaConfig, vocab: int, stop_ids: list[int]) -> dict[str, Any]:
    """``generation_config.json``: how minillava generates with this checkpoint, as transformers' settings.

    ``stop_ids`` are the template's stop strings that are single tokens (``<|im_end|>``); they join the EOS ids.
    The placeholder id and the rows ``pad_vocab`` added (``vocab`` counts them) are suppressed, as minillava's
    head never produces them.
    """
    t = config.text
    carried = {k: v for k, v in config.generation.items() if k not in MINILLAVA_ONLY_SETTINGS}
    defaults = GenerationConfig()
    eos = list(t.eos_token_id) if isinstance(t.eos_token_id, list) else [t.eos_token_id]
    eos = [i for i in eos if i is not None]
    eos += [i for i in stop_ids if i not in eos]
    # minillava's pad id for finished rows: the checkpoint's generation pad, else the decoder's, else the EOS.
    pads = [p for p in (carried.get("pad_token_id"), t.pad_token_id) if isinstance(p, int)]
    pad = pads[0] if pads else eos[0] if eos else None
    out: dict[str, Any] = {"bos_token_id": t.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    out["pad_token_id"] = pad
    out.update({k: v for k, v in carried.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")})
    temperature = carried.get("temperature") or 0.0
    if temperature > 0:
        # minillava samples from every token unless top_k is set; transformers' default is top_k=50.
        out.update(do_sample=True, temperature=temperature, top_k=carried.get("top_k") or 0)
    else:
        out["do_sample"] = False
        for key in ("temperature", "top_p", "top_k"):
            out.pop(key, None)  # transformers warns about sampling settings that greedy decoding ignores
    out.setdefault("max_new_tokens", defaults.max_new_tokens)
    suppressed = {config.image_token_id, *range(t.vocab_size, vocab)} | set(carried.get("suppress_tokens") or [])
    out["suppress_tokens"] = sorted(i for i in suppressed if 0 <= i < vocab)
    return {k: v for k, v in out.items() if v is not None}


def chat_template_source(template: ChatTemplate, tokenizer: Tokenizer | None) -> str:
    """``chat_template.jinja`` for ``template``, with what the tokenizer needs after ``<image>`` (nothing, when the
    tokenizer cannot say or gives other ids either way)."""
    suffix = None
    if tokenizer is not None and tokenizer.token_to_id(IMAGE_TOKEN) is not None:
        suffix = image_suffix_for(tokenizer)
    return jinja_chat_template(template, suffix or "")


def _hf_tensors(
    path: Path, planned: list[Planned], dtype: torch.dtype | None, vocab: int
) -> Iterator[tuple[str, torch.Tensor]]:
    with open_safetensors(path) as get:
        for p in planned:
            tensor = cast(get(p.theirs), dtype)
            if p.ours in PADDED_TENSORS and tensor.shape[0] < vocab:
                # llava-hf's conversion drew its extra rows around the mean; the mean itself keeps the export
                # deterministic. Real tokens' logits are untouched.
                mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
                tensor = torch.cat([tensor, mean.expand(vocab - tensor.shape[0], -1)])
            yield HF_V4.to_theirs(p.ours), tensor


def export_hf(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    pad_vocab: bool = False,
    progress: ProgressFn | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Write the minillava checkpoint ``src`` to ``dst`` in the llava-hf layout, atomically; return its config.json.

    Args:
        src: a minillava checkpoint directory.
        dst: destination; must not exist or be empty unless ``force``.
        dtype: cast floating weights (default: keep the stored dtype).
        max_shard_bytes: largest output shard.
        force: replace a non-empty ``dst`` once the new one is complete.
        pad_vocab: grow the vocabulary when the placeholder id lies outside it (else that is refused).
        progress: called as ``progress(i, n, path)`` before each source file.
        allow_nonfinite: write floating tensors holding NaN or infinite values (refused by default, naming them).
    """
    src = Path(src)
    source = MinillavaSource(src)
    config = source.config()
    if config.quantization:
        raise ConversionError(
            f"{src} holds {config.quantization['scheme']} weights; llava-hf export needs a full-precision checkpoint"
        )
    vocab = padded_vocab(config, pad_vocab)
    files = plan(source, config)
    entries = []
    for _, planned in files:
        for p in planned:
            try:
                theirs = HF_V4.to_theirs(p.ours)
            except UnmappedKeyError:
                raise ConversionError(f"{src}: no llava-hf name for tensor {p.ours}") from None
            shape = (vocab, *p.meta.shape[1:]) if p.ours in PADDED_TENSORS else p.meta.shape
            entries.append((theirs, shape, cast_dtype(p.meta.dtype, dtype)))
    # torch_dtype names the decoder's dtype (a CLIP tower kept in fp32 next to an fp16 decoder is common).
    llm_dtype = next(d for name, _, d in entries if name == HF_V4.to_theirs("llm.embed_tokens.weight"))
    hf_config = hf_config_dict(config, vocab, llm_dtype)
    sources = [(path, functools.partial(_hf_tensors, path, planned, dtype, vocab)) for path, planned in files]
    with atomic_directory(dst, force=force, sources=[src]) as tmp:
        write_shards(tmp, entries, sources, max_shard_bytes, progress, allow_nonfinite)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(config), indent=2) + "\n")
        (tmp / "processor_config.json").write_text(json.dumps(processor_dict(config), indent=2) + "\n")
        tokenizer_files = [name for name in TOKENIZER_FILES if name not in CHAT_TEMPLATE_FILES]
        for name in tokenizer_files:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        tokenizer = None
        if any((tmp / name).is_file() for name in tokenizer_files):
            if vocab != config.text.vocab_size:
                add_image_token(tmp, config.image_token_id)
            tokenizer = Tokenizer.from_dir(tmp)
        template = get_template(config.chat_template or default_template_for(src.resolve(), config.source_layout))
        stop_ids = [] if tokenizer is None else [tokenizer.token_to_id(s) for s in template.stop_strings]
        generation = generation_dict(config, vocab, [i for i in stop_ids if i is not None])
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "chat_template.jinja").write_text(chat_template_source(template, tokenizer))
    return hf_config
