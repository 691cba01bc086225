"""AdamW with decoupled weight decay on the attention and MLP matrices only.

Decision: decay pulls weights toward zero, which is a useful prior for the projection matrices but
not for (a) RMSNorm gains, whose natural value is 1 and which decay would shrink, nor (b) the token
embeddings / output head, where decay mostly shrinks the rows of rare tokens that receive few
gradient updates (and, when tied, the same matrix is both). So: 2-D weights under `layers.` get
`train.weight_decay`; norms, embeddings and lm_head get none. This follows GPT-2/nanoGPT for norms
and OLMo/Llama practice for embeddings.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from train.config import TrainConfig

NO_DECAY_PREFIXES = ("embed_tokens.", "lm_head.")


def wants_decay(name: str, param: torch.nn.Parameter) -> bool:
    """True for the attention/MLP projection matrices, False for norms, embeddings and the head."""
    return param.ndim >= 2 and not name.startswith(NO_DECAY_PREFIXES) and "norm" not in name


def split_decay(model: torch.nn.Module) -> Tuple[List[str], List[str]]:
    """Names of trainable parameters with and without weight decay (a tied head is counted once)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if wants_decay(name, param) else no_decay).append(name)
    return decay, no_decay


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW param groups: decayed matrices first, then everything without decay."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "name": "decay"},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The AdamW handed to DeepSpeed (which wraps it for ZeRO); the LR is set every step by the trainer."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
    )
