"""minillava: a small, exact and fast pure-PyTorch LLaVA.

The public names are imported on first use, so that ``import minillava`` (and ``minillava --help``) does not pay
for torch until something needs it.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "Llava": ".model",
    "LlavaConfig": ".config",
    "LlavaOutput": ".model",
    "Pipeline": ".pipeline",
    "Processor": ".processor",
    "TextConfig": ".config",
    "VisionConfig": ".config",
    "format_chat": ".chat",
    "generate": ".generate",
    "load": ".checkpoint",
    "load_processor": ".processor",
    "save": ".checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``minillava.generate`` is the function, though a submodule has the same name: loading a submodule sets the
    package attribute of its name, which here would replace the function by the module."""

    def __setattr__(self, name: str, value) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
