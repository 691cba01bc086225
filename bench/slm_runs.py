"""What the benchmarks share about `slm` runs: starting one as a subprocess, and reading its metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


def slm(args: list, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`python -m launch ARGS` in the repository; a failure exits naming the command and its output's tail."""
    proc = subprocess.run(
        [sys.executable, "-m", "launch", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"slm {' '.join(args)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return proc


def metrics(run_dir: Path, kind: Optional[str] = None) -> List[dict]:
    """The rows of run_dir/metrics.jsonl, only those of `kind` (train, eval, ...) when given."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]
