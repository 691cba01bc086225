"""`slm model summary`: the numbers that decide whether a config fits a cluster, as one readable table."""

from __future__ import annotations

from common.files import GIB
from launch.config import Config, ConfigError
from model.stats import flops_per_token, param_counts, training_memory_per_rank
from train.config import ZERO_STAGES


def _millions(count: int) -> str:
    return f"{count:>15,}  ({count / 1e6:,.2f} M)"


def model_summary(cfg: Config, world_size: int) -> str:
    """Parameters, training FLOPs per token at max_seq_len, and per-rank memory for ZeRO 0-3 in GiB."""
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size}: expected a positive number of data-parallel ranks.")
    model, train = cfg.model, cfg.train
    counts = param_counts(model)
    seq_len, micro_batch = model.max_seq_len, train.micro_batch_size
    flops = flops_per_token(model, seq_len)
    checkpointing = {True: "on", False: "off", None: "auto (shown off; on if it does not fit)"}[
        train.activation_checkpointing
    ]
    lines = [
        f"model: {model.n_layers} layers, d_model {model.d_model}, {model.n_heads} heads "
        f"({model.n_kv_heads} key/value, head_dim {model.head_dim}), ffn_hidden {model.ffn_hidden_size}, "
        f"vocab {model.vocab_size}, max_seq_len {model.max_seq_len}, "
        f"{'tied' if model.tie_embeddings else 'untied'} embeddings",
        "",
        "parameters",
        f"  total          {_millions(counts['total'])}",
        f"  non-embedding  {_millions(counts['non_embedding'])}",
        f"  embedding      {_millions(counts['embedding'])}",
        "",
        f"training FLOPs per token at seq_len {seq_len}: {flops / 1e9:.3f} GFLOP (6N + 12*L*H*Q*T)",
        "",
        f"training memory per rank in GiB (bf16 + fp32 Adam): world size {world_size}, "
        f"micro batch {micro_batch} x {seq_len} tokens, activation checkpointing {checkpointing}",
        f"  {'ZeRO stage':<12}{'model states':>14}{'activations':>14}{'total':>10}",
    ]
    for stage in ZERO_STAGES:
        memory = training_memory_per_rank(
            model, stage, world_size, micro_batch, seq_len, bool(train.activation_checkpointing)
        )
        marker = "  <- train.zero_stage" if stage == train.zero_stage else ""
        lines.append(
            f"  {stage:<12}{memory['model_states'] / GIB:>14.3f}{memory['activations'] / GIB:>14.3f}"
            f"{memory['total'] / GIB:>10.3f}{marker}"
        )
    return "\n".join(lines)
