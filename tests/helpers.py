"""Shared test utilities: free ports, subprocess runs of the real `slm` under real launchers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
SHAKESPEARE = str(REPO / "data" / "tinyshakespeare.txt")
SELF_INSTRUCT = str(REPO / "data" / "self_instruct_seed_tasks.jsonl")
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port the OS says is free right now (tests run concurrently: never hard-code one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_path() -> str:
    """PATH with the venv's bin first. DeepSpeed JIT-builds its CPU comm op with whichever ninja is on PATH,
    and two ninja versions hash the shared build cache differently: mixing them rebuilds it every start."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join([str(BIN)] + [p for p in parts if p != str(BIN)])


def test_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a subprocess under test: offline, the venv's tools first on PATH."""
    env = dict(os.environ)
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        PATH=venv_path(),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


test_env.__test__ = False  # not a test, whatever modules import it


def slm_cmd(args: Sequence[str], nproc: int = 1) -> List[str]:
    """`slm ARGS` as one plain process (nproc=1) or under torchrun with `nproc` CPU processes."""
    if nproc == 1:
        return [sys.executable, "-m", "launch", *args]
    return [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "launch",
        *args,
    ]


def run(
    cmd: Sequence[str],
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
    check: bool = True,
    cwd: Optional[str] = None,
) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected exit code fail with its full output."""
    proc = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or test_env(),
        cwd=cwd or str(REPO),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
