"""The model's typed config: every shape the transformer needs, nothing about training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    n_layers: int = 4
    """Number of transformer blocks."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention (query) heads; d_model must be divisible by it."""
    n_kv_heads: int = 2
    """Key/value heads for grouped-query attention; must divide n_heads (n_heads = full multi-head)."""
    ffn_hidden: Optional[int] = None
    """SwiGLU hidden width; null means the Llama rule: 8/3 * d_model rounded up to ffn_multiple_of."""
    ffn_multiple_of: int = 64
    """Rounding unit of the Llama rule for ffn_hidden (ignored when ffn_hidden is set)."""
    vocab_size: int = 4096
    """Embedding rows; the data pipeline sets it to the tokenizer's size rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest sequence the model is trained on (also the packed training sequence length)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal init; output projections are scaled by 1/sqrt(2 * n_layers)."""
    attention: str = "auto"
    """Kernel for document-masked attention: auto (flex on CUDA, dense-mask SDPA on CPU), flex or sdpa."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk of the output head + cross-entropy in training (no full logits); 0 = full logits."""
    dropout: float = 0.0
    """Training-only dropout on the embeddings and on each attention and MLP output; 0 for large corpora."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        """The SwiGLU width actually used (explicit, or the Llama 8/3 rule)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        return self.ffn_multiple_of * ((hidden + self.ffn_multiple_of - 1) // self.ffn_multiple_of)

    def validate(self) -> None:
        """Raise ValueError naming the offending key when the shapes are impossible."""
        for key in (
            "n_layers",
            "d_model",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "max_seq_len",
            "ffn_multiple_of",
        ):
            value = getattr(self, key)
            if value <= 0:
                raise ValueError(f"model.{key}={value} must be a positive integer.")
        if self.attention not in ("auto", "sdpa", "flex"):
            raise ValueError(f"model.attention={self.attention!r} must be one of auto, sdpa, flex.")
        if self.loss_chunk_tokens < 0:
            raise ValueError(
                f"model.loss_chunk_tokens={self.loss_chunk_tokens} must be 0 (full logits) or positive."
            )
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise ValueError(f"model.ffn_hidden={self.ffn_hidden} must be a positive integer or null.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be at least 0 and below 1.")
        for key in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, key)
            if not math.isfinite(value):
                raise ValueError(f"config key 'model.{key}' is {value}; expected a finite number.")
            if value <= 0:
                raise ValueError(f"model.{key}={value} must be positive.")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                "every head needs the same width."
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}: "
                "grouped-query attention shares each key/value head among a whole number of query heads."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model.d_model / model.n_heads = {self.head_dim} is odd: rotary embeddings rotate pairs of "
                "channels, so the head dimension must be even (change model.d_model or model.n_heads)."
            )
