"""Learning-rate schedules as pure functions of the optimizer step.

A pure function (no scheduler object, no state) means a resumed run needs nothing but its step to
get the same learning rate, and the curve can be tested and plotted without training.

`step` counts optimizer updates already taken: 0 is the first update. Every schedule starts with
a linear warmup from near zero, nanoGPT style: lr * (step + 1) / warmup_steps, so step 0 is never
exactly 0 (a wasted update) and the last warmup step, warmup_steps - 1, reaches the peak lr (optim.lr). Then:

- cosine: half a cosine from lr down to min_lr, reaching min_lr at max_steps.
- wsd (warmup-stable-decay): hold lr, then decay to min_lr over the final
  decay_fraction * max_steps steps, with decay_shape linear, cosine or sqrt (1 - sqrt(progress),
  the shape of the WSD papers: Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations"; MiniCPM, Hu et al. 2024).
- wsd_time: wsd fitted to a time budget (train.max_time) when the step count is unknown: hold lr until
  (1 - decay_fraction) * max_time has elapsed, then decay over the steps estimated to fit the rest of the
  budget (`plan_time_decay`, from the measured seconds per step). That decision is made once, by every rank
  alike, and kept in the checkpoint (`TimedDecay` in Progress), so a resumed run replays the same curve; the
  run then ends when the decay does (the plan's max_steps stays an upper bound).
- linear: a straight line from lr down to min_lr at max_steps.
- constant: lr after warmup.

At and beyond max_steps the decaying schedules stay at min_lr (constant stays at lr).

Continued pretraining (train.stage=cpt) re-warms with the same functions: the CPT run starts at
step 0 with its own schedule.warmup_steps, max_steps, optim.lr and schedule.min_lr, so it warms up again from near zero
and decays over its own length; nothing special is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from common.checks import check_choice, check_finite_fields
from train.errors import TrainError

SCHEDULES = ("cosine", "wsd", "wsd_time", "linear", "constant")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


@dataclass(frozen=True)
class ScheduleConfig:
    """The `schedule` section: the learning-rate curve over the run (its peak is optim.lr)."""

    name: str = "cosine"
    """cosine (warmup then cosine), wsd (warmup-stable-decay), wsd_time (wsd fitted to train.max_time), linear, or
    constant."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to optim.lr."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final decay (wsd_time: fraction of train.max_time)."""
    decay_time_margin: float = 0.9
    """wsd_time: the share of the time left at the decision that the decay is planned to fill (the rest absorbs
    steps that turn slower, so the clock does not stop the run before min_lr)."""
    decay_shape: str = "linear"
    """wsd: shape of the final decay: linear, cosine or sqrt."""

    def validate(self) -> None:
        """Raise ValueError naming the key (the checks against optim.lr and train.* are Config.validate's, the one
        against a max_steps derived from train.max_tokens train.plan's)."""
        check_choice("schedule.name", self.name, SCHEDULES)
        check_choice("schedule.decay_shape", self.decay_shape, DECAY_SHAPES)
        check_finite_fields(self, "schedule")
        if self.min_lr < 0:
            raise ValueError(
                f"config key 'schedule.min_lr' is {self.min_lr}; expected 0 or a positive number."
            )
        if self.warmup_steps < 0:
            raise ValueError(
                f"config key 'schedule.warmup_steps' is {self.warmup_steps}; expected 0 or a positive integer."
            )
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(
                f"config key 'schedule.decay_fraction' is {self.decay_fraction}; expected a number in [0, 1]."
            )
        if not 0.0 < self.decay_time_margin <= 1.0:
            raise ValueError(
                f"config key 'schedule.decay_time_margin' is {self.decay_time_margin}; expected a number in (0, 1]."
            )


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


def decay_due(elapsed: float, schedule: ScheduleConfig, max_time: Optional[float]) -> bool:
    """wsd_time: whether the decay should start now, `elapsed` seconds into the time budget (train.max_time)."""
    return schedule.name == "wsd_time" and elapsed >= (1.0 - schedule.decay_fraction) * float(max_time)


def plan_time_decay(
    start_step: int, elapsed: float, seconds_per_step: float, schedule: ScheduleConfig, max_time: float
) -> TimedDecay:
    """The decay that fills schedule.decay_time_margin of the rest of train.max_time at `seconds_per_step`; at least
    one step. The margin is there because steps may turn slower later (a busy machine, checkpoints)."""
    remaining = max(0.0, float(max_time) - elapsed) * schedule.decay_time_margin
    return TimedDecay(start_step, max(1, int(remaining / max(seconds_per_step, 1e-9))))


def _decay_factor(progress: float, shape: str) -> float:
    """1 at the start of a decay, 0 at its end, for progress in [0, 1]."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # sqrt


def lr_at(
    step: int, schedule: ScheduleConfig, peak: float, max_steps: int, timed_decay: Optional[TimedDecay] = None
) -> float:
    """The learning rate for optimizer step `step` (0-based) under `schedule` with peak `peak` (optim.lr) over
    `max_steps` (the run plan's) (wsd_time: and its decision, None while the decay has not started). The settings
    were validated once, with the config and the plan; nothing is re-checked here."""
    if step < 0:
        raise TrainError(f"lr_at got step {step}; expected a step >= 0.")
    warmup, floor = schedule.warmup_steps, schedule.min_lr
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule.name == "constant":
        return peak
    if schedule.name == "wsd_time":
        if timed_decay is None or step < timed_decay.start_step:
            return peak
        progress = min(1.0, (step - timed_decay.start_step + 1) / timed_decay.steps)
        return floor + (peak - floor) * _decay_factor(progress, schedule.decay_shape)
    if step >= max_steps:
        return floor
    if schedule.name == "wsd":
        decay_start = max(warmup, max_steps - round(schedule.decay_fraction * max_steps))
        if step < decay_start:
            return peak
        progress = (step - decay_start) / (max_steps - decay_start)
        return floor + (peak - floor) * _decay_factor(progress, schedule.decay_shape)
    progress = (step - warmup) / (max_steps - warmup)
    shape = "cosine" if schedule.name == "cosine" else "linear"
    return floor + (peak - floor) * _decay_factor(progress, shape)
