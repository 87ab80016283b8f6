"""llava-hf checkpoints (``LlavaForConditionalGeneration``), as transformers 4.x and 5.x save them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..chat import default_template_for
from ..config import CLIP_MEAN, CLIP_STD, AnyresConfig, ImageConfig, LlavaConfig, TextConfig, VisionConfig, read_json
from .keymaps import HF_V4, HF_V5, KeyMap
from .reading import ConversionError, Part, read_meta, weight_files

# transformers' defaults for fields a config.json may leave out (LlamaConfig, and LlavaConfig's CLIP-L/336).
LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CLIP_DEFAULTS = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}


def rope_from_hf(text: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from a 4.x (top-level fields) or 5.x (``rope_parameters``) text config."""
    params = text.get("rope_parameters")
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", text.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(theta), scaling
    return float(text.get("rope_theta", 10000.0)), text.get("rope_scaling")


# transformers' defaults for LLaVA-1.6 (LlavaNextConfig.image_grid_pinpoints), as (height, width).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
MISTRAL_SLIDING_WINDOW = 4096  # what MistralConfig assumes when a config.json leaves sliding_window out


def text_config_from_hf(text: dict[str, Any], tie_word_embeddings: bool) -> TextConfig:
    t = {**LLAMA_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    theta, scaling = rope_from_hf(text)
    model_type = t.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ValueError(f"unsupported language model type {model_type!r}; minillava implements LLaMA and Mistral")
    window = text.get("sliding_window", MISTRAL_SLIDING_WINDOW if model_type == "mistral" else None)
    if window is not None:
        raise ConversionError(
            f"sliding_window is {window}{'' if 'sliding_window' in text else ' (Mistral default)'}: minillava "
            "implements Mistral without a sliding window, as every released LLaVA-1.6 config has it (null), and the "
            "two references disagree past the window (transformers applies it, original LLaVA under sdpa does not). "
            "If your sequences stay within the window the result is the same: set sliding_window to null in "
            "config.json"
        )
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads"),
        head_dim=t.get("head_dim"),
        rms_norm_eps=t["rms_norm_eps"],
        max_position_embeddings=t["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=t.get("attention_bias", False),
        mlp_bias=t.get("mlp_bias", False),
        tie_word_embeddings=tie_word_embeddings,
        hidden_act=t.get("hidden_act", "silu"),
        bos_token_id=t.get("bos_token_id"),
        eos_token_id=t.get("eos_token_id"),
        pad_token_id=t.get("pad_token_id"),
        model_type=model_type,
    )


def vision_config_from_hf(vision: dict[str, Any]) -> VisionConfig:
    v = {**CLIP_DEFAULTS, **{k: val for k, val in vision.items() if val is not None}}
    return VisionConfig(
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        num_channels=v["num_channels"],
        layer_norm_eps=v["layer_norm_eps"],
        hidden_act=v["hidden_act"],
    )


def image_config_from_preprocessor(
    pre: dict[str, Any] | None, default_size: int, pad: bool = False, anyres: bool = False
) -> ImageConfig:
    """Image settings from a ``preprocessor_config.json`` (CLIP, llava or llava-next image processor)."""
    pre = pre or {}
    size = pre.get("size", default_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height", default_size))
    crop = pre.get("crop_size", size)
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("width", size))
    return ImageConfig(
        mode="anyres" if anyres else "pad" if pad or pre.get("do_pad") else "crop",
        shortest_edge=int(size),
        crop_size=int(crop),
        mean=tuple(pre.get("image_mean", CLIP_MEAN)),
        std=tuple(pre.get("image_std", CLIP_STD)),
        resample=int(pre.get("resample", 3)),
        rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
    )


def json_object(config: dict[str, Any], key: str) -> dict[str, Any]:
    """The nested object ``config[key]`` (``{}`` when absent or null)."""
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def config_from_hf(
    hf: dict[str, Any], preprocessor: dict[str, Any] | None = None, name: str | Path = ""
) -> LlavaConfig:
    """A ``LlavaConfig`` from a llava-hf ``config.json`` (4.x or 5.x form; ``llava`` or ``llava_next``).

    ``name`` (the checkpoint's path or hub id) picks a LLaVA-1.6 checkpoint's chat template by original LLaVA's
    name rules; LLaVA-1.5 checkpoints use the llava-hf template.
    """
    text = json_object(hf, "text_config")
    tie = bool(text.get("tie_word_embeddings", hf.get("tie_word_embeddings", False)))
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"unsupported projector activation {act!r}; llava-hf projectors use 'gelu'")
    vision = vision_config_from_hf(json_object(hf, "vision_config"))
    image_token_id = hf.get("image_token_id", hf.get("image_token_index", 32000))
    text_config = text_config_from_hf(text, tie)
    anyres = anyres_from_hf(hf, preprocessor) if hf.get("model_type") == "llava_next" else None
    return LlavaConfig(
        vision=vision,
        text=text_config,
        image_token_id=int(image_token_id),
        projector_type="mlp2x_gelu",
        projector_bias=bool(hf.get("multimodal_projector_bias", True)),
        vision_feature_layer=hf.get("vision_feature_layer", -2),
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        image=image_config_from_preprocessor(preprocessor, vision.image_size, anyres=anyres is not None),
        chat_template="llava_hf" if anyres is None else default_template_for(name, "original", text_config.model_type),
        source_layout="llava-hf",
        anyres=anyres,
    )


def anyres_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None) -> AnyresConfig:
    """transformers' LLaVA-1.6 rules: pinpoints as (height, width), rounded unpad, no sequence cap."""
    pinpoints = hf.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS
    theirs = (preprocessor or {}).get("image_grid_pinpoints")
    if theirs is not None and [list(p) for p in theirs] != [list(p) for p in pinpoints]:
        raise ConversionError(
            f"config.json's image_grid_pinpoints {pinpoints} differ from preprocessor_config.json's {theirs}; "
            "transformers would tile with one and count features with the other"
        )
    return AnyresConfig(grid_pinpoints=pinpoints, merge="spatial_unpad", unpad_rounding="round")


def template_source_path(directory: Path) -> str:
    """The path whose name picks the chat template (original LLaVA's CLI rule, ``minillava.chat``); a Hugging Face
    cache snapshot (``models--org--name/snapshots/<hash>``) stands for its repository ``org/name``."""
    parts = directory.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return str(directory.resolve())


class HfLlavaSource:
    """A llava-hf directory: ``config.json`` with ``model_type`` ``llava`` or ``llava_next`` and ``text_config``."""

    name = "llava-hf"
    description = (
        "LlavaForConditionalGeneration or LlavaNextForConditionalGeneration as transformers 4.x or 5.x saves it, "
        "e.g. llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf"
    )

    def __init__(self, directory: Path, vision_tower: str | Path | None = None) -> None:
        if vision_tower is not None:
            raise ValueError(
                f"{directory} is a llava-hf checkpoint, which carries its vision tower; drop --vision-tower"
            )
        self.directory = Path(directory)
        self.hf_config = read_json(self.directory / "config.json")
        self.files = weight_files(self.directory)

    @staticmethod
    def matches(directory: Path, config: dict[str, Any]) -> bool:
        return config.get("model_type") in ("llava", "llava_next") and "text_config" in config

    def config(self) -> LlavaConfig:
        pre_path = self.directory / "preprocessor_config.json"
        pre = read_json(pre_path) if pre_path.is_file() else None
        try:
            config = config_from_hf(self.hf_config, pre, template_source_path(self.directory))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.directory / 'config.json'}: {err}") from None
        gen_path = self.directory / "generation_config.json"
        if gen_path.is_file():
            config.generation = read_json(gen_path)
        return config

    def keymap(self, keys: list[str]) -> KeyMap:
        # 5.x saves drop the vision tower's ``vision_model.`` level; the hub's 4.x files keep it.
        if any(k.startswith("vision_tower.vision_model.") for k in keys):
            return HF_V4
        return HF_V5

    def parts(self) -> list[Part]:
        metas = [(path, read_meta(path)) for path in self.files]
        keymap = self.keymap([key for _, meta in metas for key in meta])
        return [Part(path, keymap, meta) for path, meta in metas]
