"""The component interface: things that act on a cadence around the step loop.

The loop (`train.loop.TrainingLoop`) only takes steps. Everything else that happens every N steps or at the end
(metrics rows, evaluation, checkpoints, exports, the DONE marker; later downstream evals and profiling) is a
`Component`. The loop calls every component's hooks, in list order, at four fixed points:

    on_start(run)                      once, before the first step (after any resume)
    for each step:
        forward + backward, one all-reduce of the step's status
        before_optimizer_step(run, e)  right after forward-backward, before the optimizer step (gradients live)
        optimizer step; run.progress counts the step
        after_step(run, e)             right after the optimizer step
        (or, when the stability guard rolls back instead, on_rollback(run) and no after_step)
    on_end(run, reason)                once, after the last step: "finished", "timed_out" or "stopped"

Each component decides its own cadence from its own config section (`every(n, e.number)`, `e.last`,
`e.finished`...); the loop never asks. Hooks run on every rank, so a component doing collective work (an
evaluation, a checkpoint) simply does it in the hook; one that writes files checks `run.dist_info.is_main`.

Adding a component is one class here or anywhere (subclass `Component`, override the hooks it needs) plus the
config field that sets its cadence; register it in `train.standard_components.COMPONENTS` (or pass it to
`run_training(cfg, extra_components=[...])`). The loop does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

from common.log import say
from train.checkpoint import CheckpointSaver, Progress
from train.config import Config
from train.distributed import DistInfo
from train.evaluate import ValSource
from train.plan import RunPlan

if TYPE_CHECKING:
    from train.batch import Batch
    from train.metrics import MetricsLogger

END_REASONS = ("finished", "timed_out", "stopped")
"""Why the loop ended: max_steps reached, train.max_time spent, or a stop signal (SIGTERM/SIGUSR1)."""


def every(n: int, step: int) -> bool:
    """The usual cadence test: true on every n-th step (1-based); never when n <= 0 (disabled)."""
    return n > 0 and step % n == 0


@dataclass(frozen=True)
class StepEvent:
    """What the loop tells the components about one step (the same on every rank)."""

    number: int
    """The step being taken, 1-based as logged and as checkpoint names."""
    lr: float
    """The learning rate of this step."""
    mean_loss: float
    """The step's loss averaged over micro-batches and ranks (NaN/inf when non-finite)."""
    nonfinite: bool
    """Some rank saw a non-finite loss or gradient (the optimizer step is skipped or the run stops)."""
    finished: bool
    """This is the run's last step (train.max_steps, or the end of a wsd_time decay)."""
    timed_out: bool
    """train.max_time is spent and the run stops after this step (never together with `finished`)."""
    stop_requested: bool
    """A rank received SIGTERM/SIGUSR1: the run saves and exits after this step (no evaluation)."""
    seconds: float = 0.0
    """Wall time of the step (forward-backward through optimizer step); 0 in before_optimizer_step."""
    data_seconds: float = 0.0
    """Of `seconds`, the time spent waiting for the step's batches (next() on the train loader)."""
    rolled_back: bool = False
    """The stability guard rolled the run back to its last checkpoint instead of taking this step."""

    @property
    def last(self) -> bool:
        """The loop ends after this step."""
        return self.finished or self.timed_out or self.stop_requested


@dataclass
class LoopRun:
    """What components may read and use: the run's parts, shared by the loop and every component."""

    cfg: Config
    """The config of this run as loaded (resolved and validated; never rewritten)."""
    dist_info: DistInfo
    """Rank, world size, device."""
    plan: RunPlan
    """What the run derived: batch arithmetic, tokens per step, max_steps, world size, vocab_size."""
    engine: Any
    """The DeepSpeed engine (engine.module is the Transformer; engine.optimizer its optimizer)."""
    progress: Progress
    """Step, tokens seen, skipped steps (updated by the loop after each optimizer step)."""
    logger: MetricsLogger
    """Metric rows to console, metrics.jsonl and wandb (rank 0 writes; every rank may call)."""
    checkpoints: CheckpointSaver
    """Saves checkpoints (collective); `ensure_saved` saves at most once per step."""
    val_batches: List[Batch]
    """This rank's fixed validation batches."""
    bytes_per_token: Optional[float]
    """Text bytes per validation token (None for instruction data), for bits per byte."""
    started: float
    """time.time() when this invocation started (train.max_time counts from it)."""
    plain_optimizer: bool = False
    """ZeRO 0 in fp32: DeepSpeed hands the step to our optimizer, with no grad norm, non-finite skip or clipping of its
    own (the loop clips: train.deepspeed_config.plain_optimizer)."""
    val_sources: List[ValSource] = field(default_factory=list)
    """With several data sources, each one's own fixed validation batches (val_batches then holds them all)."""

    @property
    def last_step(self) -> int:
        """The step the run ends at: max_steps, or sooner when a wsd_time decay (recorded in progress) ends first."""
        decay = self.progress.timed_decay
        return min(self.plan.max_steps, decay.end_step) if decay is not None else self.plan.max_steps

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    def say(self, message: str) -> None:
        """A status line on rank 0's stderr (common.log.say)."""
        say(message, self.dist_info.is_main)


class Component:
    """Base class of a cadence component: every hook is a no-op until overridden.

    Hooks run on every rank in the order the components are listed, and must either do the same
    collective calls on every rank or none (decide from the event and the config, never from rank-local state).
    """

    name: str = "component"
    """Short name for messages."""

    def on_start(self, run: LoopRun) -> None:
        """Runs once before the first step, after resume (run.progress is the resumed step; 0 on a fresh run)."""

    def before_optimizer_step(self, run: LoopRun, event: StepEvent) -> None:
        """Runs right after forward-backward and the ranks' agreement, before the optimizer step (gradients live)."""

    def after_step(self, run: LoopRun, event: StepEvent) -> None:
        """Runs right after the optimizer step; run.progress already counts this step."""

    def on_rollback(self, run: LoopRun) -> None:
        """Runs when the stability guard rolled the run back to its last checkpoint (run.progress is that step's):
        drop whatever was accumulated since."""

    def on_end(self, run: LoopRun, reason: str) -> None:
        """Runs once after the last step; reason is one of END_REASONS."""
