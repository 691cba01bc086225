"""Closed-form sizes of a model: parameter counts, training FLOPs per token, per-rank training memory.

Parameters (d = d_model, f = ffn hidden, V = vocab_size, L = n_layers, H/KV = query/key-value heads, Q = head_dim):
    per layer     d*H*Q (q) + 2*d*KV*Q (k, v) + H*Q*d (o) + 3*d*f (SwiGLU) + 2*d (norms)
    non-embedding L * per layer + d (final norm)
    embedding     V*d for the token table, plus V*d for lm_head when it is not tied

FLOPs per token (training: forward + backward), as nanoGPT and PaLM count them: 6*N + 12*L*H*Q*T, where N is
the non-embedding parameters plus the output head's V*d (the head is a matmul every token pays for, tied or
not; the embedding lookup costs nothing) and 12*L*H*Q*T is attention's scores and weighted sum at length T.

Training memory per rank, bf16 mixed precision with Adam (Rajbhandari et al., ZeRO), Psi = total parameters
and N = data-parallel world size: every parameter costs 2 (bf16 weight) + 2 (bf16 gradient) + 12 (fp32 master
weight, Adam m and v) = 16 bytes, of which ZeRO shards more and more:
    stage 0: 16*Psi    stage 1: 8*Psi + 12*Psi/N    stage 2: 2*Psi + 14*Psi/N    stage 3: 16*Psi/N
Stage 1 adds a whole fp32 gradient (4 bytes): the trainer accumulates micro-batch gradients in fp32 there
(DeepSpeed's BF16_Optimizer), next to the bf16 gradient of the micro-batch being computed.

Activations (bytes, b = micro batch, s = seq_len): what autograd keeps for the backward pass, counted for this
model in bf16 with a fused attention kernel (no s*s score matrix is stored, as on GPUs with flash attention):
    per layer 2*s*b*(10*d + 4*f): each RMSNorm keeps its fp32 input (4sbd) and bf16 output (2sbd); attention
              keeps rotated q, repeated k and v and its output (4 x 2sbd); the MLP keeps gate, up, silu(gate)
              and their product (4 x 2sbf)
    head      6*s*b*d (final norm) + 6*s*b*V (bf16 logits alive until backward + fp32 log-softmax of the loss);
              with model.loss_chunk_tokens > 0 no logits are kept: 8*s*b*d + 2*V*d (the final norm, and the
              gradients of the hidden states and of the head weight, computed in the forward pass)
With activation checkpointing each layer keeps only its bf16 input (2sbd) and one layer's activations are
rebuilt at a time during backward: L*2sbd + one layer + head. Buffers, fragmentation and communication
buckets are not counted, so leave headroom.
"""

from __future__ import annotations

from typing import Dict

from model.config import ModelConfig

BYTES_PER_PARAM_BY_STAGE = {0: (16, 0), 1: (8, 12), 2: (2, 14), 3: (0, 16)}
"""ZeRO stage -> (replicated bytes per parameter, sharded bytes per parameter) for bf16 + fp32 Adam."""


def param_counts(cfg: ModelConfig) -> Dict[str, int]:
    """{"total", "non_embedding", "embedding"} parameter counts (a tied head is counted once)."""
    d, q_width, kv_width = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attention = d * q_width + 2 * d * kv_width + q_width * d
    mlp = 3 * d * cfg.ffn_hidden_size
    per_layer = attention + mlp + 2 * d
    non_embedding = cfg.n_layers * per_layer + d
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return {"total": non_embedding + embedding, "non_embedding": non_embedding, "embedding": embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len: 6N + 12*L*H*Q*T."""
    matmul_params = param_counts(cfg)["non_embedding"] + cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params + attention)


def activation_bytes(
    cfg: ModelConfig, micro_batch_size: int, seq_len: int, activation_checkpointing: bool = False
) -> int:
    """Bytes autograd keeps for one micro-batch's backward pass (see the module docstring)."""
    tokens = micro_batch_size * seq_len
    d, f, vocab = cfg.d_model, cfg.ffn_hidden_size, cfg.vocab_size
    per_layer = 2 * tokens * (10 * d + 4 * f)
    if cfg.loss_chunk_tokens > 0:
        head = 8 * tokens * d + 2 * vocab * d
    else:
        head = 6 * tokens * d + 6 * tokens * vocab
    if cfg.dropout > 0:  # dropout masks, in the activations' dtype on CPU (CUDA keeps 1-byte masks)
        per_layer += 2 * 2 * tokens * d  # one per branch output
        head += 2 * tokens * d  # the embeddings'
    if activation_checkpointing:
        return cfg.n_layers * 2 * tokens * d + per_layer + head
    return cfg.n_layers * per_layer + head


def training_memory_per_rank(
    cfg: ModelConfig,
    zero_stage: int,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    activation_checkpointing: bool = False,
) -> Dict[str, float]:
    """{"model_states", "activations", "total"} bytes per rank for ZeRO stage 0-3 (see the module docstring)."""
    if zero_stage not in BYTES_PER_PARAM_BY_STAGE:
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}.")
    if world_size < 1 or micro_batch_size < 1 or seq_len < 1:
        raise ValueError(
            "world_size, micro_batch_size and seq_len must be positive, "
            f"got {world_size}, {micro_batch_size}, {seq_len}."
        )
    psi = param_counts(cfg)["total"]
    replicated, sharded = BYTES_PER_PARAM_BY_STAGE[zero_stage]
    model_states = replicated * psi + sharded * psi / world_size
    activations = float(activation_bytes(cfg, micro_batch_size, seq_len, activation_checkpointing))
    return {"model_states": model_states, "activations": activations, "total": model_states + activations}
