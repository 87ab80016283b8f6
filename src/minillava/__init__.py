"""minillava: a small, exact and fast pure-PyTorch LLaVA.

The names below are imported on first use, so that ``import minillava.cli`` (the command line) starts without
torch and can answer Ctrl-C while torch loads.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Llava": "model",
    "LlavaConfig": "config",
    "LlavaOutput": "model",
    "Pipeline": "pipeline",
    "Processor": "processor",
    "TextConfig": "config",
    "VisionConfig": "config",
    "format_chat": "chat",
    "generate": "generate",
    "load": "checkpoint",
    "load_processor": "processor",
    "save": "checkpoint",
}

__all__ = [
    "Llava",
    "LlavaConfig",
    "LlavaOutput",
    "Pipeline",
    "Processor",
    "TextConfig",
    "VisionConfig",
    "format_chat",
    "generate",
    "load",
    "load_processor",
    "save",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        try:  # a submodule (minillava.checkpoint, ...), as if the package had imported it
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'minillava' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .chat import format_chat
    from .checkpoint import load, save
    from .config import LlavaConfig, TextConfig, VisionConfig
    from .generate import generate
    from .model import Llava, LlavaOutput
    from .pipeline import Pipeline
    from .processor import Processor, load_processor


class _Package(types.ModuleType):
    """``minillava.generate`` is the function, though a submodule has the same name: loading a submodule sets the
    package attribute of its name, which here would replace the function by the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
