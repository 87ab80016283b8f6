"""Configuration dataclasses and the minillava ``config.json``.

A converted checkpoint directory holds one ``config.json`` written by :meth:`LlavaConfig.save`.
It records the three parts' shapes, how they are wired (feature layer, projector, placeholder id),
and what inference needs besides weights: image preprocessing, chat template and generation
defaults. Nothing here falls back to a library default for numerics that matter (``rms_norm_eps``
must be given). Every field's type and range is checked when a config is built, whichever layout it is read
from, so a bad ``config.json`` is refused naming the field instead of failing later inside the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "minillava"
FORMAT_VERSION = 1

PROJECTOR_TYPES = ("linear", "identity", "mlpNx_gelu")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
"""The dtypes weights can be cast to, by the names the command lines take."""

# The small checkpoint shipped in the package (trained on the synthetic shapes set): the default model of
# ``minillava generate|chat`` and ``Pipeline()``.
BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "shapes"

# CLIP's normalisation constants (OpenAI), the llava-1.5 defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """CLIP ViT tower shape."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size"):
            _integer("vision.", name, getattr(self, name))
        _integer("vision.", "num_channels", self.num_channels)
        self.layer_norm_eps = _positive("vision.", "layer_norm_eps", self.layer_norm_eps)
        _text("vision.", "hidden_act", self.hidden_act)
        if self.image_size < self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is smaller than its patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """LLaMA decoder shape. ``rms_norm_eps`` has no default on purpose (LLaVA uses 1e-5, LLaMA 1e-6).

    ``model_type`` records what the source called it: Mistral without a sliding window is LLaMA's math, so it
    only decides the name an export writes.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rms_norm_eps: float
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            _integer("text.", name, getattr(self, name))
        for name in ("num_kv_heads", "head_dim"):
            if getattr(self, name) is not None:
                _integer("text.", name, getattr(self, name))
        _integer("text.", "max_position_embeddings", self.max_position_embeddings)
        self.rms_norm_eps = _positive("text.", "rms_norm_eps", self.rms_norm_eps)
        self.rope_theta = _positive("text.", "rope_theta", self.rope_theta)
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            _flag("text.", name, getattr(self, name))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(_is_int(i) for i in ids):
                raise ValueError(f"text.{name} must be a token id (an integer) or null, got {value!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"text.rope_scaling must be a JSON object or null, got {self.rope_scaling!r}")
        _text("text.", "hidden_act", self.hidden_act)
        if self.model_type not in ("llama", "mistral"):
            raise ValueError(f"text model_type must be 'llama' or 'mistral', got {self.model_type!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
            if rope_type == "default":
                self.rope_scaling = None
            else:
                self.rope_scaling = {**self.rope_scaling, "rope_type": rope_type}
                self.rope_scaling.pop("type", None)
                self.rope_scaling.pop("rope_theta", None)
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported decoder activation {self.hidden_act!r}; only 'silu' is implemented")


IMAGE_MODES = ("crop", "pad", "anyres")


@dataclass
class AnyresConfig:
    """LLaVA-1.6 ("anyres") settings: the canvases images are tiled into and how tile features are merged.

    The two references disagree on two rules and a limit (``docs/llava-next.md``); a converted checkpoint records
    the ones of the code it came from:

    Attributes:
        grid_pinpoints: the canvases, ``(height, width)`` in pixels, multiples of the tile size, in the order they
            are tried: the first of equally good canvases wins, so the order is the tie-break. Original LLaVA lists
            ``(width, height)`` pairs; the converter swaps each pair and keeps the order.
        merge: ``spatial_unpad`` (base tile, then the unpadded tile map with a newline row end; every released
            LLaVA-1.6) or ``flat`` (every tile's rows in a row).
        unpad_rounding: ``round`` (transformers: ``int(round(x, 7))``) or ``truncate`` (original LLaVA:
            ``int(x)``), how the image's extent on the feature map is counted.
        max_sequence_length: original LLaVA cuts the sequence with its image rows spliced in to this length
            (``tokenizer_model_max_length``) and silently drops the rest; minillava refuses such prompts instead.
            ``None`` (transformers): no limit but the context window.
    """

    grid_pinpoints: tuple[tuple[int, int], ...]
    merge: str = "spatial_unpad"
    unpad_rounding: str = "round"
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        # Imported here: anyres imports torch, and the command line reads configs before it loads torch.
        from .anyres import MERGE_TYPES, UNPAD_ROUNDINGS, check_pinpoints

        self.grid_pinpoints = check_pinpoints(self.grid_pinpoints, 1)
        if self.merge not in MERGE_TYPES:
            raise ValueError(f"anyres merge must be one of {', '.join(MERGE_TYPES)}, got {self.merge!r}")
        if self.unpad_rounding not in UNPAD_ROUNDINGS:
            raise ValueError(
                f"anyres unpad_rounding must be one of {', '.join(UNPAD_ROUNDINGS)}, got {self.unpad_rounding!r}"
            )
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"anyres max_sequence_length must be positive or null, got {self.max_sequence_length}")

    @property
    def newline(self) -> bool:
        """Whether the model has an ``image_newline`` vector."""
        return self.merge == "spatial_unpad"


@dataclass
class ImageConfig:
    """How images become ``pixel_values``: ``crop`` (llava-hf, CLIP default), ``pad`` (original LLaVA-1.5) or
    ``anyres`` (LLaVA-1.6 tiles; needs the model's :class:`AnyresConfig`)."""

    mode: str = "crop"
    shortest_edge: int = 336
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {self.mode!r}")
        _integer("image.", "shortest_edge", self.shortest_edge)
        _integer("image.", "crop_size", self.crop_size)
        _integer("image.", "resample", self.resample, minimum=0)
        self.rescale_factor = _positive("image.", "rescale_factor", self.rescale_factor)
        self.mean = _three_numbers("image.mean", self.mean, positive=False)
        self.std = _three_numbers("image.std", self.std, positive=True)


@dataclass
class LlavaConfig:
    """The whole model: vision tower, projector, decoder, and how they are joined."""

    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    image: ImageConfig = field(default_factory=ImageConfig)
    chat_template: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    source_layout: str | None = None
    anyres: AnyresConfig | None = None
    quantization: dict[str, Any] | None = None  # {"scheme": "int8"} or {"scheme": "int4", "group": 32}

    def __post_init__(self) -> None:
        self.vision = _section("vision", VisionConfig, self.vision)
        self.text = _section("text", TextConfig, self.text)
        self.image = _section("image", ImageConfig, self.image)
        if self.anyres is not None:
            self.anyres = _section("anyres", AnyresConfig, self.anyres)
        _integer("", "image_token_id", self.image_token_id, minimum=0)
        _flag("", "projector_bias", self.projector_bias)
        _text("", "projector_type", self.projector_type)
        for name in ("chat_template", "source_layout"):
            if getattr(self, name) is not None:
                _text("", name, getattr(self, name))
        if not isinstance(self.generation, dict):
            raise ValueError(f"generation must be a JSON object, got {type(self.generation).__name__}")
        layers = self.vision_feature_layer
        if not all(_is_int(i) for i in (layers if isinstance(layers, (list, tuple)) else [layers])):
            raise ValueError(f"vision_feature_layer must be an integer or a list of integers, got {layers!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        if isinstance(self.vision_feature_layer, (list, tuple)):
            self.vision_feature_layer = list(self.vision_feature_layer)
            if not self.vision_feature_layer:
                raise ValueError("vision_feature_layer must not be an empty list")
        for layer in self.feature_layers:
            if not -(self.vision.num_layers + 1) <= layer <= self.vision.num_layers:
                raise ValueError(
                    f"vision_feature_layer {layer} is out of range for a tower of "
                    f"{self.vision.num_layers} layers ({self.vision.num_layers + 1} hidden states)"
                )
        projector_depth(self.projector_type)  # validates the name
        self._check_anyres()

    def _check_anyres(self) -> None:
        if self.anyres is None:
            if self.image.mode == "anyres":
                raise ValueError("image mode 'anyres' needs the anyres settings (grid_pinpoints) of a LLaVA-1.6 model")
            return
        from .anyres import check_pinpoints

        tile = self.vision.image_size
        check_pinpoints(self.anyres.grid_pinpoints, tile, "anyres grid_pinpoints")
        if self.image.mode == "anyres" and self.image.crop_size != tile:
            raise ValueError(
                f"anyres tiles are {self.image.crop_size} px (image crop_size) but the vision tower takes {tile} px"
            )
        if self.anyres.merge == "spatial_unpad" and self.vision_feature_select_strategy != "default":
            raise ValueError(
                "the spatial_unpad merge lays each tile's patch rows out as a square map, so the class-token row "
                "must be dropped (vision_feature_select_strategy 'default')"
            )

    @property
    def feature_layers(self) -> list[int]:
        """The selected hidden-state indices, as a list."""
        layer = self.vision_feature_layer
        return list(layer) if isinstance(layer, list) else [layer]

    @property
    def num_image_tokens(self) -> int:
        """``K``: the rows the projector emits per image, i.e. placeholders per image in ``input_ids``. For an
        anyres image, per tile: :meth:`anyres_token_count` gives the image's whole count."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def anyres_token_count(self, height: int, width: int) -> int:
        """The rows an anyres-tiled image of ``height`` x ``width`` pixels becomes (LLaVA-1.6 models only)."""
        if self.anyres is None:
            raise ValueError("not a LLaVA-1.6 (anyres) model: it has no grid_pinpoints")
        from .anyres import num_features

        return num_features(
            height,
            width,
            pinpoints=self.anyres.grid_pinpoints,
            tile=self.vision.image_size,
            side=self.vision.image_size // self.vision.patch_size,
            rows_per_tile=self.num_image_tokens,
            merge=self.anyres.merge,
            rounding=self.anyres.unpad_rounding,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlavaConfig:
        data = dict(data)
        if data.pop("format", FORMAT_NAME) != FORMAT_NAME:
            raise ValueError("not a minillava config (its 'format' field is not 'minillava')")
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"config format version {version} is newer than this minillava ({FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LlavaConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; is {directory} a converted minillava checkpoint?")
        data = read_json(path)
        if data.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{path}: not a minillava config; convert the checkpoint first: python -m weights_convert SRC DST"
            )
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(prefix: str, name: str, value: Any, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{prefix}{name} must be an integer >= {minimum}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(prefix: str, name: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{prefix}{name} must be a number > 0, got {value!r}")
    return float(value)


def _flag(prefix: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{prefix}{name} must be true or false, got {value!r}")


def _text(prefix: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{prefix}{name} must be a string, got {value!r}")


def _three_numbers(name: str, value: Any, positive: bool) -> tuple[float, float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(x) for x in value)
    if not ok or (positive and min(value) <= 0):
        raise ValueError(f"{name} must be 3 numbers{' > 0' if positive else ''} (one per channel), got {value!r}")
    return tuple(float(x) for x in value)


def _section(name: str, cls: type, value: Any) -> Any:
    """A nested config: given as its dataclass, or as the JSON object of its fields."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING}
    if set(value) - fields or required - set(value):
        unknown, missing = sorted(set(value) - fields), sorted(required - set(value))
        found = [f"unknown fields {unknown}"] * bool(unknown) + [f"missing fields {missing}"] * bool(missing)
        raise ValueError(f"{name}: {'; '.join(found)}")
    return cls(**value)


def read_json(path: str | os.PathLike, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in ``path`` (``{}`` for a missing file if ``missing_ok``); a ``ValueError`` names the file."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def projector_depth(projector_type: str) -> int:
    """Number of Linear layers of a projector type; 0 for ``identity``."""
    if projector_type == "identity":
        return 0
    if projector_type == "linear":
        return 1
    if projector_type.startswith("mlp") and projector_type.endswith("x_gelu"):
        depth = projector_type[3:-6]
        if depth.isdigit() and int(depth) >= 1:
            return int(depth)
    raise ValueError(f"unknown projector type {projector_type!r}; supported: linear, identity, mlpNx_gelu (N >= 1)")
