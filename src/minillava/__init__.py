"""minillava: a small, exact and fast pure-PyTorch LLaVA."""

from .checkpoint import load, save
from .config import LlavaConfig, TextConfig, VisionConfig
from .model import Llava, LlavaOutput

__all__ = ["Llava", "LlavaConfig", "LlavaOutput", "TextConfig", "VisionConfig", "load", "save"]
