"""Test-only fault and tuning hooks, read from the environment at call time (never at import).

Each hook is one environment variable; unset means normal behaviour. Tests set them on the subprocesses
they start, so a crash, a NaN or a slow save happens at a chosen, repeatable moment.

  SLM_INJECT_NAN_AT_STEP=K          multiply the loss of step K (1-based, as logged) by NaN
                                    (exercises train.on_nonfinite)
  SLM_SPIKE_AT_DATA_STEP=K[:FACTOR] multiply by FACTOR (default 10) the loss of the step that trains on data step K:
                                    the K-th global batch of the run's data order (1-based), which a guard
                                    rollback skips, so the spike does not come back (exercises train.guard)
  SLM_SLEEP_IN_SAVE=[STEP:]SECONDS  sleep between DeepSpeed's save and the COMPLETE marker/rename (only at
                                    STEP when given), so a test can `kill -9` a save deterministically
  SLM_SAVE_RELEASE_FILE=PATH        end that sleep early once PATH exists (a test holds a save exactly as long
                                    as it needs, however slowly the machine starts its other processes)
  SLM_FAIL_SAVE_AT_STEP=K           make rank 0's finishing of the save of step K fail after every file is
                                    written (and uploaded), before meta.json and COMPLETE (a failed upload)
  SLM_HOLD_UPLOAD_AT_STEP=K         hold the upload of step K to a checkpoint URL once its first file is on the
                                    store, until SLM_SAVE_RELEASE_FILE exists (at most 10 minutes): a test kills
                                    the process during a (background) upload at a known point
  SLM_PREPARE_CHUNK_BYTES=N         text per tokenization task in `slm prepare` (default 256 KiB)
  SLM_PREPARE_COMMIT_SECONDS=S      commit prepare's progress at most every S seconds (default 2)
  SLM_PREPARE_REMOTE_COMMIT_SECONDS=S  mirror a commit of a prepare into a URL to the remote at most every S
                                    seconds (default 60)
"""

from __future__ import annotations

import os
import time
from typing import Optional

INJECT_NAN_AT_STEP = "SLM_INJECT_NAN_AT_STEP"
SPIKE_AT_DATA_STEP = "SLM_SPIKE_AT_DATA_STEP"
SLEEP_IN_SAVE = "SLM_SLEEP_IN_SAVE"
SAVE_RELEASE_FILE = "SLM_SAVE_RELEASE_FILE"
FAIL_SAVE_AT_STEP = "SLM_FAIL_SAVE_AT_STEP"
HOLD_UPLOAD_AT_STEP = "SLM_HOLD_UPLOAD_AT_STEP"
PREPARE_CHUNK_BYTES = "SLM_PREPARE_CHUNK_BYTES"
PREPARE_COMMIT_SECONDS = "SLM_PREPARE_COMMIT_SECONDS"
PREPARE_REMOTE_COMMIT_SECONDS = "SLM_PREPARE_REMOTE_COMMIT_SECONDS"


def inject_nan_at_step() -> Optional[int]:
    """The step whose loss becomes NaN, or None."""
    value = os.environ.get(INJECT_NAN_AT_STEP)
    return int(value) if value else None


def spike_at_data_step() -> Optional[tuple]:
    """(data step K, loss factor) of SLM_SPIKE_AT_DATA_STEP, or None."""
    spec = os.environ.get(SPIKE_AT_DATA_STEP)
    if not spec:
        return None
    step, _, factor = spec.partition(":")
    return int(step), float(factor or 10.0)


def sleep_in_save(step: int) -> Optional[float]:
    """Seconds to sleep inside the save of `step`, or None (no hook, or the hook names another step)."""
    spec = os.environ.get(SLEEP_IN_SAVE)
    if not spec:
        return None
    at_step, _, seconds = spec.rpartition(":")
    if at_step and int(at_step) != step:
        return None
    return float(seconds)


def pause_in_save(seconds: float) -> None:
    """Sleep `seconds`, or less if SLM_SAVE_RELEASE_FILE names a file that appears meanwhile."""
    release = os.environ.get(SAVE_RELEASE_FILE)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if release and os.path.exists(release):
            return
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def fail_save(step: int) -> bool:
    """Whether the save of `step` is to fail before its meta.json and COMPLETE."""
    value = os.environ.get(FAIL_SAVE_AT_STEP)
    return bool(value) and int(value) == step


def hold_upload(step: int) -> bool:
    """Whether the upload of `step` is to be held after its first file."""
    value = os.environ.get(HOLD_UPLOAD_AT_STEP)
    return bool(value) and int(value) == step


def prepare_chunk_bytes(default: int = 1 << 18) -> int:
    """Characters of text per tokenization task."""
    return int(os.environ.get(PREPARE_CHUNK_BYTES, default))


def prepare_commit_seconds(default: float = 2.0) -> float:
    """Longest time between two commits of prepare's progress."""
    return float(os.environ.get(PREPARE_COMMIT_SECONDS, default))


def prepare_remote_commit_seconds(default: float = 60.0) -> float:
    """Longest time between two snapshots of a URL prepare's progress on the remote."""
    return float(os.environ.get(PREPARE_REMOTE_COMMIT_SECONDS, default))
