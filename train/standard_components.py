"""The components every `slm train` run has, each on the cadence its config field sets.

    TrainMetrics   log.every          a train row (loss, lr, grad_norm, tokens/s, MFU...) every N steps and at the end
    Evaluator      eval.every         validation loss/ppl/bpb (and per source) every N steps, at the end and on time-out
    DownstreamEval eval.downstream    a row per task (train.downstream.component) every N steps, at the end and on time-out
    Checkpointer   checkpoint.every   a checkpoint every N steps and whenever the loop ends
    Exporter       export.every       a Hugging Face folder of that step's checkpoint every N steps (0: off)
    DoneMarker     (always)           run.dir/DONE once max_steps is reached; removed when a run continues
    Profiler       profile.steps      a torch profiler trace of steps [a, b] into run.dir/profile/ (off by default)

`COMPONENTS` lists them in the order the loop calls them (a step's checkpoint is saved after its evaluation, and
exported after it is saved). See `train.components` for the interface.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any, Callable, List, Optional

import torch

from common.atomic import atomic_write_text
from common.files import GIB
from model.stats import flops_per_token
from train.components import Component, LoopRun, StepEvent, every
from train.config import Config
from train.distributed import barrier, on_main_then_share
from train.downstream.component import DownstreamEval
from train.evaluate import evaluate, evaluate_sources
from train.handoff.export import export
from train.mfu import mfu, peak_flops_per_device
from train.profiler import Profiler

DONE_FILE = "DONE"


def _as_float(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


def grad_norm_now(engine: Any) -> Optional[float]:
    """Global gradient norm before the step, for the engines that do not compute one (ZeRO 0 in fp32)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.nn.utils.get_total_norm(grads))


def peak_memory_bytes(device: torch.device) -> int:
    """This rank's peak memory since the last train row: on a GPU what torch allocated (the counter is reset
    here), on a CPU the process's peak resident set (ru_maxrss, which only grows)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class TrainMetrics(Component):
    """Train rows: the mean loss, throughput, MFU and data wait (share of step time) since the previous row, and
    where the run stands: the last step, time elapsed in this invocation and an ETA (bounded by train.max_time)."""

    name = "train_metrics"

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.grad_norm: Optional[float] = None
        self._reset_window()

    @classmethod
    def from_config(cls, cfg: Config) -> TrainMetrics:
        return cls(cfg.log.every)

    def _reset_window(self) -> None:
        self.loss_sum, self.finite_steps, self.steps, self.seconds, self.data_seconds = 0.0, 0, 0, 0.0, 0.0

    def on_rollback(self, run: LoopRun) -> None:
        self._reset_window()  # the steps since the checkpoint were undone

    def _log_now(self, run: LoopRun, event: StepEvent) -> bool:
        return (
            every(self.log_every, event.number) or event.last
        )  # the last row too when time or a signal ends the run

    def on_start(self, run: LoopRun) -> None:
        self.flops_per_token = flops_per_token(run.plan.model(run.cfg.model), run.plan.seq_len)
        peak, device = run.cfg.log.peak_flops, run.dist_info.device
        if peak is None and device.type == "cuda":
            peak = peak_flops_per_device(torch.cuda.get_device_name(device), run.cfg.train.precision)
        self.peak_flops = peak
        self.pace_since = (
            time.time(),
            run.progress.step,
        )  # the ETA's pace: wall time per step, evals included

    def before_optimizer_step(self, run: LoopRun, event: StepEvent) -> None:
        self.grad_norm = None
        if self._log_now(run, event) and run.plain_optimizer and not event.nonfinite:
            self.grad_norm = grad_norm_now(run.engine)  # before the step, as DeepSpeed reports its own

    def after_step(self, run: LoopRun, event: StepEvent) -> None:
        if not event.nonfinite:
            self.loss_sum += event.mean_loss
            self.finite_steps += 1
        self.steps += 1
        self.seconds += event.seconds
        self.data_seconds += event.data_seconds
        if not self._log_now(run, event):
            return
        grad_norm = self.grad_norm
        if grad_norm is None and not run.plain_optimizer:
            grad_norm = _as_float(run.engine.get_global_grad_norm())
        tokens_per_second = run.plan.tokens_per_step * self.steps / max(self.seconds, 1e-9)
        row = {
            "step": event.number,
            "loss": self.loss_sum / self.finite_steps if self.finite_steps else float("nan"),
            "lr": event.lr,
            "grad_norm": grad_norm,
            "tokens": run.progress.tokens_seen,
            "tokens_per_second": tokens_per_second,
            "mfu": mfu(self.flops_per_token, tokens_per_second, self.peak_flops, run.dist_info.world_size),
            "step_ms": 1000 * self.seconds / self.steps,
            "data_wait": self.data_seconds / max(self.seconds, 1e-9),
            "skipped_steps": run.progress.skipped_steps,
        }
        if row["mfu"] is None:  # no known peak (CPU, unlisted GPU): leave it out rather than log a blank
            del row["mfu"]
        row["peak_memory_gib"] = peak_memory_bytes(run.dist_info.device) / GIB
        row.update(self.progress_fields(run, event.number))
        run.logger.log(row)
        self._reset_window()

    def progress_fields(self, run: LoopRun, step: int) -> dict:
        """max_steps (where the run ends), elapsed_s (since this invocation started, the clock of train.max_time),
        eta_s (steps left at this invocation's pace, evaluations and checkpoints included; never past the time
        budget) and, with train.max_time, time_left_s."""
        now = time.time()
        elapsed = now - run.started
        since, first_step = self.pace_since
        eta = (run.last_step - step) * (now - since) / (step - first_step) if step > first_step else None
        fields = {"max_steps": run.last_step, "elapsed_s": elapsed}
        max_time = run.cfg.train.max_time
        if max_time is not None:
            fields["time_left_s"] = max(max_time - elapsed, 0.0)
            eta = fields["time_left_s"] if eta is None else min(eta, fields["time_left_s"])
        if eta is not None:
            fields["eta_s"] = eta
        return fields


class Evaluator(Component):
    """Validation loss on the fixed validation batches (collective)."""

    name = "evaluator"

    def __init__(self, eval_every: int) -> None:
        self.eval_every = eval_every

    @classmethod
    def from_config(cls, cfg: Config) -> Evaluator:
        return cls(cfg.eval.every)

    def after_step(self, run: LoopRun, event: StepEvent) -> None:
        due = event.finished or event.timed_out or every(self.eval_every, event.number)
        if due and not event.stop_requested:  # a signal leaves little time: save, skip the evaluation
            if run.val_sources:  # several sources: each one apart, and the mixed figure from them
                result = evaluate_sources(run.engine, run.val_sources, run.dist_info.device)
            else:
                result = evaluate(run.engine, run.val_batches, run.dist_info.device, run.bytes_per_token)
            run.logger.log({"step": run.progress.step, "tokens": run.progress.tokens_seen, **result})


class Checkpointer(Component):
    """Checkpoints on checkpoint.every and whenever the loop ends (finished, timed out or stopped)."""

    name = "checkpointer"

    def __init__(self, ckpt_every: int) -> None:
        self.ckpt_every = ckpt_every

    @classmethod
    def from_config(cls, cfg: Config) -> Checkpointer:
        return cls(cfg.checkpoint.every)

    def after_step(self, run: LoopRun, event: StepEvent) -> None:
        if event.last or every(self.ckpt_every, event.number):
            run.checkpoints.ensure_saved(
                run.progress, wait=False
            )  # checkpoint.async_save: finished in a thread


class Exporter(Component):
    """export.every: a Hugging Face folder of this step's checkpoint under run.dir/exports/ (rank 0)."""

    name = "exporter"

    def __init__(self, export_every: int, dtype: str = "bf16") -> None:
        self.export_every = export_every
        self.dtype = dtype

    @classmethod
    def from_config(cls, cfg: Config) -> Optional[Exporter]:
        return cls(cfg.export.every, cfg.export.dtype) if cfg.export.every > 0 else None

    def after_step(self, run: LoopRun, event: StepEvent) -> None:
        if not every(self.export_every, event.number):
            return
        step_dir = run.checkpoints.ensure_saved(run.progress)
        out_dir = run.run_dir / "exports" / step_dir.name
        on_main_then_share(
            run.dist_info,
            lambda: export(step_dir, out_dir, dtype=self.dtype, verify=False, force=True),
            "Export",
        )
        run.say(f"exported {out_dir}")


class DoneMarker(Component):
    """run.dir/DONE when max_steps is reached (a Slurm requeue loop stops on it); removed when a run continues."""

    name = "done_marker"

    @classmethod
    def from_config(cls, cfg: Config) -> DoneMarker:
        return cls()

    def on_start(self, run: LoopRun) -> None:
        done = run.run_dir / DONE_FILE
        if run.dist_info.is_main and run.progress.step < run.last_step and done.exists():
            done.unlink()
        barrier()

    def on_end(self, run: LoopRun, reason: str) -> None:
        if reason != "finished":
            return
        if run.dist_info.is_main:
            atomic_write_text(run.run_dir / DONE_FILE, f"finished at step {run.progress.step}\n")
        barrier()


COMPONENTS: List[Callable[[Config], Optional[Component]]] = [
    TrainMetrics.from_config,
    Evaluator.from_config,
    DownstreamEval.from_config,
    Checkpointer.from_config,
    Exporter.from_config,
    DoneMarker.from_config,
    Profiler.from_config,
]
"""Factories of the standard components, in call order; a factory returns None when its config turns it off."""


def standard_components(cfg: Config) -> List[Component]:
    """The standard components this config enables, in call order."""
    return [component for component in (factory(cfg) for factory in COMPONENTS) if component is not None]
