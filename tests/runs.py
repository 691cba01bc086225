"""Real `slm train` runs on the tiny preset shrunk further, shared by the training tests: the arguments, the
metrics rows they write, and a process whose output is read line by line."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Dict, List

from tests.helpers import REPO, TINY
from tests.helpers import test_env as make_env

STEPS = 12
SHRINK = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.max_seq_len=32",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "schedule.warmup_steps=2",
    "log.every=1",
    "eval.batches=2",
    f"train.max_steps={STEPS}",
    "eval.every=6",
    "checkpoint.every=6",
    "data.num_workers=0",
]
ONE_PROC = ["train.grad_accum_steps=2"]  # the same global batch (8) as 2 processes x micro-batch 4


def train_args(run_dir: Path, data_dir: Path, *extra: str) -> List[str]:
    return ["train", TINY, f"run.dir={run_dir}", f"data.dir={data_dir}", *SHRINK, *extra]


def rows(run_dir: Path, kind: str = "train") -> List[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path) -> Dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir)}


def start(cmd: List[str], env=None) -> subprocess.Popen:
    """A training process whose stdout+stderr we read line by line."""
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or make_env(), cwd=str(REPO)
    )


def read_until(proc: subprocess.Popen, marker: str, seen: List[str], timeout: float = 240) -> None:
    """Read output lines until one contains `marker` (a hung process is killed after `timeout` seconds)."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                return
    finally:
        watchdog.cancel()
    raise AssertionError(f"process ended before printing {marker!r}:\n{''.join(seen[-60:])}")


# The ZeRO-1 run also covers bf16, activation checkpointing and gradient accumulation on 2 processes.
