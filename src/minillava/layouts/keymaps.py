"""One declarative table per checkpoint layout: our key prefix <-> their key prefix.

minillava's module names mirror the checkpoint names below a prefix, so a layout is a short list of
prefix pairs plus the stale buffers it may carry. The same tables drive the converter, the exporter,
direct loading and the parity tests. A key that no rule maps is an error, never a warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class UnmappedKeyError(KeyError):
    pass


@dataclass(frozen=True)
class KeyMap:
    """``rules``: ``(our_prefix, their_prefix)`` pairs, the first match wins in either direction.
    ``dropped``: regular expressions for their keys that hold nothing we need (stale buffers)."""

    name: str
    rules: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...] = ()

    def is_dropped(self, key: str) -> bool:
        return any(re.search(pattern, key) for pattern in self.dropped)

    def to_ours(self, key: str) -> str | None:
        """Our name for their ``key``; ``None`` for a dropped buffer; ``UnmappedKeyError`` otherwise."""
        if self.is_dropped(key):
            return None
        for ours, theirs in self.rules:
            if key.startswith(theirs):
                return ours + key[len(theirs) :]
        raise UnmappedKeyError(key)

    def to_theirs(self, key: str) -> str:
        for ours, theirs in self.rules:
            if key.startswith(ours):
                return theirs + key[len(ours) :]
        raise UnmappedKeyError(key)


STALE_BUFFERS = (r"rotary_emb\.inv_freq$", r"embeddings\.position_ids$")

LLM_HF = (("llm.lm_head.", "language_model.lm_head."), ("llm.", "language_model.model."))
PROJECTOR_HF = (
    ("projector.layers.0.", "multi_modal_projector.linear_1."),
    ("projector.layers.1.", "multi_modal_projector.linear_2."),
    ("image_newline", "image_newline"),  # LLaVA-1.6 only
)

# llava-hf as saved by transformers 4.x (the hub checkpoints).
HF_V4 = KeyMap(
    "llava-hf (transformers 4.x)", (*LLM_HF, *PROJECTOR_HF, ("vision.", "vision_tower.vision_model.")), STALE_BUFFERS
)
# llava-hf as saved by transformers 5.x: the vision tower lost its ``vision_model.`` level.
HF_V5 = KeyMap("llava-hf (transformers 5.x)", (*LLM_HF, *PROJECTOR_HF, ("vision.", "vision_tower.")), STALE_BUFFERS)

# Original LLaVA (haotian-liu/LLaVA ``LlavaLlamaForCausalLM``, and InternVL's ``internvl_chat_llava`` copy). The
# decoder sits at the top level (``model.*``, ``lm_head``); the projector and an unfrozen tower live under ``model.``
# too, so their rules come before the decoder's catch-all ``model.``. The ``nn.Sequential`` projector numbers its
# Linears 0, 2, 4, ... (the GELUs in between hold no tensors).
ORIGINAL_TOWER = (
    ("vision.", "model.vision_tower.vision_tower.vision_model."),
    ("image_newline", "model.image_newline"),  # LLaVA-1.6 only
)
ORIGINAL_LLM = (("llm.lm_head.", "lm_head."), ("llm.", "model."))


def original_projector_rules(depth: int) -> tuple[tuple[str, str], ...]:
    """Projector rules for ``linear`` (depth 1, a bare Linear), ``mlpNx_gelu`` (depth N) or ``identity`` (0)."""
    if depth == 1:
        return (("projector.layers.0.", "model.mm_projector."),)
    return tuple((f"projector.layers.{i}.", f"model.mm_projector.{2 * i}.") for i in range(depth))


def original_keymap(projector_type: str, depth: int) -> KeyMap:
    """The original layout for a projector of ``depth`` Linears (the tower rule only matters when it is inside)."""
    return KeyMap(
        f"original LLaVA ({projector_type})",
        (*original_projector_rules(depth), *ORIGINAL_TOWER, *ORIGINAL_LLM),
        STALE_BUFFERS,
    )


# What LLaVA takes from a separate CLIP checkpoint: the vision tower only.
CLIP_UNUSED = (r"^text_model\.", r"^visual_projection\.", r"^text_projection\.", r"^logit_scale$")
# A full ``CLIPModel`` or a transformers 4.x ``CLIPVisionModel`` (openai/clip-vit-large-patch14-336 on the hub).
CLIP_V4 = KeyMap("CLIP (vision_model.*)", (("vision.", "vision_model."),), (*STALE_BUFFERS, *CLIP_UNUSED))
# A ``CLIPVisionModel`` saved by transformers 5.x: no ``vision_model.`` level.
CLIP_V5 = KeyMap("CLIP (transformers 5.x CLIPVisionModel)", (("vision.", ""),), STALE_BUFFERS)

# minillava itself (re-casting or re-sharding a converted checkpoint): names are already ours.
MINILLAVA = KeyMap("minillava", (("", ""),))
