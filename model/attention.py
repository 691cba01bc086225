"""Which kernel computes attention, and the masks it takes.

- Plain causal attention (pretraining without document masking, the prompt of `generate`) goes to
  F.scaled_dot_product_attention with is_causal=True: the flash kernel on GPUs.
- Grouped-query attention hands SDPA the n_kv_heads key/value heads as they are (enable_gqa=True, torch >= 2.5)
  instead of materialising n_heads / n_kv_heads repeated copies; older torch repeats them (same result).
- Documents packed into one row (packed instruction tuning, `data.document_mask` in pretraining) need a
  block-diagonal causal mask. A dense boolean (B, 1, T, T) mask works everywhere but makes SDPA fall back
  from flash to a slower kernel on GPU; flex_attention takes the same mask as a BlockMask and skips the
  blocks that are fully masked. model.attention picks one: "auto" means flex on CUDA (compiled: eager flex
  materialises the scores) and the dense mask on CPU (compiling flex takes minutes there, eager flex is
  slower than SDPA, and flex has no backward on CPU), "flex" forces flex (on CPU only without gradients,
  eager: what the tests compare), "sdpa" forces the dense mask.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5: no flex attention, the dense mask serves every case
    BlockMask, create_block_mask, flex_attention = None, None, None

SDPA_SUPPORTS_GQA = torch.__version__ >= "2.5"
"""scaled_dot_product_attention(..., enable_gqa=True) exists (torch 2.5 and later)."""

ATTENTION_CHOICES = ("auto", "sdpa", "flex")

Mask = Union[Tensor, "BlockMask", None]
_compiled_flex = None


def uses_flex(choice: str, device: torch.device) -> bool:
    """Whether documents are masked by flex_attention block masks (True) or a dense boolean mask (False)."""
    if flex_attention is None:
        if choice == "flex":
            raise ValueError(
                "model.attention=flex needs torch >= 2.5 (torch.nn.attention.flex_attention); "
                f"this is torch {torch.__version__}. Use model.attention=auto or sdpa."
            )
        return False
    if device.type == "cpu" and torch.is_grad_enabled():
        return False  # flex_attention has no backward on CPU (torch 2.13): the dense mask it is
    return choice == "flex" or (choice == "auto" and device.type == "cuda")


def dense_mask(
    seq_len: int, past_len: int, doc_ids: Optional[Tensor], device: torch.device
) -> Optional[Tensor]:
    """Boolean mask (True = may attend) for SDPA, or None when plain `is_causal` is enough.

    doc_ids (B, T): causal and same document, (B, 1, T, T). With cached keys and several new queries the
    causal diagonal is offset by past_len, (1, 1, T, past_len + T). A single new query may attend everything.
    """
    if doc_ids is not None:
        if past_len:
            raise ValueError(
                "doc_ids cannot be combined with a KV cache (packed sequences are for training)."
            )
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()  # (T, T)
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        return (same_doc & causal)[:, None]  # (B, 1, T, T)
    if past_len and seq_len > 1:
        query_pos = torch.arange(past_len, past_len + seq_len, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(past_len + seq_len, device=device)[None, :]  # (1, S)
        return (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
    return None


def document_block_mask(doc_ids: Tensor) -> BlockMask:
    """flex_attention's BlockMask for causal attention within documents: doc_ids (B, T) -> (B, 1, T, T) blocks."""
    batch, seq_len = doc_ids.shape

    def same_document_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    # Compiled on CUDA: eager, the builder evaluates the mask over all (T, T) positions on every forward pass.
    on_gpu = doc_ids.device.type == "cuda"
    return create_block_mask(
        same_document_causal, batch, None, seq_len, seq_len, device=doc_ids.device, _compile=on_gpu
    )


def attention_mask(
    seq_len: int, past_len: int, doc_ids: Optional[Tensor], device: torch.device, choice: str = "sdpa"
) -> Mask:
    """The mask every layer of one forward pass shares: None (causal), a dense boolean mask or a BlockMask."""
    if doc_ids is not None and not past_len and uses_flex(choice, device):
        return document_block_mask(doc_ids)
    return dense_mask(seq_len, past_len, doc_ids, device)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
    """Attention of q (B, H, T, hd) over k, v (B, KV, S, hd), KV dividing H; returns (B, H, T, hd)."""
    if flex_attention is not None and isinstance(mask, BlockMask):
        return _flex(q.device)(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    causal = mask is None and q.shape[2] > 1  # one new query may see every cached key
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if SDPA_SUPPORTS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    repeats = q.shape[1] // k.shape[1]  # query heads per key/value head
    k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)  # (B, H, S, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _flex(device: torch.device):
    """flex_attention compiled once on CUDA (its fused kernel); eager elsewhere (correct, unfused)."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex
