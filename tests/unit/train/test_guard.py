"""train.guard: the spike judgement (z-score over a window, warm-up, spikes kept out of the baseline), its config
checks, and the loop's gradient-norm measurement it reads."""

from __future__ import annotations

import math

import pytest
import torch

from model import ModelConfig, Transformer
from train.guard import GuardConfig, SpikeGuard
from train.loop import NonfiniteWatch


def test_a_spike_is_judged_against_the_window_and_kept_out_of_it():
    guard = SpikeGuard(GuardConfig(action="warn", window=4, warmup=3, threshold=3.0, min_std_fraction=0.0))
    assert [guard.judge(s, "loss", v) for s, v in enumerate([5.0, 4.0, 100.0], 1)] == [None] * 3  # warm-up
    assert guard.state["loss"] == [5.0, 4.0, 100.0]
    guard = SpikeGuard(GuardConfig(action="warn", window=4, warmup=3, threshold=3.0, min_std_fraction=0.0))
    for step, value in enumerate([4.0, 4.2, 3.9, 4.1], 1):
        assert guard.judge(step, "loss", value) is None
    spike = guard.judge(5, "loss", 9.0)
    window = [4.0, 4.2, 3.9, 4.1]
    mean = sum(window) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in window) / 3)
    assert spike is not None and (spike.step, spike.signal, spike.window) == (5, "loss", 4)
    assert spike.mean == pytest.approx(mean) and spike.z == pytest.approx((9.0 - mean) / std)
    assert guard.state["loss"] == window  # the spike never enters the baseline
    assert guard.judge(6, "loss", 3.0) is None  # a drop is no spike
    assert guard.state["loss"] == [4.2, 3.9, 4.1, 3.0]  # the window keeps the last `window` values
    assert guard.judge(7, "loss", float("nan")) is None and len(guard.state["loss"]) == 4
    row = spike.row("skip", 3.0)
    assert row["kind"] == "spike" and row["action"] == "skip" and row["value"] == 9.0


def test_the_std_floor_keeps_a_flat_curve_quiet():
    flat = dict(action="warn", window=5, warmup=3, threshold=6.0)
    guard = SpikeGuard(GuardConfig(**flat))  # min_std_fraction 0.01 of the mean
    for step in range(1, 4):
        guard.judge(step, "grad_norm", 1.0)
    assert guard.judge(4, "grad_norm", 1.07) is not None  # 7 floored stds (a spike stays out of the window)
    assert guard.judge(5, "grad_norm", 1.05) is None  # 5
    exact = SpikeGuard(GuardConfig(**flat, min_std_fraction=0.0))
    for step in range(1, 4):
        exact.judge(step, "grad_norm", 1.0)
    assert exact.judge(4, "grad_norm", 1.0000001) is not None  # zero spread: anything above is a spike


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"action": "abort"}, "'guard.action' is 'abort'; expected one of off, warn, skip, rollback"),
        ({"watch": "lr"}, "'guard.watch' is 'lr'"),
        ({"warmup": 1}, "'guard.warmup' is 1; expected 2 or more"),
        ({"warmup": 60, "window": 50}, "'guard.warmup' (60) is above 'guard.window' (50)"),
        ({"threshold": 0.0}, "'guard.threshold' is 0.0; expected a positive z-score"),
        ({"threshold": float("inf")}, "'guard.threshold' is inf; expected a finite number"),
    ],
)
def test_bad_guard_settings_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GuardConfig(**fields).validate()


def test_the_watch_measures_the_squared_gradient_norm_per_call():
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, vocab_size=64, max_seq_len=8
    )
    model = Transformer(cfg)
    watch = NonfiniteWatch(model, enabled=False, measure_norm=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    _, loss = model(tokens, targets=tokens)
    loss.backward()
    expected = sum(float(p.grad.double().square().sum()) for p in model.parameters())
    assert watch.squared_norm().item() == pytest.approx(expected, rel=1e-5)
    assert watch.squared_norm().item() == 0.0  # each call starts afresh
