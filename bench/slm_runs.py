"""What the benchmarks share about `slm` runs: tiny Shakespeare prepared into a scratch folder, starting a run as a
subprocess, and reading its metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def prepare_tiny_shakespeare(data_dir: Path) -> Path:
    """tinyshakespeare tokenized with configs/tiny.yaml's settings into `data_dir` (one process, documents at blank
    lines, as the tests prepare it); returns data_dir."""
    from data_pipeline.prepare.dispatch import prepare
    from launch.config import load_config
    from tests.helpers import SHAKESPEARE, TINY

    cfg = load_config(
        TINY,
        [
            f"data.dir={data_dir}",
            "data.num_proc=1",
            f"data.sources=[{{path: {SHAKESPEARE}, doc_boundary: blank_line}}]",
        ],
    )
    prepare(cfg.data, cfg.tokenizer)
    return data_dir


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
