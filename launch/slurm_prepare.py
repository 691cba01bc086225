"""`slm slurm --prepare N CONFIG`: prepare a corpus on many nodes as three Slurm jobs.

1. `tokenizer.sbatch`: `slm prepare --tokenizer-only` (the tokenizer is trained once, before any part);
2. `parts.sbatch`: a job array 1..N, task K running `slm prepare --part K/N`, after (1) succeeded;
3. `merge.sbatch`: `slm prepare --merge`, after every array task succeeded (afterok on the array).

The scripts and their logs go to data.dir/.slurm/. data.dir must be a shared folder every node sees.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from common.atomic import atomic_write_text
from data_pipeline.storage.store import is_remote
from launch.config import load_config
from launch.slurm import SlurmError, queue_flags


def _script(
    name: str,
    workdir: Path,
    folder: Path,
    args: argparse.Namespace,
    command: str,
    array: Optional[int] = None,
) -> str:
    log = folder / ("%x-%A_%a.out" if array else "%x-%j.out")
    lines = [
        f"--job-name=prepare-{name}",
        "--nodes=1",
        "--ntasks=1",
        f"--chdir={workdir}",
        f"--output={log}",
        f"--error={log}",
    ]
    if array:
        lines.append(f"--array=1-{array}")
    if args.cpus_per_task:
        lines.append(f"--cpus-per-task={args.cpus_per_task}")
    lines += queue_flags(args.partition, args.account, args.time)
    return "\n".join(
        [
            "#!/bin/bash",
            *(f"#SBATCH {line}" for line in lines),
            "set -euo pipefail",
            f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
            f"exec {command}",
            "",
        ]
    )


def write_prepare_scripts(args: argparse.Namespace, workdir: Optional[Path] = None) -> Dict[str, Path]:
    """The three batch scripts in data.dir/.slurm/, by step name."""
    workdir = (workdir or Path.cwd()).resolve()
    parts = int(args.prepare)
    if parts < 1:
        raise SlurmError(f"slm slurm --prepare {parts}: expected the number of parts, at least 1.")
    overrides = list(args.overrides or ())
    cfg = load_config(args.config, overrides)
    if is_remote(cfg.data.dir):
        raise SlurmError(
            f"slm slurm --prepare needs a shared folder as data.dir, not {cfg.data.dir}: the parts and "
            f"the merge meet there."
        )
    data_dir = Path(cfg.data.dir) if Path(cfg.data.dir).is_absolute() else workdir / cfg.data.dir
    folder = data_dir / ".slurm"
    folder.mkdir(parents=True, exist_ok=True)
    base = " ".join(
        shlex.quote(a)
        for a in [
            sys.executable,
            "-m",
            "launch",
            "prepare",
            str((workdir / args.config).resolve()),
            *overrides,
            f"data.dir={data_dir}",
        ]
    )
    name = data_dir.name
    scripts = {
        "tokenizer": _script(f"{name}-tokenizer", workdir, folder, args, f"{base} --tokenizer-only"),
        "parts": _script(
            f"{name}-parts",
            workdir,
            folder,
            args,
            f'{base} --part "$SLURM_ARRAY_TASK_ID/{parts}"',
            array=parts,
        ),
        "merge": _script(f"{name}-merge", workdir, folder, args, f"{base} --merge"),
    }
    paths = {}
    for step, text in scripts.items():
        paths[step] = folder / f"{step}.sbatch"
        atomic_write_text(paths[step], text)
    return paths


def submit_prepare(paths: Dict[str, Path]) -> List[str]:
    """sbatch the three scripts, each after the previous one succeeded; the job ids."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError(
            f"slm slurm --submit: 'sbatch' was not found on PATH; the scripts are in "
            f"{paths['tokenizer'].parent}, submit them in order with --dependency=afterok."
        )
    ids: List[str] = []
    for step, path in paths.items():
        cmd = (
            [sbatch, "--parsable", "--export=ALL"]
            + ([f"--dependency=afterok:{ids[-1]}"] if ids else [])
            + [str(path)]
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmError(
                f"slm slurm --submit: sbatch refused {path} ({step}): {proc.stderr.strip() or proc.stdout.strip()}"
            )
        ids.append(proc.stdout.strip().split(";")[0])
    return ids


def slurm_prepare_command(args: argparse.Namespace) -> int:
    paths = write_prepare_scripts(args)
    for step, path in paths.items():
        print(f"# {step}: {path}\n{path.read_text(encoding='utf-8')}")
    if args.submit:
        for step, job_id in zip(paths, submit_prepare(paths)):
            print(f"submitted job {job_id} ({step})")
    return 0
