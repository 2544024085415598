"""Florence-2 in plain PyTorch: Microsoft's checkpoints, every task, and correct, fast fine-tuning."""

from .config import ConfigError, Florence2Config, TextConfig, VisionConfig
from .model import Florence2, Florence2Output
from .weights import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "Florence2", "Florence2Config", "Florence2Output", "TextConfig",
           "VisionConfig"]
