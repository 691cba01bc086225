"""The decoder-only transformer and its config: `from model import Transformer, ModelConfig`."""

from model.config import ModelConfig
from model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
