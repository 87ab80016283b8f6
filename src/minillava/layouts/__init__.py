"""Every checkpoint layout minillava reads (``minillava.load`` and ``python -m weights_convert`` use them).

- ``minillava``: the converted layout (:mod:`minillava.checkpoint` writes it);
- ``llava-hf``: ``LlavaForConditionalGeneration`` as transformers 4.x and 5.x save it (:mod:`.hf_llava`);
- original LLaVA: haotian-liu/LLaVA's ``LlavaLlamaForCausalLM`` and InternVL's copy, with the CLIP tower from a
  separate directory (:mod:`.original_llava`).

One declarative key table per layout (:mod:`.keymaps`) names every tensor; :mod:`.source` detects the layout and
checks the whole mapping before any data is read. ``python -m weights_convert`` writes the same tensors to disk.
"""

from __future__ import annotations

from .reading import ConversionError
from .source import detect, load_source

__all__ = ["ConversionError", "detect", "load_source"]
