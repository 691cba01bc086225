"""The optimizer: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Decision (weight decay): decay pulls weights toward zero, which is a useful prior for the projection
matrices but not for (a) RMSNorm gains, whose natural value is 1 and which decay would shrink, nor (b)
the token embeddings / output head, where decay mostly shrinks the rows of rare tokens that receive few
gradient updates (and, when tied, the same matrix is both). So: 2-D weights under `layers.` get
`optim.weight_decay`; norms, embeddings and lm_head get none. This follows GPT-2/nanoGPT for norms
and OLMo/Llama practice for embeddings.

Decision (Muon): `optim.name=muon` uses DeepSpeed's own MuonWithAuxAdam (optimizer type `muon` in
the generated DeepSpeed config) rather than `torch.optim.Muon`, because under ZeRO 1-3 the optimizer only
sees flat partitions of each matrix, and DeepSpeed orthogonalizes the whole gathered gradient before it
partitions it. DeepSpeed tags every matrix whose name holds neither `embed` nor `lm_head` for Muon, which is
exactly the decayed group above (the attention and MLP projections); the norms, the embeddings and the head
get the auxiliary AdamW (torch's, `torch_adam`). The two halves have their own peak learning rates
(`optim.muon_lr`, `optim.lr`); the schedule scales both by the same factor each step (`group_lr`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from train.distributed import newton_schulz_method
from train.errors import TrainError
from train.optim_config import OptimConfig

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
    """Two param groups: decayed matrices first, then everything without decay."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "name": "decay"},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> Optional[torch.optim.AdamW]:
    """The AdamW handed to DeepSpeed (which wraps it for ZeRO), or None for Muon, which DeepSpeed builds from
    its config over `param_groups`; the LR is set every step by the loop (`group_lr`)."""
    if optim.name == "muon":
        return None
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
    )


def deepspeed_optimizer_block(optim: OptimConfig, device_type: str) -> Optional[Dict[str, Any]]:
    """The `optimizer` entry of the generated DeepSpeed config: only for Muon (AdamW is passed as an object); a
    muon_ns_method still auto is resolved for `device_type`."""
    if optim.name != "muon":
        return None
    return {
        "type": "muon",
        "params": {
            "lr": optim.lr,
            "adam_lr": optim.lr,
            "muon_lr": optim.muon_lr,
            "momentum": optim.muon_momentum,
            "betas": [optim.beta1, optim.beta2],
            "eps": optim.eps,
            "weight_decay": optim.weight_decay,
            "torch_adam": True,
            "ns_method": newton_schulz_method(optim.muon_ns_method, device_type),
        },
    }


def set_compile_stance(device: torch.device, compile_model: bool, muon: bool) -> None:
    """On CPU, nothing is compiled unless train.compile is set: DeepSpeed wraps Muon's Newton-Schulz kernels in
    torch.compile, and inductor spends 7-26 s of a CPU run's start-up on them for a 10-20% faster update
    (measured on the recipe's matrices; docs/benchmarks.md). On GPU DeepSpeed's choice stands. A CPU run that
    compiles nothing (no train.compile, no Muon) leaves the stance alone: setting it imports torch._dynamo, about
    2 s of CPU at start-up."""
    eager = device.type == "cpu" and not compile_model
    if eager and not muon:
        return
    torch.compiler.set_stance("force_eager" if eager else "default")


def describe_muon(model: torch.nn.Module, optim: OptimConfig) -> str:
    """The status line of a Muon run: which parameters DeepSpeed tagged for Muon (`use_muon`) and which got AdamW."""
    named = list(model.named_parameters())
    muon = [name for name, param in named if getattr(param, "use_muon", False)]
    if not muon:
        raise TrainError(
            "optim.name=muon but DeepSpeed tagged no parameter for Muon (use_muon); expected the "
            "attention and MLP matrices. This DeepSpeed may not support optimizer type 'muon'."
        )
    return (
        f"optimizer: Muon (lr {optim.muon_lr:g}, momentum {optim.muon_momentum:g}, {optim.muon_ns_method} Newton-Schulz) "
        f"for {len(muon)} matrices, AdamW (lr {optim.lr:g}) for the other {len(named) - len(muon)} parameters "
        "(embeddings, norms, head)"
    )


def group_lr(group: Mapping[str, Any], lr: float, optim: OptimConfig) -> float:
    """The learning rate of one param group when the schedule gives `lr` (Muon's half scaled to optim.muon_lr)."""
    return lr * optim.muon_lr / optim.lr if group.get("use_muon", False) else lr
