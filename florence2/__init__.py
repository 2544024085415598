"""Florence-2 in plain PyTorch: Microsoft's checkpoints, every task, and correct, fast fine-tuning."""

from .config import ConfigError, Florence2Config, TextConfig, VisionConfig
from .kernels import KernelError
from .model import Florence2, Florence2Output
from .processor import Florence2Processor
from .weights import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "Florence2", "Florence2Config", "Florence2Output", "Florence2Processor",
           "KernelError", "TextConfig", "VisionConfig"]
