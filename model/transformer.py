"""The decoder-only transformer of the Llama family, in plain PyTorch (no DeepSpeed, no training code).

    tokens -> embed_tokens -> n_layers x Block -> norm -> lm_head -> logits
    Block:  x = x + self_attn(input_layernorm(x));  x = x + mlp(post_attention_layernorm(x))

- Attention: rotary position embeddings in the Hugging Face `rotate_half` convention (the head dimension is
  split into two halves, not interleaved pairs) and grouped-query attention (each key/value head serves
  n_heads / n_kv_heads consecutive query heads, never repeated in memory), computed by model.attention.attend.
- MLP: SwiGLU, down_proj(silu(gate_proj(x)) * up_proj(x)). No biases anywhere. RMSNorm in float32.
- Parameter names are Hugging Face LlamaForCausalLM's without the "model." prefix, and the RoPE convention is
  the same, so an export is a pure rename of keys. With tie_embeddings, lm_head.weight IS embed_tokens.weight.
- Initialization: every Linear and Embedding weight ~ normal(0, init_std), except the two projections that
  write into the residual stream (self_attn.o_proj, mlp.down_proj), which use init_std / sqrt(2 * n_layers)
  so the residual stream's variance does not grow with depth (GPT-2); RMSNorm weights start at 1.
- Packed sequences: `position_ids` restarts positions per document and `doc_ids` keeps attention inside one
  document (a block-diagonal causal mask: dense for SDPA, or a flex_attention BlockMask, see model/attention.py).
- Loss: with model.loss_chunk_tokens > 0 the output head and cross-entropy run chunk by chunk (model/loss.py),
  so the float32 logits of a whole micro-batch never exist; prefill computes the last position's logits only.
- Dropout (model.dropout, 0 by default): while training, on the embeddings and on each attention and MLP
  output before it joins the residual stream (nanoGPT's places, without dropout on attention probabilities).
  It draws from torch's global RNG, which checkpoints save, so a resumed run draws the same masks.
- `generate` decodes with a key/value cache; `set_activation_checkpointing(True)` recomputes each block's
  activations in the backward pass instead of storing them.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.attention import Mask, attend, attention_mask
from model.config import ModelConfig
from model.loss import chunked_linear_cross_entropy, masked_cross_entropy

__all__ = ["KVCache", "Transformer"]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back, exactly as Hugging Face Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> Tuple[Tensor, Tensor]:
    """cos and sin of each position's rotation angles, in float32: two (B, T, head_dim) tensors.

    Channel pair (i, i + head_dim/2) rotates at frequency theta^(-2i/head_dim); computed on the fly (not a
    buffer) so it never gets cast to bf16 or left on the meta device.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (head_dim/2,)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, head_dim): both halves of a pair share an angle
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys x (B, heads, T, head_dim) by their positions' angles (cos/sin: (B, T, head_dim))."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, head_dim): the same rotation for every head
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every token seen so far, preallocated for `max_len` positions in each layer."""

    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys: List[Tensor] = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)
        ]
        self.values: List[Tensor] = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)
        ]
        self.max_len = max_len
        self.length = 0
        """Positions filled; Transformer.forward advances it after all layers have written."""

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store new keys/values (B, n_kv_heads, T, head_dim); return all so far (B, n_kv_heads, S, head_dim)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were requested.")
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query key/value heads."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, kv_cache: Optional[KVCache] = None
    ) -> Tensor:
        B, T, _ = x.shape  # (B, T, d_model)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, KV, S, hd), S = cached + T
        y = attend(q, k, v, mask)  # (B, H, T, hd): each KV head serves H / KV query heads, none repeated
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)  # (B, T, d_model)


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden_size
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, ffn) -> (B, T, d_model)


class Block(nn.Module):
    """One pre-norm transformer layer: attention then MLP, each added to the residual stream."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, kv_cache: Optional[KVCache] = None
    ) -> Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        x = x + F.dropout(attended, self.dropout, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


class OutputHead(nn.Linear):
    """The vocabulary projection d_model -> vocab_size; given targets it returns the loss instead of logits.

    The chunked loss runs inside this module's forward so that DeepSpeed ZeRO-3, which gathers a module's
    weights around its forward and backward, has the (possibly tied) weight in place.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.d_model, cfg.vocab_size, bias=False)
        self.loss_chunk_tokens = cfg.loss_chunk_tokens

    def forward(self, x: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        """x (B, T, d_model) -> logits (B, T, vocab_size), or with targets (B, T) the scalar mean loss."""
        if targets is None:
            return super().forward(x)
        return chunked_linear_cross_entropy(x, self.weight, targets, self.loss_chunk_tokens)


def sample_next_token(
    logits: Tensor, temperature: float, top_k: Optional[int], generator: Optional[torch.Generator]
) -> Tensor:
    """Pick one token per row from last-position logits (B, vocab): greedy at temperature 0 (or below float32's
    smallest normal number), else sample."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that sampling is greedy anyway
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float()
    # Shifted so the best is 0 before dividing: any positive temperature, however small, stays finite.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # (B, vocab)
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, vocab)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # (B,)


class Transformer(nn.Module):
    """The whole language model: forward for training and evaluation, generate for decoding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = OutputHead(cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) weights, residual-stream outputs scaled by 1/sqrt(2 * n_layers), norms at 1."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else self.cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in the backward pass (only while training with gradients enabled)."""
        self.activation_checkpointing = enabled

    def forward(
        self,
        tokens: Tensor,
        targets: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        doc_ids: Optional[Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        last_logits_only: bool = False,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """tokens (B, T) -> (logits (B, T, vocab_size), mean loss over targets != -100 or None).

        position_ids (B, T) default to 0..T-1 (continuing after the cache); doc_ids (B, T) restrict attention
        to tokens of the same document. With targets and model.loss_chunk_tokens > 0 the loss is computed
        chunk by chunk and the logits are not (None is returned in their place). last_logits_only computes
        the logits of the last position only, (B, 1, vocab_size), as a generation prefill needs.
        """
        B, T = tokens.shape
        past_len = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=tokens.device).expand(B, T)  # (B, T)
        x = F.dropout(self.embed_tokens(tokens), self.cfg.dropout, self.training)  # (B, T, d_model)
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)  # (B, T, hd) each
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = attention_mask(
            T, past_len, doc_ids, tokens.device, self.cfg.attention
        )  # None, dense or blocks
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)  # (B, T, d_model)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.norm(x)  # (B, T, d_model)
        if targets is not None and self.cfg.loss_chunk_tokens > 0:
            return None, self.lm_head(x, targets)  # the full logits never exist
        if last_logits_only:
            x = x[:, -1:]  # (B, 1, d_model)
        logits = self.lm_head(x)  # (B, T or 1, vocab_size)
        loss = masked_cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        eos_id: Optional[int] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
        on_token: Optional[Callable[[Tensor], None]] = None,
    ) -> Tensor:
        """Append up to max_new_tokens tokens to the prompts tokens (B, T); returns (B, T + generated).
        `on_token`, if given, sees each step's new tokens (B,) as they come (for streaming output).

        temperature 0 is greedy; top_k keeps only the k likeliest tokens. With eos_id, a row that emitted it
        keeps emitting it, and decoding stops once every row has. The context is the last max_seq_len tokens:
        while the sequence fits, the KV cache makes each step process one token; beyond that the window slides,
        positions shift, and each step recomputes the window (so cached and uncached decoding agree).
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(
                f"generate needs prompts of shape (B, T) with T >= 1, got {tuple(tokens.shape)}."
            )
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
        max_len = self.cfg.max_seq_len
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)  # (B,)
        kv_cache: Optional[KVCache] = None
        for _ in range(max_new_tokens):
            if use_cache and tokens.shape[1] <= max_len:
                if kv_cache is None:  # prefill with the whole prompt
                    capacity = min(max_len, tokens.shape[1] + max_new_tokens)
                    kv_cache = KVCache(
                        self.cfg, tokens.shape[0], capacity, self.embed_tokens.weight.dtype, tokens.device
                    )
                    logits, _ = self(tokens, kv_cache=kv_cache, last_logits_only=True)  # (B, 1, vocab_size)
                else:
                    logits, _ = self(tokens[:, -1:], kv_cache=kv_cache)  # (B, 1, vocab_size)
            else:
                logits, _ = self(tokens[:, -max_len:], last_logits_only=True)  # (B, 1, vocab_size)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, generator)  # (B,)
            if eos_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
                finished |= next_token == eos_id
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)  # (B, T + 1)
            if on_token is not None:
                on_token(next_token)
            if eos_id is not None and bool(finished.all()):
                break
        return tokens
