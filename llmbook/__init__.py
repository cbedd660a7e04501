"""llmbook: the helper package of the course. Each module holds one piece the chapters build."""

from .env import get_device, seed_everything
from .model import GPT, GPTConfig
from .pretrained import load_pretrained

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "get_device", "load_pretrained", "seed_everything"]
