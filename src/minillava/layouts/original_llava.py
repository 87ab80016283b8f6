"""Original LLaVA checkpoints (haotian-liu/LLaVA ``LlavaLlamaForCausalLM`` and, for LLaVA-1.6,
``LlavaMistralForCausalLM``; InternVL's ``internvl_chat_llava``).

``config.json`` is a flat LLaMA (or Mistral) config plus the ``mm_*`` fields; weights are ``pytorch_model-*.bin``
shards (or safetensors) holding ``model.*``, ``lm_head.*`` and ``model.mm_projector.*`` (and ``model.image_newline``
for LLaVA-1.6). The LLaVA-1.5 releases hold no CLIP weights: the tower comes from a separate CLIP directory
(``--vision-tower``), unless the checkpoint was trained with the tower unfrozen and carries it as
``model.vision_tower.vision_tower.vision_model.*`` (every LLaVA-1.6 release does); then those win.
The vocabulary has no ``<image>`` token, so the placeholder id is ``vocab_size``: never embedded (fusion overwrites
placeholder rows) and never generated (the head has ``vocab_size`` columns).
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..anyres import MERGE_TYPES
from ..chat import default_template_for
from ..config import AnyresConfig, LlavaConfig, VisionConfig, projector_depth, read_json
from ..safetensors_io import TensorMeta
from .hf_llava import (
    image_config_from_preprocessor,
    template_source_path,
    text_config_from_hf,
    vision_config_from_hf,
)
from .keymaps import CLIP_V4, CLIP_V5, original_keymap
from .reading import ConversionError, Part, read_meta, weight_files

TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
# transformers' CLIPVisionConfig defaults: what a CLIP config.json that leaves a field out means.
CLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
# OpenAI CLIP ViTs (B/32, B/16, L/14, L/14-336) all use 64-wide attention heads.
CLIP_HEAD_DIM = 64


def clip_vision_fields(clip: dict[str, Any], path: Path) -> dict[str, Any]:
    """The vision part of a CLIP ``config.json``: a full ``CLIPModel`` (``vision_config``) or a ``CLIPVisionModel``."""
    model_type = clip.get("model_type")
    if model_type == "clip":
        # Old hub configs carry ``vision_config_dict`` next to ``vision_config``; transformers lets it win.
        fields = {**(clip.get("vision_config") or {}), **(clip.get("vision_config_dict") or {})}
    elif model_type == "clip_vision_model":
        fields = clip
    else:
        raise ConversionError(
            f"{path}: not a CLIP checkpoint (model_type={model_type!r}); --vision-tower needs a CLIPModel or "
            "CLIPVisionModel directory such as openai/clip-vit-large-patch14-336"
        )
    return {**CLIP_VISION_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}


def vision_from_shapes(meta: dict[str, TensorMeta], where: Path) -> VisionConfig:
    """A tower's config read off its tensors (for checkpoints that carry the tower but no CLIP config).

    Widths, depth, patch and image size follow from the shapes; the head count does not, so OpenAI CLIP's
    64-wide heads, QuickGELU and eps 1e-5 are assumed (pass --vision-tower to take them from a config instead).
    """

    def shape(name: str) -> tuple[int, ...]:
        key = TOWER_PREFIX + name
        if key not in meta:
            raise ConversionError(f"{where}: the vision tower in the weights lacks {key}")
        return meta[key].shape

    hidden, channels, patch, _ = shape("embeddings.patch_embedding.weight")
    positions = shape("embeddings.position_embedding.weight")[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ConversionError(f"{where}: {positions} position embeddings are not 1 + a square number of patches")
    layers = {
        int(m.group(1)) for k in meta if (m := re.match(re.escape(TOWER_PREFIX) + r"encoder\.layers\.(\d+)\.", k))
    }
    if hidden % CLIP_HEAD_DIM:
        raise ConversionError(
            f"{where}: cannot tell the vision tower's head count (width {hidden} is not a multiple of "
            f"{CLIP_HEAD_DIM}); pass --vision-tower DIR with the CLIP config it was trained from"
        )
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=max(layers) + 1 if layers else 0,
        num_heads=hidden // CLIP_HEAD_DIM,
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
    )


class OriginalLlavaSource:
    """An original LLaVA directory (``model_type`` llava or llava_llama, flat LLaMA config with ``mm_*`` fields)."""

    name = "original LLaVA"
    description = (
        "liuhaotian/llava-v1.5-7b/-13b and InternVL internvl_chat_llava: model_type llava or llava_llama with "
        "mm_* fields, pytorch_model*.bin or safetensors, CLIP tower via --vision-tower"
    )

    def __init__(self, directory: Path, vision_tower: str | Path | None = None) -> None:
        self.directory = Path(directory)
        self.raw = read_json(self.directory / "config.json")
        self.clip_dir = Path(vision_tower) if vision_tower is not None else None
        self._check_supported()
        self.projector_type = self.raw.get("mm_projector_type", "linear")  # original LLaVA's default
        try:
            self.depth = projector_depth(self.projector_type)
        except ValueError as err:
            raise ConversionError(f"{self.directory / 'config.json'}: mm_projector_type: {err}") from None
        self.files = weight_files(self.directory)
        self._metas: list[tuple[Path, dict[str, TensorMeta]]] | None = None
        self._clip: tuple[dict[str, Any], list[Path]] | None = None

    @staticmethod
    def matches(directory: Path, config: dict[str, Any]) -> bool:
        return (
            config.get("model_type") in ("llava", "llava_llama", "llava_mistral")
            and "text_config" not in config
            and ("mm_vision_tower" in config or "mm_hidden_size" in config)
        )

    def _check_supported(self) -> None:
        raw, where = self.raw, self.directory / "config.json"
        if raw.get("mm_use_im_start_end"):
            raise ConversionError(
                f"{where}: mm_use_im_start_end is true (images wrapped in <im_start>/<im_end> tokens); minillava "
                "implements LLaVA-1.5's plain <image> placement only"
            )
        aspect = str(raw.get("image_aspect_ratio") or "")
        if aspect.startswith("anyres") and aspect != "anyres":
            raise ConversionError(
                f"{where}: image_aspect_ratio {aspect!r} (a later LLaVA-NeXT variant) is not supported; minillava "
                "implements LLaVA-1.6's 'anyres'"
            )
        merge = raw.get("mm_patch_merge_type", "flat")
        if merge not in MERGE_TYPES:
            raise ConversionError(
                f"{where}: mm_patch_merge_type {merge!r} is not supported ({', '.join(MERGE_TYPES)}; every released "
                "LLaVA-1.6 uses spatial_unpad)"
            )
        if merge != "flat" and aspect != "anyres":
            raise ConversionError(
                f"{where}: mm_patch_merge_type {merge!r} tiles images, but image_aspect_ratio is {aspect!r}, not "
                "'anyres'; original LLaVA would never use the tile merge (or its image_newline) for this checkpoint"
            )
        if raw.get("model_type") == "llava_mistral" and aspect != "anyres":
            raise ConversionError(f"{where}: a llava_mistral checkpoint without image_aspect_ratio 'anyres'")
        for field in ("mm_hidden_size", "mm_vision_select_layer"):
            if field not in raw:
                raise ConversionError(f"{where}: no {field}; is this an original LLaVA config?")
        feature = raw.get("mm_vision_select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            raise ConversionError(f"{where}: mm_vision_select_feature {feature!r} is not supported (patch, cls_patch)")

    def _llava_metas(self) -> list[tuple[Path, dict[str, TensorMeta]]]:
        if self._metas is None:
            self._metas = [(path, read_meta(path)) for path in self.files]
        return self._metas

    def tower_inside(self) -> bool:
        """Whether the LLaVA weights carry the vision tower (a checkpoint trained with the tower unfrozen)."""
        return any(k.startswith(TOWER_PREFIX) for _, meta in self._llava_metas() for k in meta)

    def _clip_source(self) -> tuple[dict[str, Any], list[Path]]:
        """The CLIP directory's vision config fields and weight files."""
        if self._clip is None:
            assert self.clip_dir is not None
            if not self.clip_dir.is_dir():
                raise FileNotFoundError(f"--vision-tower {self.clip_dir}: not a directory")
            config_path = self.clip_dir / "config.json"
            if not config_path.is_file():
                raise FileNotFoundError(f"--vision-tower {self.clip_dir}: no config.json; expected a CLIP checkpoint")
            fields = clip_vision_fields(read_json(config_path), config_path)
            files = [] if self.tower_inside() else weight_files(self.clip_dir)
            self._clip = fields, files
        return self._clip

    def _vision(self) -> VisionConfig:
        if self.clip_dir is not None:
            try:
                vision = vision_config_from_hf(self._clip_source()[0])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{self.clip_dir / 'config.json'}: {err}") from None
            origin = f"--vision-tower {self.clip_dir}"
        elif self.tower_inside():
            merged = {k: v for _, meta in self._llava_metas() for k, v in meta.items()}
            vision, origin = vision_from_shapes(merged, self.directory), f"the vision tower in {self.directory}"
        else:
            raise ConversionError(
                f"{self.directory}: the checkpoint holds no vision tower weights; pass --vision-tower DIR "
                "(vision_tower= in minillava.load), a CLIP checkpoint directory (this one was trained with "
                f"{self.raw.get('mm_vision_tower')!r})"
            )
        mm_hidden = int(self.raw["mm_hidden_size"])
        if vision.hidden_size != mm_hidden:
            raise ConversionError(
                f"{origin}: CLIP width {vision.hidden_size} does not match mm_hidden_size {mm_hidden} of "
                f"{self.directory / 'config.json'}; use the CLIP checkpoint the model was trained with "
                f"({self.raw.get('mm_vision_tower')!r})"
            )
        return vision

    def anyres(self) -> AnyresConfig | None:
        """Original LLaVA's LLaVA-1.6 rules: its ``(width, height)`` pinpoints swapped pair by pair (the order kept,
        as it breaks ties), truncating unpad, and the cut at ``tokenizer_model_max_length``."""
        raw, where = self.raw, self.directory / "config.json"
        if raw.get("image_aspect_ratio") != "anyres":
            return None
        pinpoints = raw.get("image_grid_pinpoints")
        if isinstance(pinpoints, str):
            try:
                pinpoints = ast.literal_eval(pinpoints)  # how the original reads a string; literals only
            except (ValueError, SyntaxError):
                raise ConversionError(f"{where}: image_grid_pinpoints {pinpoints!r} is not a list literal") from None
        try:
            swapped = [[int(w_h[1]), int(w_h[0])] for w_h in pinpoints]
            return AnyresConfig(
                grid_pinpoints=swapped,
                merge=raw.get("mm_patch_merge_type", "flat"),
                unpad_rounding="truncate",
                max_sequence_length=raw.get("tokenizer_model_max_length"),
            )
        except (TypeError, ValueError, IndexError) as err:
            raise ConversionError(f"{where}: image_grid_pinpoints {pinpoints!r}: {err}") from None

    def config(self) -> LlavaConfig:
        vision = self._vision()
        try:
            config = self._config(vision)
        except (TypeError, ValueError) as err:
            if isinstance(err, ConversionError):
                raise
            raise ValueError(f"{self.directory / 'config.json'}: {err}") from None
        gen_path = self.directory / "generation_config.json"
        if gen_path.is_file():
            config.generation = read_json(gen_path)
        return config

    def _config(self, vision: VisionConfig) -> LlavaConfig:
        raw = self.raw
        text_type = "mistral" if raw.get("model_type") == "llava_mistral" else "llama"
        text = text_config_from_hf({**raw, "model_type": text_type}, bool(raw.get("tie_word_embeddings", False)))
        anyres = self.anyres()
        pre = None
        for directory in (self.directory, self.clip_dir):
            if directory is not None and (directory / "preprocessor_config.json").is_file():
                pre = read_json(directory / "preprocessor_config.json")
                break
        return LlavaConfig(
            vision=vision,
            text=text,
            image_token_id=text.vocab_size,
            projector_type=self.projector_type,
            projector_bias=True,
            vision_feature_layer=int(raw["mm_vision_select_layer"]),
            vision_feature_select_strategy="full" if raw.get("mm_vision_select_feature") == "cls_patch" else "default",
            image=image_config_from_preprocessor(
                pre, vision.image_size, pad=raw.get("image_aspect_ratio") == "pad", anyres=anyres is not None
            ),
            chat_template=default_template_for(template_source_path(self.directory), "original", text_type),
            source_layout="original",
            anyres=anyres,
        )

    def parts(self) -> list[Part]:
        keymap = original_keymap(self.projector_type, self.depth)
        parts = [Part(path, keymap, meta) for path, meta in self._llava_metas()]
        if self.tower_inside():
            return parts
        if self.clip_dir is None:
            self._vision()  # raises the "no vision tower" error
        clip_metas = [(path, read_meta(path)) for path in self._clip_source()[1]]
        clip_map = CLIP_V4 if any(k.startswith("vision_model.") for _, m in clip_metas for k in m) else CLIP_V5
        # Original LLaVA casts the separately loaded tower to the model's dtype (fp16 for the releases, whose CLIP
        # checkpoint is fp32); doing the same keeps one dtype per model and the original's numerics.
        dtype = self.weights_dtype()
        return parts + [Part(path, clip_map, meta, dtype) for path, meta in clip_metas]

    def weights_dtype(self) -> torch.dtype | None:
        """The dtype of the LLaVA weights (of its embedding), which the CLIP tower takes."""
        for _, meta in self._llava_metas():
            if "model.embed_tokens.weight" in meta:
                return meta["model.embed_tokens.weight"].dtype
        return None
