"""The stability guard: loss and gradient-norm spikes judged against a running baseline, and what the loop does
about one (`guard.action`: warn, skip the step's update, or roll back to the last checkpoint and skip the data
window that led to the spike).

A value is a spike when its z-score against the last `guard.window` accepted values of the same signal exceeds
`guard.threshold` (once `guard.warmup` values are in the window). Spikes never enter the window. The window and
the rollbacks made so far are the guard's whole state; it lives in `Progress.guard` and so in every
checkpoint's record, and a rollback restores the checkpoint's window: a resumed run decides exactly as the
uninterrupted one did.

Where each signal is judged (train.loop): the loss before the last micro-batch's backward pass (skip and
rollback: one small all-reduce of the step's mean loss; a spike then poisons that backward with NaN, so the
step takes the loop's non-finite skip path on every ZeRO stage and the optimizer never sees the gradient); the
gradient norm after the backward pass, in the loop's one agreement. By then the gradient is reduced into
DeepSpeed's buffers and can no longer be dropped on every stage, so under `skip` a gradient-norm spike is
logged only (action "warn"); `rollback` acts on both signals.

The gradient norm the guard watches is measured by the loop's gradient hooks before ZeRO reduces anything:
the square root of the mean over ranks of each rank's sum of squared gradients (summed over micro-batches).
It follows the logged `grad_norm` closely but is not the same number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from common.checks import check_at_least, check_choice, check_finite_fields, check_positive

ACTIONS = ("off", "warn", "skip", "rollback")
WATCHED = ("loss", "grad_norm", "both")
SIGNALS = ("loss", "grad_norm")


@dataclass(frozen=True)
class GuardConfig:
    """The `guard` section: which spikes the loop watches for and what it does about one."""

    action: str = "off"
    """off; warn (a row and a line); skip (the step's update is dropped); rollback (reload the last checkpoint and
    skip the data since it)."""
    watch: str = "both"
    """Signals judged: loss, grad_norm or both (grad_norm is not watched under fp16, whose gradients are scaled)."""
    window: int = 50
    """Recent accepted steps that form the baseline (mean and standard deviation)."""
    warmup: int = 20
    """Values a signal's window must hold before it judges (the first steps are never spikes)."""
    threshold: float = 6.0
    """A spike: (value - window mean) / window std above this."""
    min_std_fraction: float = 0.01
    """The window's std is taken as at least this fraction of its mean, so a flat curve's noise is no spike."""
    max_rollbacks: int = 5
    """action=rollback: more rollbacks than this in one run stop it with an error (the instability is not data)."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_choice("guard.action", self.action, ACTIONS)
        check_choice("guard.watch", self.watch, WATCHED)
        check_positive("guard.window", self.window)
        check_finite_fields(self, "guard")
        check_at_least("guard.warmup", self.warmup, 2, " (a standard deviation needs two values)")
        if self.warmup > self.window:
            raise ValueError(
                f"config key 'guard.warmup' ({self.warmup}) is above 'guard.window' ({self.window}); the window "
                "could never hold that many values. Lower guard.warmup or raise guard.window."
            )
        if not self.threshold > 0:
            raise ValueError(
                f"config key 'guard.threshold' is {self.threshold}; expected a positive z-score."
            )
        check_at_least("guard.min_std_fraction", self.min_std_fraction, 0.0)
        check_at_least("guard.max_rollbacks", self.max_rollbacks, 0)

    @property
    def signals(self) -> List[str]:
        """The signals this config judges."""
        return list(SIGNALS) if self.watch == "both" else [self.watch]


@dataclass(frozen=True)
class Spike:
    """One judged spike: what the metrics row of kind "spike" records."""

    step: int
    """The step whose value spiked (1-based)."""
    signal: str
    """loss or grad_norm."""
    value: float
    """The step's value."""
    mean: float
    """The window's mean."""
    std: float
    """The window's standard deviation (after the min_std_fraction floor)."""
    window: int
    """Values in the window."""

    @property
    def z(self) -> float:
        return (self.value - self.mean) / self.std if self.std > 0 else math.inf

    def row(self, action: str, threshold: float) -> Dict[str, Any]:
        """The metrics.jsonl row of this spike (kind "spike")."""
        return {
            "kind": "spike",
            "step": self.step,
            "signal": self.signal,
            "value": self.value,
            "baseline": self.mean,
            "std": self.std,
            "z": self.z,
            "threshold": threshold,
            "action": action,
        }


class SpikeGuard:
    """The judging half of the guard: each signal's window, kept in a plain dict that checkpoints carry."""

    def __init__(self, config: GuardConfig, state: Optional[Dict[str, Any]] = None) -> None:
        self.config = config
        self.state: Dict[str, Any] = fresh_state() if state is None else state
        for signal in SIGNALS:
            self.state.setdefault(signal, [])
        self.state.setdefault("rollbacks", [])

    def judge(self, step: int, signal: str, value: float) -> Optional[Spike]:
        """The spike `value` makes against the signal's window, or None (then it joins the window)."""
        cfg, window = self.config, self.state[signal]
        if not math.isfinite(value):
            return None  # non-finite steps are train.on_nonfinite's business; they never enter the window
        if len(window) >= cfg.warmup:
            mean = math.fsum(window) / len(window)
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in window) / (len(window) - 1))
            std = max(std, cfg.min_std_fraction * abs(mean))
            if (std > 0 and (value - mean) / std > cfg.threshold) or (std == 0 and value > mean):
                return Spike(step, signal, value, mean, std, len(window))
        window.append(value)
        del window[: -cfg.window]
        return None

    @property
    def rollbacks(self) -> List[Dict[str, Any]]:
        """The rollbacks made so far: {step, to_step, signal, skipped_samples: [from, to)}."""
        return self.state["rollbacks"]


def fresh_state() -> Dict[str, Any]:
    """An empty guard state (what Progress.guard holds once the guard is on)."""
    return {"loss": [], "grad_norm": [], "rollbacks": []}
