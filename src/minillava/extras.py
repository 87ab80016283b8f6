"""Optional dependencies: imported where a feature needs them, with the command that installs them in the error."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message names the pip command."""


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or raise :class:`MissingDependency` saying that ``purpose`` needs ``minillava[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(
            f"{purpose} needs the {module} package: pip install 'minillava[{extra}]' (or pip install {module})"
        ) from None
