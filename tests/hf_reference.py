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

from tests.sp_fixtures import write_tokenizer_dir

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


# --- original LLaVA layout (liuhaotian/llava-v1.5-*) built from a transformers model ------------------------------

SENTINEL = -200  # original LLaVA's IMAGE_TOKEN_INDEX in input_ids, expanded by the tokenizer side
ORIGINAL_PLACEHOLDER = VOCAB  # minillava's placeholder for original checkpoints: the first id past the vocabulary


@torch.no_grad()
def round_to_fp16(model: torch.nn.Module) -> None:
    """Round every parameter to fp16 precision (kept in fp32), so an fp16 checkpoint holds exactly these values."""
    for p in model.parameters():
        p.copy_(p.half().float())


def make_original_model(seed: int = 0, projector: str = "mlp2x_gelu", vision: dict[str, Any] | None = None, **options):
    """A transformers LLaVA whose weights are exactly representable in fp16; ``projector="linear"`` swaps the
    projector for one ``nn.Linear`` (original LLaVA's ``linear`` type, which llava-hf lacks; transformers just
    calls the module). ``vision`` overrides CLIP config fields."""
    from transformers import LlavaForConditionalGeneration

    config = hf_config(**options)
    for key, value in (vision or {}).items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if projector == "linear":
        model.model.multi_modal_projector = torch.nn.Linear(config.vision_config.hidden_size, 64)
    spread_weights(model, seed)
    round_to_fp16(model)
    return model


def original_state(model, tower_inside: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(llava_tensors, clip_vision_tensors)`` in original names: ``model.*``/``lm_head.*``/``model.mm_projector.*``
    (+ stale ``rotary_emb.inv_freq``) and CLIP's ``vision_model.*`` (inside the LLaVA ones if ``tower_inside``)."""
    llava, clip = {}, {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key.startswith("model.language_model."):
            llava["model." + key[len("model.language_model.") :]] = value
        elif key in ("lm_head.weight", "model.image_newline"):  # the newline: LLaVA-1.6 (LlavaNext) models
            llava[key] = value
        elif key.startswith("model.multi_modal_projector."):
            rest = key[len("model.multi_modal_projector.") :]
            rest = rest.replace("linear_1.", "0.").replace("linear_2.", "2.")
            llava["model.mm_projector." + rest] = value
        elif key.startswith("model.vision_tower."):
            name = "vision_model." + key[len("model.vision_tower.") :]
            if tower_inside:
                llava["model.vision_tower.vision_tower." + name] = value
            else:
                clip[name] = value
        else:
            raise KeyError(key)
    text = model.config.text_config
    for i in range(text.num_hidden_layers):
        llava[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(text.head_dim // 2)
    return llava, clip


def original_config(model, projector: str = "mlp2x_gelu", **overrides) -> dict[str, Any]:
    """An original ``config.json``: flat LLaMA fields plus the ``mm_*`` ones (v1.5 values)."""
    text, vision = model.config.text_config, model.config.vision_config
    strategy = model.config.vision_feature_select_strategy
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": text.rms_norm_eps,
        "max_position_embeddings": text.max_position_embeddings,
        "rope_theta": text.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float16",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": projector,
        "mm_vision_select_layer": model.config.vision_feature_layer,
        "mm_vision_select_feature": "cls_patch" if strategy == "full" else "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "use_mm_proj": True,
    }
    config.update(overrides)
    return config


def write_bin_shards(tensors: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> None:
    """``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``, as the released checkpoints."""
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        chunk = {k: tensors[k] for k in names[i * per : (i + 1) * per]}
        torch.save(chunk, directory / file)
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def save_original(
    model,
    directory: Path,
    *,
    projector: str = "mlp2x_gelu",
    tower_inside: bool = False,
    fmt: str = "bin",
    shards: int = 2,
    **config_overrides,
) -> Path:
    """An original-layout LLaVA directory (fp16 weights, config, tokenizer-ish files); returns it.

    ``fmt="bin"`` writes pickle shards with an index; ``fmt="safetensors"`` one ``model.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    llava, _ = original_state(model, tower_inside)
    llava = {k: v if k.endswith("inv_freq") else v.half() for k, v in llava.items()}
    if fmt == "bin":
        write_bin_shards(llava, directory, shards)
    else:
        save_file(llava, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(original_config(model, projector, **config_overrides)))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    # The converter reads the tokenizer before it writes: a real one, as the releases ship (no <image>, no pad).
    write_tokenizer_dir(directory, added_tokens=(), pad_token=None, legacy=False)
    return directory


def save_clip_dir(model, directory: Path, *, fmt: str = "bin", full: bool = True, seed: int = 0) -> Path:
    """A CLIP checkpoint directory holding ``model``'s vision tower in fp32, as openai/clip-vit-large-patch14-336.

    ``full=True``: a ``CLIPModel`` (``vision_model.*`` plus a text tower, projections and ``logit_scale``, which
    LLaVA never uses), ``fmt`` ``bin`` or ``safetensors``. ``full=False``: a transformers 5.x ``CLIPVisionModel``
    save (keys without ``vision_model.``)."""
    directory.mkdir(parents=True, exist_ok=True)
    _, clip = original_state(model)
    vision = model.config.vision_config.to_dict()
    if full:
        gen = torch.Generator().manual_seed(seed)
        clip["text_model.embeddings.token_embedding.weight"] = torch.randn(50, 16, generator=gen)
        clip["text_model.final_layer_norm.weight"] = torch.ones(16)
        clip["text_model.embeddings.position_ids"] = torch.arange(8)[None]
        clip["visual_projection.weight"] = torch.randn(16, vision["hidden_size"], generator=gen)
        clip["text_projection.weight"] = torch.randn(16, 16, generator=gen)
        clip["logit_scale"] = torch.tensor(2.6592)
        config = {
            "model_type": "clip",
            "projection_dim": 16,
            "text_config": {"hidden_size": 16},
            "vision_config": vision,
        }
    else:
        clip = {k[len("vision_model.") :]: v for k, v in clip.items()}
        config = {**vision, "model_type": "clip_vision_model"}
    if fmt == "bin":
        torch.save(clip, directory / "pytorch_model.bin")
    else:
        save_file(clip, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    size = vision["image_size"]
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


def expand_sentinels(ids: torch.Tensor, k: int, placeholder: int) -> torch.Tensor:
    """Original LLaVA prompt ids (one ``-200`` per image) -> ids with ``k`` placeholders per image; rows must
    hold the same number of images so they stay equally long."""
    rows = []
    for row in ids.tolist():
        out = []
        for token in row:
            out.extend([placeholder] * k if token == SENTINEL else [token])
        rows.append(out)
    return torch.tensor(rows)


def sentinel_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows with ``-200`` sentinels: row 0 one image mid-text and one at the end, row 1 two images at the start."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN_ID, (2, 14), generator=gen)
    s = torch.tensor([SENTINEL])
    row0 = torch.cat([text[0, :5], s, text[0, 5:], s])
    row1 = torch.cat([s, s, text[1]])
    return {"input_ids": torch.stack([row0, row1]), "pixel_values": torch.randn(4, 3, 28, 28, generator=gen)}
