"""LR schedules: exact values at the key steps, shapes of the segments, continuity, floors, bad settings (refused
once, by the config's validation and the run's plan, never by the per-step function)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import pytest

from train import schedule as schedule_module
from train.config import Config, OptimConfig, TrainConfig
from train.errors import TrainError
from train.plan import plan_run
from train.schedule import ScheduleConfig, TimedDecay


@dataclass(frozen=True)
class Setting:
    """What a learning-rate curve depends on: the schedule section, optim.lr, the plan's max_steps and
    train.max_time."""

    schedule: str = "cosine"
    lr: float = 1.0
    min_lr: float = 0.1
    warmup_steps: int = 10
    max_steps: int = 110
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    decay_time_margin: float = 0.9
    max_time: Optional[float] = None

    @property
    def section(self) -> ScheduleConfig:
        return ScheduleConfig(
            self.schedule,
            self.min_lr,
            self.warmup_steps,
            self.decay_fraction,
            self.decay_time_margin,
            self.decay_shape,
        )

    def config(self) -> Config:
        return Config(
            train=TrainConfig(max_steps=self.max_steps, max_time=self.max_time),
            optim=OptimConfig(lr=self.lr),
            schedule=self.section,
        )


def lr_at(step: int, cfg: Setting, timed_decay: Optional[TimedDecay] = None) -> float:
    return schedule_module.lr_at(step, cfg.section, cfg.lr, cfg.max_steps, timed_decay)


def decay_due(elapsed: float, cfg: Setting) -> bool:
    return schedule_module.decay_due(elapsed, cfg.section, cfg.max_time)


def plan_time_decay(start_step: int, elapsed: float, seconds_per_step: float, cfg: Setting) -> TimedDecay:
    return schedule_module.plan_time_decay(start_step, elapsed, seconds_per_step, cfg.section, cfg.max_time)


# Peak 1.0 and floor 0.1 make every expected value easy to read off.
BASE = Setting(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, decay_fraction=0.2)
ALL = [replace(BASE, schedule=s) for s in ("cosine", "linear", "constant")] + [
    replace(BASE, schedule="wsd", decay_shape=shape) for shape in ("linear", "cosine", "sqrt")
]


def curve(cfg: Setting, extra: int = 20) -> list:
    cfg.config().validate()  # every curve tested is a valid setting
    return [lr_at(step, cfg) for step in range(cfg.max_steps + extra)]


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.schedule}-{c.decay_shape}")
def test_warmup_is_linear_from_near_zero_and_reaches_peak(cfg):
    assert lr_at(0, cfg) == pytest.approx(0.1)  # lr * 1 / 10: never exactly 0
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)  # the last warmup step is the peak
    warm = [lr_at(s, cfg) for s in range(10)]
    assert all(b - a == pytest.approx(0.1) for a, b in zip(warm, warm[1:]))


def test_cosine_exact_values():
    cfg = replace(BASE, schedule="cosine")
    assert lr_at(10, cfg) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(10_000, cfg) == pytest.approx(0.1)


def test_linear_exact_values():
    cfg = replace(BASE, schedule="linear")
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(85, cfg) == pytest.approx(0.325)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    diffs = [lr_at(s + 1, cfg) - lr_at(s, cfg) for s in range(10, 110)]
    assert all(d == pytest.approx(-0.009) for d in diffs)  # a straight line


def test_constant_stays_at_peak_beyond_max_steps():
    cfg = replace(BASE, schedule="constant")
    assert [lr_at(s, cfg) for s in (10, 60, 109, 110, 500)] == [1.0] * 5


@pytest.mark.parametrize(
    "shape, at_quarter", [("linear", 0.75), ("cosine", 0.5 * (1 + math.cos(math.pi / 4))), ("sqrt", 0.5)]
)
def test_wsd_stable_then_decay(shape, at_quarter):
    cfg = replace(BASE, schedule="wsd", decay_shape=shape, max_steps=100)  # decay over steps 80..100
    assert [lr_at(s, cfg) for s in (10, 50, 79, 80)] == [1.0] * 4
    assert lr_at(85, cfg) == pytest.approx(0.1 + 0.9 * at_quarter)  # progress 5/20 = 1/4
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(150, cfg) == pytest.approx(0.1)
    # The three shapes share endpoints but differ inside: sqrt drops fastest, cosine slowest at first.
    if shape == "sqrt":
        assert (
            lr_at(81, cfg)
            < lr_at(81, replace(cfg, decay_shape="linear"))
            < lr_at(81, replace(cfg, decay_shape="cosine"))
        )


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.schedule}-{c.decay_shape}")
def test_monotonic_continuous_and_floored(cfg):
    lrs = curve(cfg)
    warmup, rest = lrs[:10], lrs[10:]
    assert all(b > a for a, b in zip(warmup, warmup[1:]))  # strictly rising warmup
    assert all(b <= a + 1e-12 for a, b in zip(rest, rest[1:]))  # never rises after warmup
    assert min(rest) >= cfg.min_lr - 1e-12  # never below the floor after warmup
    assert max(lrs) == pytest.approx(cfg.lr) and max(lrs) <= cfg.lr + 1e-12
    # No jump larger than the warmup increment (continuity at the warmup, stable/decay and end boundaries),
    # except 1-sqrt's first decay step, steep by design: 0.9 * sqrt(1/22) over its 22 decay steps.
    largest = 0.9 * math.sqrt(1 / 22) if cfg.decay_shape == "sqrt" and cfg.schedule == "wsd" else 0.1
    assert max(abs(b - a) for a, b in zip(lrs, lrs[1:])) == pytest.approx(largest)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "linear", "constant"])
def test_zero_warmup_starts_at_peak(schedule):
    cfg = replace(BASE, schedule=schedule, warmup_steps=0)
    assert lr_at(0, cfg) == pytest.approx(1.0)
    if schedule in ("cosine", "linear"):
        assert lr_at(55, cfg) == pytest.approx(0.55)  # halfway of 110 steps
    assert lr_at(110, cfg) == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_warmup_not_shorter_than_run_is_refused_and_cpt_rewarm():
    # A warmup as long as the run would never reach the peak learning rate: refused, naming the key, by the
    # config's validation (train.max_steps) or, when train.max_tokens sets max_steps, once by the run's plan.
    for warmup in (100, 200):
        cfg = replace(BASE, schedule="cosine", warmup_steps=warmup, max_steps=100).config()
        with pytest.raises(ValueError, match="schedule.warmup_steps"):
            cfg.validate()
        budget = replace(cfg, train=replace(cfg.train, max_tokens=100 * 8 * cfg.model.max_seq_len))
        budget.validate()  # max_steps is not known before the plan
        with pytest.raises(TrainError, match="schedule.warmup_steps"):
            plan_run(budget, world_size=1)
    assert plan_run(replace(budget, schedule=replace(budget.schedule, warmup_steps=99)), 1).max_steps == 100
    # A CPT run re-warms with its own warmup and length: its step 0 is a warmup step again.
    cpt = replace(BASE, schedule="wsd", lr=0.3, min_lr=0.03, warmup_steps=5, max_steps=50)
    assert lr_at(0, cpt) == pytest.approx(0.06) and lr_at(4, cpt) == pytest.approx(0.3)
    assert lr_at(50, cpt) == pytest.approx(0.03)


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(schedule="step"), "schedule.name"),
        (dict(decay_shape="exp"), "schedule.decay_shape"),
        (dict(decay_fraction=1.5), "schedule.decay_fraction"),
        (dict(min_lr=2.0), "schedule.min_lr"),
        (dict(warmup_steps=-1), "schedule.warmup_steps"),
        (dict(lr=float("nan")), "optim.lr"),
        (dict(min_lr=float("inf")), "schedule.min_lr"),
    ],
)
def test_bad_settings_name_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        replace(BASE, **change).config().validate()


TIMED = replace(BASE, schedule="wsd_time", max_time=100.0, decay_fraction=0.2, max_steps=10_000)


def test_wsd_time_holds_until_decided_then_decays_to_min_lr_on_its_last_step():
    assert [lr_at(s, TIMED) for s in (0, 9)] == [pytest.approx(0.1), pytest.approx(1.0)]  # the usual warmup
    assert [lr_at(s, TIMED) for s in (10, 500, 9_999, 20_000)] == [1.0] * 4  # no decision yet: hold the peak
    decay = TimedDecay(start_step=40, steps=20)
    assert decay.end_step == 60
    assert [lr_at(s, TIMED, decay) for s in (10, 39)] == [1.0, 1.0]
    assert lr_at(40, TIMED, decay) == pytest.approx(
        0.1 + 0.9 * 19 / 20
    )  # the first decay step already lowers it
    assert lr_at(49, TIMED, decay) == pytest.approx(0.55)  # halfway
    assert lr_at(59, TIMED, decay) == pytest.approx(0.1)  # the run's last step (end_step 60) runs at min_lr
    assert lr_at(80, TIMED, decay) == pytest.approx(0.1)
    diffs = [lr_at(s + 1, TIMED, decay) - lr_at(s, TIMED, decay) for s in range(40, 59)]
    assert all(d == pytest.approx(-0.9 / 20) for d in diffs)  # linear by default
    sqrt = replace(TIMED, decay_shape="sqrt")
    assert lr_at(44, sqrt, decay) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))


def test_wsd_time_decision_from_the_clock():
    assert not decay_due(79.9, TIMED) and decay_due(80.0, TIMED) and decay_due(130.0, TIMED)
    assert not decay_due(99.0, replace(TIMED, schedule="wsd"))  # only wsd_time decides from the clock
    # 80.5 s spent of 100 at 0.25 s per step: 19.5 s left, of which 90% (17.55 s) fit 70 steps.
    assert plan_time_decay(321, 80.5, 0.25, TIMED) == TimedDecay(321, 70)
    assert plan_time_decay(321, 80.5, 0.25, replace(TIMED, decay_time_margin=0.5)) == TimedDecay(321, 39)
    assert plan_time_decay(5, 150.0, 0.25, TIMED) == TimedDecay(
        5, 1
    )  # over budget already: one step to min_lr


def test_wsd_time_needs_a_time_budget():
    TIMED.config().validate()
    with pytest.raises(ValueError, match="train.max_time"):
        replace(TIMED, max_time=None).config().validate()
