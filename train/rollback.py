"""The stability guard's rollback (guard.action=rollback): back to the run's last checkpoint, past the data since.

The engine, the RNGs and the progress (step, tokens, skipped steps, the guard's windows) are loaded from the
checkpoint as a resume would load them; the training loader is not: it keeps its cursor, so the data window
between the checkpoint and the spike is skipped. The rollback is appended to the guard's record
(`Progress.guard["rollbacks"]`: the spike's step, the step rolled back to, the signal and the skipped loader
positions), which the next checkpoint saves. A run resumed from a checkpoint before the spike meets the same
data and makes the same rollback; one resumed after it continues from the recorded state: the same run either way.
"""

from __future__ import annotations

from typing import Any, Dict

from common.log import say
from train.checkpoint import ensure_universal, load_checkpoint, load_mode, read_record
from train.components import LoopRun
from train.distributed import barrier, on_main_then_share
from train.errors import TrainError
from train.guard import Spike, SpikeGuard, fresh_state


def position_of(state: Dict[str, Any]) -> int:
    """The cursor in a loader state: global samples consumed (pretraining) or packed rows (instruction data)."""
    return int(state.get("samples_seen", state.get("cursor", 0)))


def data_position(loader: Any) -> int:
    """The training loader's cursor now."""
    return position_of(loader.state_dict())


def roll_back(run: LoopRun, loader: Any, spike: Spike, max_rollbacks: int) -> None:
    """Load run.checkpoints.last_saved into the engine and the progress (collective); record what was skipped."""
    done = SpikeGuard(run.cfg.guard, run.progress.guard).rollbacks
    if len(done) >= max_rollbacks:
        raise TrainError(
            f"The stability guard would roll back a {len(done) + 1}th time at step {spike.step} ({spike.signal} "
            f"{spike.value:.4g}, {spike.z:.1f} std above its baseline), above guard.max_rollbacks={max_rollbacks}. "
            "Spikes that survive skipping data point at the optimization, not the data: lower optim.lr, raise "
            "schedule.warmup_steps or optim.grad_clip, or raise guard.threshold."
        )
    run.checkpoints.wait()  # rank 0: a background save of that checkpoint completes first (checkpoint.async_save)
    barrier()
    step, step_dir = run.checkpoints.last_saved, run.checkpoints.last_dir
    assert (
        step is not None and step_dir is not None
    )  # the loop handles a spike before any checkpoint as skip/warn
    record = read_record(step_dir)
    universal_dir = None
    if load_mode(record, run.dist_info.world_size, run.cfg.train.zero_stage) == "universal":
        universal_dir = on_main_then_share(  # resumed with another world size: as the resume loaded it
            run.dist_info,
            lambda: ensure_universal(step_dir),
            "Converting the checkpoint to a universal checkpoint",
        )
    skipped_from, skipped_to = position_of(record.loader or {}), data_position(loader)
    load_checkpoint(run.engine, step_dir, run.dist_info.rank, universal_dir)
    restored = record.progress
    state = restored.guard if restored.guard is not None else fresh_state()
    state["rollbacks"] = [
        *done,
        {
            "step": spike.step,
            "to_step": step,
            "signal": spike.signal,
            "skipped_samples": [skipped_from, skipped_to],
        },
    ]
    progress = run.progress
    progress.step, progress.tokens_seen, progress.skipped_steps = (
        restored.step,
        restored.tokens_seen,
        restored.skipped_steps,
    )
    progress.timed_decay, progress.guard = restored.timed_decay, state
    say(
        f"guard: rolled back to {step_dir} (step {step}); loader positions [{skipped_from}, {skipped_to}) "
        f"are skipped ({len(state['rollbacks'])} rollback(s) so far)",
        run.dist_info.is_main,
    )
