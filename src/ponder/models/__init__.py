"""ponder's own compact runtime for Llama-family decoders, loaded from Hugging Face checkpoint folders."""

from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .llama import LlamaModel

__all__ = ["ModelConfig", "LlamaModel", "SUPPORTED_MODEL_TYPES"]
