"""`profile.steps=[a, b]`: a torch profiler trace of steps a..b (1-based, inclusive) into run.dir/profile/, and on
CUDA a memory snapshot of the same steps; `slm report` links them. Off by default (an empty list)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from train.components import Component, LoopRun, StepEvent

PROFILE_DIR = "profile"


def trace_path(run_dir: Path, first: int, last: int, rank: int) -> Path:
    return Path(run_dir) / PROFILE_DIR / f"trace_steps{first}-{last}_rank{rank}.json"


class Profiler(Component):
    """Starts the torch profiler before step `first` and writes its Chrome trace after step `last` (every rank)."""

    name = "profiler"

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.profile: Optional[Any] = None

    @classmethod
    def from_config(cls, cfg: Any) -> Optional[Profiler]:
        steps = cfg.profile.steps
        return cls(steps[0], steps[1]) if steps else None

    def _start(self, run: LoopRun) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if run.dist_info.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profile = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profile.__enter__()

    def on_start(self, run: LoopRun) -> None:
        if run.progress.step + 1 == self.first:
            self._start(run)

    def after_step(self, run: LoopRun, event: StepEvent) -> None:
        if event.number + 1 == self.first and not event.last:
            self._start(run)  # the next step is the first one traced
        elif self.profile is not None and (event.number >= self.last or event.last):
            self._finish(run, event.number)

    def on_rollback(self, run: LoopRun) -> None:
        if self.profile is not None:
            self.profile.__exit__(None, None, None)  # the traced steps were undone: no trace
            self.profile = None

    def _finish(self, run: LoopRun, last: int) -> None:
        profile, self.profile = self.profile, None
        profile.__exit__(None, None, None)
        out = trace_path(run.run_dir, self.first, last, run.dist_info.rank)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            profile.export_chrome_trace(tmp)
            os.replace(tmp, out)
            if run.dist_info.device.type == "cuda":
                snapshot = out.with_name(out.name.replace("trace_", "memory_").replace(".json", ".pickle"))
                torch.cuda.memory._dump_snapshot(tmp)
                os.replace(tmp, snapshot)
                torch.cuda.memory._record_memory_history(enabled=None)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        run.say(f"profile of steps {self.first}-{last} written to {out.parent}")
