"""One `slm train` per run.dir at a time: rank 0 holds run.dir/LOCK for the whole run.

The lock file is created exclusively (O_CREAT | O_EXCL) and names its holder: host, pid, and the Slurm job id
when there is one. A second run on the same run.dir is refused with the holder's name, so it can neither
resume from the first one's checkpoints nor overwrite its metrics. A lock left behind by a holder that is gone
is taken over, with a message, when that can be known for sure: the same host and a pid that no longer runs,
or the same Slurm job id (a requeued job: Slurm ends the earlier attempt first).

What it cannot promise: on a shared filesystem, exclusive creation is atomic on NFSv3+ and Lustre, but a
holder on another host that died without a requeue (a lost node) cannot be told from a live one: its lock
stays until removed by hand (the refusal says how).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Dict, Optional

from common.log import say
from train.errors import TrainError

LOCK = "LOCK"
"""The lock file in run.dir."""


def holder_identity() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def read_holder(path: Path) -> Optional[Dict[str, Any]]:
    """The holder recorded in a lock file (None when unreadable: half-written or not ours)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def gone_for_sure(holder: Optional[Dict[str, Any]], me: Dict[str, Any]) -> Optional[str]:
    """Why the recorded holder certainly no longer runs, or None when it may."""
    if holder is None:
        return None
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"]:
        return f"it was an earlier attempt of this Slurm job {job}"
    pid = holder.get("pid")
    if holder.get("host") == me["host"] and isinstance(pid, int) and pid != me["pid"] and not pid_alive(pid):
        return f"its process {pid} on this host has ended"
    return None


def _create(path: Path, me: Dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(me) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire_run_lock(run_dir: Path) -> Path:
    """Take run.dir/LOCK for this process; TrainError naming the holder when another run holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    me = holder_identity()
    if _create(path, me):
        return path
    holder = read_holder(path)
    reason = gone_for_sure(holder, me)
    if reason is not None:
        say(f"taking over {path}: {reason}")
        stale = path.with_name(f".{LOCK}.stale.{me['pid']}")
        try:
            os.replace(path, stale)  # one taker wins; a second finds the file gone and creates its own
            os.unlink(stale)
        except FileNotFoundError:
            pass
        if _create(path, me):
            return path
        holder = read_holder(path)
    who = (
        f"host {holder.get('host')}, pid {holder.get('pid')}"
        + (f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "")
        if holder
        else "a holder it does not name"
    )
    raise TrainError(
        f"run.dir {run_dir} is in use by another slm train ({who}: {path}). Two runs on one run.dir would resume "
        f"from each other's checkpoints and overwrite each other's records. Wait for it, use another run.dir, "
        f"or, if you are sure that run has ended, remove {path}."
    )


def release_run_lock(path: Optional[Path]) -> None:
    """Remove the lock if this process still holds it."""
    if path is None:
        return
    holder = read_holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
