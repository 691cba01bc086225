"""schedule.name=wsd_time in real `slm train` runs (2 processes, gloo on CPU): the lr warms up, holds, and decays to
min_lr on the run's last step within train.max_time; the decision taken from the clock is in the checkpoint, so a
run resumed after it replays the same learning rates and losses and ends at the same step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest

from tests.helpers import TINY, run, slm_cmd
from train.checkpoint import find_checkpoint, read_record

pytestmark = pytest.mark.slow

LR, MIN_LR, MAX_TIME = 3e-3, 3e-4, 30  # the decay starts at 18 s: after start-up even on a busy machine
ARGS = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.max_seq_len=32",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "schedule.warmup_steps=2",
    "log.every=1",
    "eval.batches=2",
    "eval.every=100000",
    "checkpoint.every=5",
    "checkpoint.keep=100000",
    "train.max_steps=100000",
    "data.num_workers=0",
    "schedule.name=wsd_time",
    f"train.max_time={MAX_TIME}",
    "schedule.decay_fraction=0.4",
    # the decay ends by step count unless steps turn twice as slow after the decision
    "schedule.decay_time_margin=0.5",
    f"optim.lr={LR}",
    f"schedule.min_lr={MIN_LR}",
]


def train_rows(run_dir: Path) -> List[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def by_step(run_dir: Path, key: str) -> Dict[int, float]:
    return {r["step"]: r[key] for r in train_rows(run_dir)}


def train(run_dir: Path, data_dir: Path, *extra: str):
    return run(
        slm_cmd(["train", TINY, f"run.dir={run_dir}", f"data.dir={data_dir}", *ARGS, *extra], nproc=2),
        timeout=600,
    )


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory, tiny_data_dir) -> Path:
    """The 2-process wsd_time run, shared by the module's tests. Slow (about 40 s on 2 busy cores) by design: the
    schedule is decided by the clock, so the run trains for its train.max_time of 30 s after a torchrun start-up."""
    run_dir = tmp_path_factory.mktemp("wsd_time") / "run"
    out = train(run_dir, tiny_data_dir)
    assert "lr decays to min_lr over the next" in out.stderr, out.stderr[-3000:]
    return run_dir


def test_lr_reaches_min_lr_on_the_last_step_within_the_time_budget(timed_run):
    decay = read_record(find_checkpoint(timed_run)).progress.timed_decay
    start, steps = decay.start_step, decay.steps
    lrs = by_step(timed_run, "lr")  # step n (1-based) ran at lr_at(n - 1)
    last = max(lrs)
    assert last == start + steps, (decay, last)  # the run ended when the decay did, not by the clock
    assert (timed_run / "DONE").is_file()
    assert lrs[last] == pytest.approx(MIN_LR)
    assert [lrs[n] for n in range(2, start + 1)] == [pytest.approx(LR)] * (
        start - 1
    )  # warmup over, then hold
    decaying = [lrs[n] for n in range(start + 1, last + 1)]
    assert all(b < a for a, b in zip([LR] + decaying, decaying)), decaying  # strictly down to min_lr


def test_a_run_resumed_after_the_decision_replays_the_same_schedule(timed_run, tiny_data_dir, tmp_path):
    """Slow (about 30 s on 2 busy cores): a second 2-process run under torchrun, resumed from the first checkpoint
    after the decision and trained to the recorded end of the decay."""
    decay = read_record(find_checkpoint(timed_run)).progress.timed_decay
    start, end = decay.start_step, decay.start_step + decay.steps
    after = sorted(p for p in (timed_run / "checkpoints").glob("step_*") if start < int(p.name[5:]) < end)
    if not after:
        pytest.fail(f"no checkpoint between the decision (step {start}) and the end (step {end}): {decay}")
    resume_from = after[0]
    assert read_record(resume_from).progress.timed_decay == decay
    resumed = tmp_path / "resumed"
    out = train(resumed, tiny_data_dir, f"checkpoint.resume={resume_from}")
    assert "lr decays to min_lr" not in out.stderr  # nothing is decided again: the record is replayed
    from_step = int(resume_from.name[5:])
    reference_lr, again_lr = by_step(timed_run, "lr"), by_step(resumed, "lr")
    assert sorted(again_lr) == list(range(from_step + 1, end + 1))
    assert all(again_lr[n] == reference_lr[n] for n in again_lr), (again_lr, reference_lr)
    reference_loss, again_loss = by_step(timed_run, "loss"), by_step(resumed, "loss")
    assert all(
        again_loss[n] == reference_loss[n] for n in again_loss
    )  # bitwise: the same steps at the same lrs
    assert (
        read_record(find_checkpoint(resumed)).progress.timed_decay == decay and (resumed / "DONE").is_file()
    )
