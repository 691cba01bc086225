"""The `optim` section: the optimizer and its settings (built by train.optim, which imports torch; this file
does not, so the config loads without it)."""

from __future__ import annotations

from dataclasses import dataclass

from common.checks import check_at_least, check_choice, check_finite_fields, check_range

OPTIMIZERS = ("adamw", "muon")
MUON_NS_METHODS = ("auto", "standard", "gram")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    """adamw, or muon: Muon for the attention/MLP matrices, AdamW (optim.lr) for embeddings, norms and head."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay (matrices only; never norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    muon_lr: float = 0.02
    """optim.name=muon: peak learning rate of the Muon matrices (the schedule scales it like optim.lr)."""
    muon_momentum: float = 0.95
    """optim.name=muon: Muon's Nesterov momentum."""
    muon_ns_method: str = "auto"
    """optim.name=muon: Newton-Schulz iteration: standard (bf16 quintic, Keller Jordan's), gram (DeepSpeed's Gram
    form), or auto: standard where bf16 matmuls are native (GPUs, CPUs with AVX512-BF16/AMX), else gram."""

    def validate(self) -> None:
        """Raise ValueError naming the key (Muon's refusals that depend on train.* are Config.validate's)."""
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_choice("optim.muon_ns_method", self.muon_ns_method, MUON_NS_METHODS)
        check_finite_fields(self, "optim")
        check_at_least("optim.weight_decay", self.weight_decay, 0)
        check_at_least("optim.grad_clip", self.grad_clip, 0, " (0 disables clipping)")
        for key in ("beta1", "beta2"):
            check_range(f"optim.{key}", getattr(self, key), 0, 1, high_open=True)
        if not self.eps > 0:
            raise ValueError(f"config key 'optim.eps' is {self.eps}; expected a positive number.")
        if not self.lr > 0:
            raise ValueError(f"config key 'optim.lr' is {self.lr}; expected a positive learning rate.")
        if not self.muon_lr > 0:
            raise ValueError(
                f"config key 'optim.muon_lr' is {self.muon_lr}; expected a positive learning rate."
            )
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(
                f"config key 'optim.muon_momentum' is {self.muon_momentum}; expected a number in [0, 1)."
            )
