"""minillava: a small, exact and fast pure-PyTorch LLaVA."""

from .chat import format_chat
from .checkpoint import load, save
from .config import LlavaConfig, TextConfig, VisionConfig
from .model import Llava, LlavaOutput
from .processor import Processor, load_processor

__all__ = [
    "Llava",
    "LlavaConfig",
    "LlavaOutput",
    "Processor",
    "TextConfig",
    "VisionConfig",
    "format_chat",
    "load",
    "load_processor",
    "save",
]
