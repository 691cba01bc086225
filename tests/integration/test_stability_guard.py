"""The stability guard (guard.action) on real 1-process runs, with a loss spike injected by SLM_SPIKE_AT_DATA_STEP
(common.faults: the loss of the step training on data step 5 times 10): warn only logs it, skip drops that step's
update (weights and optimizer state after it equal those before it), rollback reloads the last checkpoint and
skips the data since it, and runs resumed before or after the rollback equal the uninterrupted one bitwise.

About 2 minutes (five short runs of a few seconds of training each, most of it process start-up)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run, slm_cmd
from tests.helpers import test_env as make_env
from tests.runs import ONE_PROC, losses, rows, train_args
from train.checkpoint import read_record, safe_load

pytestmark = pytest.mark.slow

SPIKE = make_env({"SLM_SPIKE_AT_DATA_STEP": "5:10"})
GUARD = ["guard.warmup=3", "guard.window=8", "eval.every=100"]


def guarded(run_dir: Path, data_dir: Path, action: str, *extra: str):
    return run(
        slm_cmd(train_args(run_dir, data_dir, *ONE_PROC, *GUARD, f"guard.action={action}", *extra)), env=SPIKE
    )


def spikes(run_dir: Path) -> list:
    return rows(run_dir, "spike")


def tensors_equal(a: Any, b: Any) -> bool:
    """Every tensor in two nested checkpoint structures equal bitwise (other values are not compared)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return True


def test_warn_logs_the_spike_and_skip_drops_its_update(tiny_data_dir, tmp_path):
    """Slow (about 30 s on 2 busy cores): two 6-step runs, one per action, each its own `slm train` start-up,
    checkpointing every step so that the skipped step's weights can be compared with the step before."""
    warn_dir, skip_dir = tmp_path / "warn", tmp_path / "skip"
    short = ["train.max_steps=6", "checkpoint.every=1", "checkpoint.keep=6"]
    warned = guarded(warn_dir, tiny_data_dir, "warn", *short)
    first = spikes(warn_dir)[0]
    assert (first["step"], first["signal"], first["action"]) == (5, "loss", "warn") and first["z"] > 6
    assert "guard: step 5: loss" in warned.stderr and "spike step 5 | signal loss" in warned.stdout
    warn_losses = losses(warn_dir)
    assert warn_losses[5] > 5 * warn_losses[4]  # the step was taken with the spiked loss
    assert rows(warn_dir)[-1]["skipped_steps"] == 0

    skipped = guarded(skip_dir, tiny_data_dir, "skip", *short)
    assert [(r["step"], r["action"]) for r in spikes(skip_dir)] == [(5, "skip")]
    assert "step 5: a loss spike (guard), step skipped" in skipped.stderr
    skip_losses = losses(skip_dir)
    assert {s: skip_losses[s] for s in range(1, 5)} == {s: warn_losses[s] for s in range(1, 5)}
    assert skip_losses[5] is None and [r["skipped_steps"] for r in rows(skip_dir)] == [0, 0, 0, 0, 1, 1]
    # The skipped step left weights and optimizer state exactly as the step before left them.
    four, five = (skip_dir / "checkpoints" / f"step_0000000{n}" for n in (4, 5))
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        assert tensors_equal(safe_load(four / name), safe_load(five / name)), name
    assert read_record(five).progress.skipped_steps == 1
    three = skip_dir / "checkpoints" / "step_00000003"  # the check can fail: a step taken changes them
    assert not tensors_equal(
        safe_load(three / "mp_rank_00_model_states.pt"), safe_load(four / "mp_rank_00_model_states.pt")
    )


def train_rows(run_dir: Path) -> list:
    return [(r["step"], r["loss"]) for r in rows(run_dir)]


def test_rollback_skips_the_window_and_resumes_exactly_before_and_after_it(tiny_data_dir, tmp_path):
    """Checkpoints at 3, 6, 8; the spike at step 5 rolls back to 3 and skips data steps 4-5 (samples [24, 40)).

    Slow (about 40 s on 2 busy cores): three `slm train` start-ups, the 8-step run and its resumes from after and
    from before the rollback."""
    full = tmp_path / "full"
    cadence = ["train.max_steps=8", "checkpoint.every=3", "checkpoint.keep=3"]
    out = guarded(full, tiny_data_dir, "rollback", *cadence)
    assert [(r["step"], r["action"]) for r in spikes(full)] == [(5, "rollback")]
    assert "guard: rolled back to" in out.stderr and "loader positions [24, 40) are skipped" in out.stderr
    steps = [step for step, _ in train_rows(full)]
    assert steps == [
        1,
        2,
        3,
        4,
        4,
        5,
        6,
        7,
        8,
    ]  # step 4 as first taken, then again on new data after the rollback
    first_4, again_4 = (loss for step, loss in train_rows(full) if step == 4)
    assert first_4 != again_4
    ckpt = full / "checkpoints"
    rollbacks = [{"step": 5, "to_step": 3, "signal": "loss", "skipped_samples": [24, 40]}]
    assert read_record(ckpt / "step_00000006").progress.guard["rollbacks"] == rollbacks
    assert read_record(ckpt / "step_00000003").progress.guard["rollbacks"] == []
    assert read_record(ckpt / "step_00000008").progress.step == 8 and (full / "DONE").is_file()

    # Resumed after the event: the recorded cursor and guard state continue the run bitwise.
    after = tmp_path / "after"
    guarded(after, tiny_data_dir, "rollback", *cadence, f"checkpoint.resume={ckpt / 'step_00000006'}")
    assert train_rows(after) == train_rows(full)[-2:]
    # Resumed before it: the same spike is met and the same rollback made (the spike's data is reached again).
    before = tmp_path / "before"
    guarded(before, tiny_data_dir, "rollback", *cadence, f"checkpoint.resume={ckpt / 'step_00000003'}")
    assert train_rows(before) == train_rows(full)[3:]
    assert [(r["step"], r["value"]) for r in spikes(before)] == [
        (r["step"], r["value"]) for r in spikes(full)
    ]
    assert (
        read_record(before / "checkpoints" / "step_00000008").progress.guard
        == read_record(ckpt / "step_00000008").progress.guard
    )
