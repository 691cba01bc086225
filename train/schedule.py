"""Learning-rate schedules as pure functions of the optimizer step.

A pure function (no scheduler object, no state) means a resumed run needs nothing but its step to
get the same learning rate, and the curve can be tested and plotted without training.

`step` counts optimizer updates already taken: 0 is the first update. Every schedule starts with
a linear warmup from near zero, nanoGPT style: lr * (step + 1) / warmup_steps, so step 0 is never
exactly 0 (a wasted update) and the last warmup step, warmup_steps - 1, reaches the peak lr. Then:

- cosine: half a cosine from lr down to min_lr, reaching min_lr at max_steps.
- wsd (warmup-stable-decay): hold lr, then decay to min_lr over the final
  decay_fraction * max_steps steps, with decay_shape linear, cosine or sqrt (1 - sqrt(progress),
  the shape of the WSD papers: Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations"; MiniCPM, Hu et al. 2024).
- wsd_time: wsd fitted to a time budget (train.max_time) when the step count is unknown: hold lr until
  (1 - decay_fraction) * max_time has elapsed, then decay over the steps estimated to fit the rest of the
  budget (`plan_time_decay`, from the measured seconds per step). That decision is made once, by every rank
  alike, and kept in the checkpoint (`TimedDecay` in Progress), so a resumed run replays the same curve; the
  run then ends when the decay does (train.max_steps stays an upper bound).
- linear: a straight line from lr down to min_lr at max_steps.
- constant: lr after warmup.

At and beyond max_steps the decaying schedules stay at min_lr (constant stays at lr).

Continued pretraining (train.stage=cpt) re-warms with the same functions: the CPT run starts at
step 0 with its own warmup_steps, max_steps, lr and min_lr, so it warms up again from near zero
and decays over its own length; nothing special is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from train.config import DECAY_SHAPES, SCHEDULES, TrainConfig
from train.errors import TrainError


@dataclass(frozen=True)
class TimedDecay:
    """wsd_time's decision, taken from the clock once and recorded in the checkpoint."""

    start_step: int
    """The first (0-based) optimizer step of the decay."""
    steps: int
    """The decay's planned length in steps; its last step, start_step + steps - 1, runs at min_lr."""

    @property
    def end_step(self) -> int:
        """Steps taken when the decay is over (the run's last step, 1-based)."""
        return self.start_step + self.steps


def decay_due(elapsed: float, cfg: TrainConfig) -> bool:
    """wsd_time: whether the decay should start now, `elapsed` seconds into the time budget."""
    return cfg.schedule == "wsd_time" and elapsed >= (1.0 - cfg.decay_fraction) * float(cfg.max_time)


def plan_time_decay(start_step: int, elapsed: float, seconds_per_step: float, cfg: TrainConfig) -> TimedDecay:
    """The decay that fills train.decay_time_margin of the rest of train.max_time at `seconds_per_step`; at least
    one step. The margin is there because steps may turn slower later (a busy machine, checkpoints)."""
    remaining = max(0.0, float(cfg.max_time) - elapsed) * cfg.decay_time_margin
    return TimedDecay(start_step, max(1, int(remaining / max(seconds_per_step, 1e-9))))


def check_schedule(cfg: TrainConfig) -> None:
    """Raise TrainError naming the key when the schedule settings cannot define a curve."""
    if cfg.schedule not in SCHEDULES:
        raise TrainError(f"train.schedule is {cfg.schedule!r}; expected one of {', '.join(SCHEDULES)}.")
    if cfg.decay_shape not in DECAY_SHAPES:
        raise TrainError(
            f"train.decay_shape is {cfg.decay_shape!r}; expected one of {', '.join(DECAY_SHAPES)}."
        )
    if cfg.warmup_steps < 0:
        raise TrainError(f"train.warmup_steps is {cfg.warmup_steps}; expected 0 or a positive integer.")
    if cfg.schedule == "wsd_time" and not (cfg.max_time and cfg.max_time > 0):
        raise TrainError(
            f"train.schedule is wsd_time but train.max_time is {cfg.max_time}; expected seconds > 0."
        )
    if cfg.max_steps <= 0:
        raise TrainError(f"train.max_steps is {cfg.max_steps}; expected a positive integer.")
    if not 0.0 <= cfg.decay_fraction <= 1.0:
        raise TrainError(f"train.decay_fraction is {cfg.decay_fraction}; expected a number in [0, 1].")
    for key in ("lr", "min_lr", "decay_fraction"):
        if not math.isfinite(getattr(cfg, key)):
            raise TrainError(f"train.{key} is {getattr(cfg, key)}; expected a finite number.")
    if cfg.warmup_steps >= cfg.max_steps:
        raise TrainError(
            f"train.warmup_steps ({cfg.warmup_steps}) is not below train.max_steps ({cfg.max_steps}): the run "
            "would end before the learning rate reaches its peak. Lower train.warmup_steps."
        )
    if cfg.lr <= 0 or cfg.min_lr < 0:
        raise TrainError(
            f"train.lr is {cfg.lr} and train.min_lr is {cfg.min_lr}; expected lr > 0 and min_lr >= 0."
        )
    if cfg.min_lr > cfg.lr:
        raise TrainError(f"train.min_lr ({cfg.min_lr}) is above train.lr ({cfg.lr}); expected min_lr <= lr.")


def _decay_factor(progress: float, shape: str) -> float:
    """1 at the start of a decay, 0 at its end, for progress in [0, 1]."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # sqrt


def lr_at(step: int, cfg: TrainConfig, timed_decay: Optional[TimedDecay] = None) -> float:
    """The learning rate for optimizer step `step` (0-based) under `cfg`'s schedule (wsd_time: and its decision,
    None while the decay has not started)."""
    check_schedule(cfg)
    if step < 0:
        raise TrainError(f"lr_at got step {step}; expected a step >= 0.")
    warmup, max_steps, peak, floor = cfg.warmup_steps, cfg.max_steps, cfg.lr, cfg.min_lr
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd_time":
        if timed_decay is None or step < timed_decay.start_step:
            return peak
        progress = min(1.0, (step - timed_decay.start_step + 1) / timed_decay.steps)
        return floor + (peak - floor) * _decay_factor(progress, cfg.decay_shape)
    if step >= max_steps:
        return floor
    if cfg.schedule == "wsd":
        decay_start = max(warmup, max_steps - round(cfg.decay_fraction * max_steps))
        if step < decay_start:
            return peak
        progress = (step - decay_start) / (max_steps - decay_start)
        return floor + (peak - floor) * _decay_factor(progress, cfg.decay_shape)
    progress = (step - warmup) / (max_steps - warmup)
    shape = "cosine" if cfg.schedule == "cosine" else "linear"
    return floor + (peak - floor) * _decay_factor(progress, shape)
