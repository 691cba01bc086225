"""Graceful preemption: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) finish the current step, save a checkpoint, and exit with
EXIT_PREEMPTED.

Slurm sends SIGUSR1 (with `--signal=USR1@SECONDS`) shortly before the time limit and SIGTERM on
preemption or `scancel`; the requeue loop of `slm slurm` treats exit code 3 as "checkpointed,
start me again" and stops once `run.dir/DONE` exists. The handler only sets a flag: the training
loop reduces it across ranks once per step so that every rank stops after the same step (a rank
that stopped alone would leave the others waiting in a collective). A second SIGINT (Ctrl-C pressed
again while the step finishes) aborts at once with EXIT_ABORTED, saving nothing.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Dict, Optional

from common.log import say

EXIT_PREEMPTED = 3
"""Exit code of a run that saved a checkpoint after SIGTERM/SIGUSR1 and should be started again."""

EXIT_ABORTED = 130
"""Exit code after a second Ctrl-C (128 + SIGINT, as a shell reports an interrupted command)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Remembers whether a stop signal arrived; `install()` swaps in the handlers, `restore()` puts back the old ones."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            say(
                f"second Ctrl-C: aborting now without a checkpoint (exit code {EXIT_ABORTED}); the newest "
                "complete checkpoint is unchanged"
            )
            os._exit(EXIT_ABORTED)
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            say(
                f"received {self.signal_name}: finishing this step, then checkpointing and exiting "
                f"with code {EXIT_PREEMPTED}"
            )

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
