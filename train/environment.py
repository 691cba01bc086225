"""run.dir/environment.json: where and with what a run's latest start trained (for `slm report`).

Written by rank 0 at every start, atomically, beside config.yaml and plan.json: the git commit of the slm-forge
source (None outside a git checkout; `dirty` when it has uncommitted changes), host, OS, Python, torch and
DeepSpeed versions, the device kind and name, world size and CPU count. Nothing here steers the run.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from common.atomic import atomic_write_json

ENVIRONMENT_FILE = "environment.json"
SOURCE_DIR = Path(__file__).resolve().parents[1]


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(SOURCE_DIR), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, world_size: int) -> Dict[str, Any]:
    """What environment.json records for this start."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    cuda = device.type == "cuda"
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "host": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "cuda": torch.version.cuda if cuda else None,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or platform.machine(),
        "world_size": world_size,
        "cpu_count": os.cpu_count(),
        "started_at": time.time(),
    }


def write_environment(run_dir: Path, device: torch.device, world_size: int) -> None:
    """run.dir/environment.json of this start (rank 0)."""
    atomic_write_json(Path(run_dir) / ENVIRONMENT_FILE, environment(device, world_size))
