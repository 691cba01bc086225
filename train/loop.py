"""The step loop of `slm train`: forward-backward, one agreement across ranks, the optimizer step, and the
components (`train.components`) at fixed points around it.

One optimizer step = `grad_accum_steps` micro-batches of forward + `engine.backward`, then one small
all-reduce of [loss, non-finite flag, stop signal, time up] across ranks, then `engine.step()`.
That all-reduce is the loop's only host synchronisation: it lets every rank agree, before the
optimizer step, on whether the step is non-finite (stop or skip it) and whether to stop after it
(SIGTERM/SIGUSR1 or train.max_time), and it hands rank 0 the step's mean loss for free. DeepSpeed's
own ZeRO step synchronises the host anyway (its overflow / grad-norm check), so this costs nothing
extra; the loss itself stays on the device until then.

The learning rate is a pure function of the step (`train.schedule.lr_at`, over the plan's max_steps),
written into the optimizer's param groups before each step; no DeepSpeed scheduler is used, so a resumed run needs
only its step. The test-only hook SLM_INJECT_NAN_AT_STEP (`common.faults`) poisons one step's loss;
SLM_SPIKE_AT_DATA_STEP multiplies the loss of one data step (for the stability guard, `train.guard`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from common import faults
from train.batch import Batch, batch_loss, to_device
from train.components import Component, LoopRun, StepEvent
from train.errors import TrainError
from train.guard import Spike, SpikeGuard, fresh_state
from train.optim import group_lr
from train.rollback import data_position, roll_back
from train.schedule import decay_due, lr_at, plan_time_decay
from train.signals import EXIT_PREEMPTED, StopRequest


class NonfiniteWatch:
    """Notices a NaN/inf gradient on this rank without a host sync: each parameter's incoming gradient
    adds its sum to a list (on the device); a non-finite element makes the total non-finite. With
    `measure_norm` (the stability guard watching the gradient norm) it also adds the gradient's squared norm.

    Hooks see the local gradient before ZeRO reduces or partitions it, so the check is the same for
    every stage. Under fp16 overflowing scaled gradients are normal (DeepSpeed's loss scaler skips
    those steps), so only the loss is checked there.

    `accumulated` (one rank, ZeRO 0 in fp32, guard not measuring the norm): the gradients stay in `param.grad`
    until the optimizer step and a NaN/inf stays non-finite when later micro-batches add to it, so one fused
    norm over the accumulated gradients at the step replaces a hook and a reduction per parameter and micro-batch.
    """

    def __init__(
        self, model: torch.nn.Module, enabled: bool, measure_norm: bool = False, accumulated: bool = False
    ) -> None:
        self.sums: List[torch.Tensor] = []
        self.squares: List[torch.Tensor] = []
        self.measure_norm = measure_norm
        self.handles = []
        self.params: List[torch.nn.Parameter] = []
        if accumulated and enabled and not measure_norm:
            self.params = [param for param in model.parameters() if param.requires_grad]
        elif enabled or measure_norm:
            for param in model.parameters():
                if param.requires_grad:
                    self.handles.append(param.register_hook(self._record))

    def _record(self, grad: torch.Tensor) -> None:
        self.sums.append(grad.detach().sum(dtype=torch.float32))
        if self.measure_norm:
            self.squares.append(grad.detach().float().square().sum())

    def nonfinite(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """1.0 when the loss or any gradient since the last call is non-finite, else 0.0 (device tensor)."""
        total = loss_sum.float()
        if self.sums:
            total = total + torch.stack(self.sums).sum()
        self.sums = []
        grads = [param.grad for param in self.params if param.grad is not None]
        if grads:
            total = total + torch.nn.utils.get_total_norm(grads, foreach=True).float()
        return (~torch.isfinite(total)).float()

    def squared_norm(self) -> torch.Tensor:
        """This rank's sum of squared gradients since the last call (0 unless measure_norm; device tensor)."""
        total = torch.stack(self.squares).sum() if self.squares else torch.zeros(())
        self.squares = []
        return total


@dataclass
class StepStatus:
    """What every rank agrees on after a step's backward pass, before the optimizer step."""

    mean_loss: float
    """The step's loss averaged over micro-batches and ranks."""
    nonfinite_ranks: int
    """Ranks that saw a non-finite loss or gradient."""
    stop_requested: bool
    """Some rank received SIGTERM/SIGUSR1."""
    out_of_time: bool
    """Some rank's clock passed train.max_time."""
    decay_due: bool = False
    """wsd_time: some rank's clock passed (1 - decay_fraction) * max_time."""
    elapsed: float = 0.0
    """Seconds since the invocation started, averaged over ranks."""
    seconds_per_step: float = 0.0
    """Wall seconds per step in this invocation so far (evaluations and checkpoints included), averaged over ranks."""
    local_grad_norm: float = 0.0
    """sqrt of the mean over ranks of each rank's own squared gradient norm (0 unless the guard watches it)."""


class TrainingLoop:
    """Takes steps from run.progress to max_steps, calling the components at their fixed points."""

    def __init__(self, run: LoopRun, train_loader: Any, components: Sequence[Component]) -> None:
        self.run, self.train, self.components = run, run.cfg.train, list(components)
        self.optim, self.schedule = run.cfg.optim, run.cfg.schedule
        self.train_loader = train_loader
        self.device = run.dist_info.device
        self.guard_cfg = run.cfg.guard
        self.guard = self.guard_cfg.action != "off"
        self.guard_signals = self.guard_cfg.signals if self.guard else []
        if "grad_norm" in self.guard_signals and self.train.precision == "fp16":
            self.guard_signals.remove("grad_norm")  # scaled gradients: their norm follows the loss scale
            run.say("guard: the gradient norm is not watched under fp16 (its gradients are loss-scaled)")
        self.watch = NonfiniteWatch(
            run.engine.module,
            enabled=self.train.precision != "fp16",
            measure_norm="grad_norm" in self.guard_signals,
            accumulated=run.plain_optimizer and run.dist_info.world_size == 1,
        )
        self.trainable = [param for param in run.engine.module.parameters() if param.requires_grad]
        if self.guard and run.progress.guard is None:
            run.progress.guard = fresh_state()  # a fresh run (or a checkpoint from before the guard)
        # A loss spike judged before this step's last backward pass: its update is dropped.
        self.dropped: Optional[Spike] = None
        self.data_seconds = 0.0  # time spent in next(train_iter) during the current step
        self.loop_started, self.steps_taken = time.time(), 0  # this invocation's pace, for wsd_time's decay

    # -- one step

    def forward_backward(self, train_iter: Iterator[Batch], number: int) -> torch.Tensor:
        """grad_accum_steps micro-batches of forward and backward; returns the summed loss (on the device).

        With guard.action skip or rollback the step's mean loss is judged before the last backward; a spike
        poisons that backward with NaN, so the step takes the non-finite skip path (the update never happens)."""
        engine, accum = self.run.engine, self.train.grad_accum_steps
        inject_nan_at = faults.inject_nan_at_step()
        loss_factor = self.injected_loss_factor()
        loss_sum = torch.zeros((), device=self.device)
        self.data_seconds, self.dropped = 0.0, None
        for micro in range(accum):
            waited = time.perf_counter()
            batch = next(train_iter)
            self.data_seconds += (
                time.perf_counter() - waited
            )  # the data wait, reported as a share of the step
            loss = batch_loss(engine, to_device(batch, self.device))
            if inject_nan_at == number:
                loss = loss * float("nan")  # fault injection (SLM_INJECT_NAN_AT_STEP)
            if loss_factor is not None:
                loss = loss * loss_factor  # fault injection (SLM_SPIKE_AT_DATA_STEP)
            if micro == accum - 1 and self.judges_loss_early:
                self.dropped = self.judge_loss_early(number, loss_sum + loss.detach().float())
                if self.dropped is not None:
                    loss = loss * float("nan")
            engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro < accum - 1:
                engine.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step
        return loss_sum

    def injected_loss_factor(self) -> Optional[float]:
        """SLM_SPIKE_AT_DATA_STEP: the factor when this step trains on the named data step (1-based), else None."""
        spike = faults.spike_at_data_step()
        if spike is None:
            return None
        data_step = data_position(self.train_loader) // self.run.plan.global_batch_size + 1
        return spike[1] if data_step == spike[0] else None

    # -- the stability guard (train.guard)

    @property
    def judges_loss_early(self) -> bool:
        return "loss" in self.guard_signals and self.guard_cfg.action in ("skip", "rollback")

    def spike_guard(self) -> SpikeGuard:
        """The guard over run.progress.guard (a rollback replaces the progress' state, so it is looked up anew)."""
        return SpikeGuard(self.guard_cfg, self.run.progress.guard)

    def judge_loss_early(self, number: int, loss_sum: torch.Tensor) -> Optional[Spike]:
        """The step's mean loss over micro-batches and ranks (one small all-reduce), judged; the spike or None."""
        mean = (loss_sum / self.train.grad_accum_steps).reshape(1)
        if self.run.dist_info.world_size > 1:
            dist.all_reduce(mean)
        return self.spike_guard().judge(number, "loss", mean.item() / self.run.dist_info.world_size)

    def judge_step(self, status: StepStatus, number: int) -> Tuple[Optional[Spike], str]:
        """The spikes of this step (after the agreement) and the action taken: (spike or None, action)."""
        guard, action = self.spike_guard(), self.guard_cfg.action
        if self.dropped is not None:
            spike = self.dropped
        else:
            spike = None
            if "loss" in self.guard_signals and not self.judges_loss_early:
                spike = guard.judge(number, "loss", status.mean_loss)
            if "grad_norm" in self.guard_signals:
                norm_spike = guard.judge(number, "grad_norm", status.local_grad_norm)
                spike = spike or norm_spike
            if spike is not None and action == "skip":
                action = "warn"  # the reduced gradient cannot be dropped on every ZeRO stage (train.guard)
        if spike is not None and action == "rollback" and self.run.checkpoints.last_dir is None:
            action = "skip" if self.dropped is not None else "warn"
            self.run.say(
                f"guard: no checkpoint to roll back to at step {number}; the spike is handled as {action}"
            )
        return spike, (action if spike is not None else "none")

    def report_spike(self, spike: Spike, action: str) -> None:
        """The spike's row in metrics.jsonl (kind "spike", also printed) and a status line."""
        self.run.logger.log(spike.row(action, self.guard_cfg.threshold))
        self.run.say(
            f"guard: step {spike.step}: {spike.signal} {spike.value:.4g} is {spike.z:.1f} std above the last "
            f"{spike.window} steps' mean {spike.mean:.4g} (threshold {self.guard_cfg.threshold:g}): {action}"
        )

    def agree(self, loss_sum: torch.Tensor, stop_requested: bool) -> StepStatus:
        """One all-reduce: mean loss, non-finite ranks, stop signal, time-out and the clock for wsd_time's decay, the
        same on every rank."""
        now = time.time()
        elapsed = now - self.run.started
        out_of_time = self.train.max_time is not None and elapsed >= self.train.max_time
        seconds_per_step = (now - self.loop_started) / (self.steps_taken + 1)
        clock = [
            float(stop_requested),
            float(out_of_time),
            float(decay_due(elapsed, self.schedule, self.train.max_time)),
            elapsed,
            seconds_per_step,
        ]
        status = torch.cat(
            [
                torch.stack(
                    [
                        loss_sum / self.train.grad_accum_steps,
                        self.watch.nonfinite(loss_sum),
                        self.watch.squared_norm().to(self.device),
                    ]
                ),
                torch.tensor(clock, device=self.device),
            ]
        )
        world = self.run.dist_info.world_size
        if world > 1:
            dist.all_reduce(status)
        loss, nonfinite, squares, stop, timeout, due, elapsed_sum, pace_sum = status.tolist()
        return StepStatus(
            loss / world,
            int(nonfinite),
            stop > 0,
            timeout > 0,
            due > 0,
            elapsed_sum / world,
            pace_sum / world,
            (squares / world) ** 0.5,
        )

    def decide_decay(self, status: StepStatus, number: int) -> None:
        """wsd_time: start the decay after this step once due, sized from the agreed pace (every rank alike)."""
        progress = self.run.progress
        if progress.timed_decay is not None or not status.decay_due:
            return
        progress.timed_decay = plan_time_decay(
            number, status.elapsed, status.seconds_per_step, self.schedule, self.train.max_time
        )
        self.run.say(
            f"step {number}: {status.elapsed:.1f} s of train.max_time={self.train.max_time:g} s spent; "
            f"lr decays to min_lr over the next {progress.timed_decay.steps} steps "
            f"(at {status.seconds_per_step:.3f} s per step)"
        )

    def handle_nonfinite(self, status: StepStatus, number: int) -> None:
        """train.on_nonfinite: raise (nothing is saved), or make the coming engine.step() a no-op and count it."""
        run = self.run
        if self.train.on_nonfinite == "stop" and self.dropped is None:
            last_saved = run.checkpoints.last_saved
            last = f"the newest checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
            raise TrainError(
                f"Non-finite loss or gradient at step {number} (mean loss {status.mean_loss}) on "
                f"{status.nonfinite_ranks} of {run.dist_info.world_size} rank(s); stopped before the optimizer step "
                f"and saved nothing ({last}). Lower optim.lr, raise schedule.warmup_steps, check the data, or set "
                "train.on_nonfinite=skip to skip such steps."
            )
        # ZeRO 1-3 and the bf16/fp16 optimizers skip a step whose gradient norm is not finite by themselves;
        # our plain AdamW leaves parameters without gradients untouched (no moment update, no step count).
        if run.plain_optimizer:
            for param in run.engine.module.parameters():
                param.grad = None
        run.progress.skipped_steps += 1
        why = "a loss spike (guard)" if self.dropped is not None else "non-finite loss or gradient"
        run.say(f"step {number}: {why}, step skipped ({run.progress.skipped_steps} skipped so far)")

    def set_lr(self, lr: float) -> None:
        for group in self.run.engine.optimizer.param_groups:
            group["lr"] = group_lr(group, lr, self.optim)

    def step(self, train_iter: Iterator[Batch], stop_request: StopRequest) -> StepEvent:
        """One optimizer step with the components' two per-step hooks around `engine.step()`."""
        run = self.run
        step_started = time.perf_counter()
        number = run.progress.step + 1  # the step being taken, 1-based as logged and as checkpoint names
        lr = lr_at(
            run.progress.step, self.schedule, self.optim.lr, run.plan.max_steps, run.progress.timed_decay
        )
        self.set_lr(lr)
        status = self.agree(self.forward_backward(train_iter, number), stop_request.requested)
        self.decide_decay(status, number)
        finished = number >= run.last_step
        event = StepEvent(
            number,
            lr,
            status.mean_loss,
            status.nonfinite_ranks > 0,
            finished,
            status.out_of_time and not finished,
            status.stop_requested,
        )
        spike, action = self.judge_step(status, number) if self.guard else (None, "none")
        if spike is not None:
            self.report_spike(spike, action)
        if event.nonfinite:
            self.handle_nonfinite(status, number)
        if action == "rollback":
            run.engine.step()  # a no-op on the poisoned gradient; any update is replaced by the load below
            roll_back(run, self.train_loader, spike, self.guard_cfg.max_rollbacks)
            for component in self.components:
                component.on_rollback(run)
            return dataclasses.replace(event, rolled_back=True)
        for component in self.components:
            component.before_optimizer_step(run, event)
        if run.plain_optimizer and not event.nonfinite and self.optim.grad_clip > 0:
            # DeepSpeed's clipping is off for the plain optimizer (train.deepspeed_config): clip here, fused.
            torch.nn.utils.clip_grad_norm_(self.trainable, self.optim.grad_clip, foreach=True)
        run.engine.step()
        run.progress.step = number
        run.progress.tokens_seen += run.plan.tokens_per_step
        self.steps_taken += 1
        event = dataclasses.replace(
            event, seconds=time.perf_counter() - step_started, data_seconds=self.data_seconds
        )
        for component in self.components:
            component.after_step(run, event)
        return event

    # -- the loop

    def end(self, reason: str) -> None:
        for component in self.components:
            component.on_end(self.run, reason)

    def run_steps(self) -> int:
        """Train from run.progress to max_steps; the exit code of `slm train`."""
        run = self.run
        for component in self.components:
            component.on_start(run)
        if run.progress.step >= run.last_step:
            run.say(f"already at step {run.progress.step} of {run.last_step}: nothing to train")
            self.end("finished")
            return 0
        stop_request = StopRequest().install()
        try:
            return self._loop(stop_request)
        finally:
            stop_request.restore()

    def _loop(self, stop_request: StopRequest) -> int:
        run = self.run
        train_iter = iter(self.train_loader)
        self.loop_started, self.steps_taken = time.time(), 0
        run.engine.train()
        event: Optional[StepEvent] = None
        while run.progress.step < run.last_step:
            event = self.step(train_iter, stop_request)
            if event.stop_requested:
                self.end("stopped")
                run.say(
                    f"stopped by signal after step {event.number}; exit code {EXIT_PREEMPTED} "
                    "(start the same command again to resume)"
                )
                return EXIT_PREEMPTED
            if event.timed_out:
                self.end("timed_out")
                run.say(
                    f"train.max_time ({self.train.max_time} s) spent: stopped cleanly after step {event.number}"
                )
                return 0
        self.end("finished")
        run.say(f"finished {run.progress.step} steps ({run.progress.tokens_seen:,} tokens)")
        return 0
