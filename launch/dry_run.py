"""`slm train CONFIG --dry-run --world-size N`: the command-line side of train/dry_run.py, and the dry run that
`slm slurm` runs (in a child process, so that the fake process group and DeepSpeed's globals never outlive it)
before it writes or submits a job."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Optional, Sequence

from common.log import say
from train.config import Config

DRY_RUN_FAILED = 1
"""Exit code of a dry run that found errors (2 stays a bad command line or config)."""


def add_dry_run_args(p: argparse.ArgumentParser) -> None:
    """The dry-run flags of `slm train`."""
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the run at --world-size N on this CPU (fake process group); writes nothing to run.dir",
    )
    p.add_argument("--world-size", type=int, default=None, help="ranks of the job the dry run simulates")
    p.add_argument("--rank", type=int, default=None, help="the rank the dry run plays (default 0)")
    p.add_argument("--gpu", default=None, help="target GPU for the memory check: h100, a100-80gb, h200, ...")
    p.add_argument(
        "--steps", type=int, default=None, help="real optimizer steps the dry run takes (default 1)"
    )
    p.add_argument("--nodes", type=int, default=None, help="Slurm nodes of the job (checked against N)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="processes per node (checked against N)")


def dry_run_command(cfg: Config, args: argparse.Namespace) -> int:
    """Run the dry run, print its report on stdout; DRY_RUN_FAILED when it found errors."""
    from train.dry_run import DryRunOptions, dry_run
    from train.errors import TrainError

    if args.world_size is None:
        raise TrainError("slm train --dry-run needs --world-size N, the number of ranks of the job to check.")
    options = DryRunOptions(
        world_size=args.world_size,
        rank=args.rank or 0,
        gpu=args.gpu,
        steps=1 if args.steps is None else args.steps,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
    )
    report = dry_run(cfg, options)
    print(report.text(), end="")
    if report.errors:
        say(f"dry run: {len(report.errors)} error(s) at world size {options.world_size}")
        return DRY_RUN_FAILED
    say(f"dry run: no errors at world size {options.world_size}")
    return 0


def dry_run_before_submit(
    config: str,
    overrides: Sequence[str],
    nodes: int,
    tasks_per_node: int,
    gpu: Optional[str],
    steps: int = 0,
) -> int:
    """`slm train --dry-run` for a Slurm job's world size, in a child process; its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "train",
        config,
        *overrides,
        "--dry-run",
        "--world-size",
        str(nodes * tasks_per_node),
        "--nodes",
        str(nodes),
        "--tasks-per-node",
        str(tasks_per_node),
        "--steps",
        str(steps),
    ]
    if gpu:
        cmd += ["--gpu", gpu]
    say(
        f"slurm: dry run at world size {nodes * tasks_per_node} before writing the job (--no-dry-run skips it)"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stdout + proc.stderr)  # the report too: stdout carries the batch script
    return proc.returncode
