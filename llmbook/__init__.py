"""llmbook: the helper package of the course. Each module holds one piece the chapters build."""

from .env import get_device, seed_everything

__version__ = "0.1.0"
__all__ = ["get_device", "seed_everything"]
