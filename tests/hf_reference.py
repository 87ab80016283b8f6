"""Tiny random transformers LLaVA models as references, saved and converted the production way.

transformers is a test-only dependency. Random HF init gives near-uniform logits that hide bugs, so
:func:`spread_weights` re-draws every tensor with a larger spread before anything is compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN_ID = 90  # inside the vocabulary: transformers embeds the placeholder ids before overwriting them
VOCAB = 96


def hf_config(
    *,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    rope: dict[str, Any] | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    vision_feature_layer: int | list[int] = -2,
    strategy: str = "default",
    projector_bias: bool = True,
    rms_norm_eps: float = 1e-5,
):
    """A transformers ``LlavaConfig`` for a tiny model: CLIP 3x32 at 28 px (16 patches), LLaMA 2x64."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim if head_dim is not None else 16,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        rms_norm_eps=rms_norm_eps,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", **(rope or {})},
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
        projection_dim=16,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=projector_bias,
        tie_word_embeddings=tie_word_embeddings,
    )


@torch.no_grad()
def spread_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter so activations and logits are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif p.dim() == 1:
            p.copy_(0.2 * noise)
        elif "embed" in name or p.dim() == 3:
            p.copy_(noise)
        else:
            fan_in = p[0].numel()
            p.copy_(noise * (2.0 / fan_in**0.5))


def make_hf_model(seed: int = 0, **options):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(**options)).eval()
    spread_weights(model, seed)
    return model


def save_hf(
    model, directory: Path, *, layout: str = "v5", max_shard_size: str | None = None, config_form: str = "v5"
) -> Path:
    """Save a transformers model as a llava-hf directory.

    ``layout="v4"`` renames the vision keys to the hub's ``vision_tower.vision_model.*`` form (what
    transformers 4.x wrote); ``config_form="v4"`` moves rope settings to the top of ``text_config``.
    """
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if layout == "v4":
        for path in directory.glob("*.safetensors"):
            tensors = load_file(path)
            renamed = {
                k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
                for k, v in tensors.items()
            }
            save_file(renamed, path, metadata={"format": "pt"})
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {
                k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
                for k, v in data["weight_map"].items()
            }
            index.write_text(json.dumps(data))
    if config_form == "v4":
        path = directory / "config.json"
        config = json.loads(path.read_text())
        text = config["text_config"]
        params = text.pop("rope_parameters")
        text["rope_theta"] = params.pop("rope_theta")
        text["rope_scaling"] = params if params.get("rope_type") != "default" else None
        path.write_text(json.dumps(config))
    return directory


def convert_hf(model, tmp_path: Path, **save_options):
    """Save ``model`` as llava-hf, convert it with the production converter, load it with minillava."""
    import minillava
    from weights_convert.__main__ import main as convert_main

    src = save_hf(model, tmp_path / "hf", **save_options)
    dst = tmp_path / "converted"
    assert convert_main([str(src), str(dst)]) == 0
    return minillava.load(dst), dst


def batch_inputs(k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of equal length: row 0 holds one image mid-text, row 1 two images (start and end)."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN_ID, (2, 12), generator=gen)
    img = torch.full((k,), IMAGE_TOKEN_ID)
    row0 = torch.cat(
        [text[0, :4], img, text[0, 4:8], torch.randint(3, IMAGE_TOKEN_ID, (k,), generator=gen), text[0, 8:]]
    )
    row1 = torch.cat([img, text[1, :12], img])
    pixels = torch.randn(3, 3, 28, 28, generator=gen)
    return {"input_ids": torch.stack([row0, row1]), "pixel_values": pixels}
