"""train.optim: which parameters decay, and the AdamW it builds."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, Transformer
from train.optim import build_optimizer, group_lr, param_groups, split_decay
from train.optim_config import OptimConfig

SMALL = ModelConfig(
    n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=256, max_seq_len=16
)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_only_on_attention_and_mlp_matrices(tie):
    model = Transformer(ModelConfig(**{**SMALL.__dict__, "tie_embeddings": tie}))
    decay, no_decay = split_decay(model)
    assert decay and all(".self_attn." in n or ".mlp." in n for n in decay)
    assert all(n.endswith("_proj.weight") for n in decay)
    assert len(decay) == SMALL.n_layers * 7  # q, k, v, o, gate, up, down
    assert "embed_tokens.weight" in no_decay and "norm.weight" in no_decay
    assert all("norm" in n or n.startswith(("embed_tokens", "lm_head")) for n in no_decay)
    assert ("lm_head.weight" in no_decay) == (not tie)  # a tied head is the embedding, listed once
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (
        optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[1]["weight_decay"] == 0.0
    )


def test_decay_leaves_norms_and_embeddings_untouched():
    """With zero gradients, one AdamW step changes only the decayed matrices (decoupled decay)."""
    model = Transformer(SMALL)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decay, no_decay = split_decay(model)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before[n]) for n in no_decay)
    assert all(torch.allclose(params[n], before[n] * (1 - 0.1 * 0.5)) for n in decay)


def test_muon_is_left_to_deepspeed_and_its_half_follows_the_schedule_at_muon_lr():
    cfg = OptimConfig(name="muon", lr=4e-3, muon_lr=0.02)
    assert (
        build_optimizer(Transformer(SMALL), cfg) is None
    )  # DeepSpeed builds MuonWithAuxAdam from its config
    assert group_lr({"use_muon": True}, 2e-3, cfg) == pytest.approx(0.01)  # half the peak: half of muon_lr
    assert group_lr({"use_muon": False}, 2e-3, cfg) == 2e-3 and group_lr({}, 2e-3, cfg) == 2e-3
