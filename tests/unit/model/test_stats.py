"""Closed-form counts against the real model: parameters, counted FLOPs, saved activations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launch.config import load_config
from model import Transformer
from model.stats import activation_bytes, flops_per_token, param_counts, training_memory_per_rank
from tests.helpers import REPO, TINY

PRESETS = sorted(str(p) for p in (REPO / "configs").glob("*.yaml"))


def real_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter


VARIANT = ["model.tie_embeddings=false", "model.n_kv_heads=1"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: Path(p).stem)
@pytest.mark.parametrize("overrides", [[], VARIANT], ids=["preset", "variant"])
def test_param_counts_of_every_preset_match_the_built_model(preset, overrides):
    cfg = load_config(preset, overrides).model
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == real_count(model)
    assert counts["embedding"] == cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    assert counts["non_embedding"] + counts["embedding"] == counts["total"]
    assert counts["non_embedding"] == real_count(model.layers) + real_count(model.norm)


def test_flops_per_token_matches_counted_matmuls():
    """FlopCounterMode counts every matmul of forward + backward (the math attention kernel makes
    attention visible as bmm); the formula only adds the norm weights, which are not matmuls."""
    for tie in ("true", "false"):
        cfg = load_config(TINY, [f"model.tie_embeddings={tie}"]).model
        model = Transformer(cfg)
        batch, seq_len = 2, 64
        tokens = torch.randint(
            0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)
        )
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            _, loss = model(tokens, targets=tokens)
            loss.backward()
        counted = counter.get_total_flops() / (batch * seq_len)
        assert flops_per_token(cfg, seq_len) == pytest.approx(counted, rel=0.005)
    # The attention term grows linearly with the sequence length: 12 * L * H * Q per extra token.
    extra = flops_per_token(cfg, 2 * seq_len) - flops_per_token(cfg, seq_len)
    assert extra == 12 * cfg.n_layers * cfg.d_model * seq_len


def test_zero_model_states_follow_the_zero_paper():
    cfg = load_config(TINY).model
    psi = param_counts(cfg)["total"]
    states = {
        (stage, n): training_memory_per_rank(cfg, stage, n, 8, 128)["model_states"]
        for stage in range(4)
        for n in (1, 8)
    }
    assert states[0, 8] == 16 * psi
    # ZeRO-1 keeps a whole fp32 gradient besides the paper's bf16 one (the trainer's fp32 accumulation).
    assert states[1, 8] == pytest.approx(8 * psi + 12 * psi / 8)
    assert states[2, 8] == pytest.approx(2 * psi + 14 * psi / 8)
    assert states[3, 8] == pytest.approx(16 * psi / 8)
    assert all(
        states[stage, 1] == pytest.approx(16 * psi) for stage in (0, 2, 3)
    )  # nothing to shard with one rank
    assert states[1, 1] == pytest.approx(20 * psi)
    memory = training_memory_per_rank(cfg, 2, 8, 8, 128, activation_checkpointing=True)
    assert memory["total"] == memory["model_states"] + memory["activations"]
    with pytest.raises(ValueError, match="zero_stage"):
        training_memory_per_rank(cfg, 4, 8, 8, 128)


def saved_activation_bytes(model: Transformer, tokens: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages autograd saves for backward, plus the logits kept alive."""
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits, _ = model(tokens, targets=tokens)
    if logits is not None:  # the plain loss path keeps the logits alive; the chunked one returns none
        saved[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    for param in model.parameters():
        saved.pop(param.untyped_storage().data_ptr(), None)
    return sum(saved.values())


# full logits; chunked loss (4 chunks of the batch); chunked with dropout masks
@pytest.mark.parametrize("loss_chunk_tokens,dropout", [(0, 0.0), (256, 0.0), (256, 0.1)])
def test_activation_estimate_matches_what_autograd_saves_in_bf16(loss_chunk_tokens, dropout):
    cfg = replace(load_config(TINY).model, loss_chunk_tokens=loss_chunk_tokens, dropout=dropout)
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16).train()
    batch, seq_len = 4, cfg.max_seq_len
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    measured = saved_activation_bytes(model, tokens)
    assert activation_bytes(cfg, batch, seq_len) == pytest.approx(measured, rel=0.15)

    model.set_activation_checkpointing(True)
    measured_checkpointed = saved_activation_bytes(model, tokens)
    estimate = activation_bytes(cfg, batch, seq_len, activation_checkpointing=True)
    one_fewer_layer = replace(cfg, n_layers=cfg.n_layers - 1)
    one_layer = activation_bytes(cfg, batch, seq_len) - activation_bytes(one_fewer_layer, batch, seq_len)
    # The estimate is the backward peak: what the forward keeps plus one layer being recomputed.
    assert estimate - one_layer == pytest.approx(measured_checkpointed, rel=0.15)
    assert measured_checkpointed < 0.7 * measured
    per_token = activation_bytes(cfg, 2 * batch, seq_len) - activation_bytes(cfg, batch, seq_len)
    weight_gradient = (
        2 * cfg.vocab_size * cfg.d_model if loss_chunk_tokens else 0
    )  # per micro-batch, not per token
    assert activation_bytes(cfg, batch, seq_len) == per_token + weight_gradient
