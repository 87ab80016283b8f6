"""minillava: a small, exact and fast pure-PyTorch LLaVA."""

from .chat import format_chat
from .checkpoint import load, save
from .config import LlavaConfig, TextConfig, VisionConfig
from .generate import generate
from .model import Llava, LlavaOutput
from .pipeline import Pipeline
from .processor import Processor, load_processor

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
