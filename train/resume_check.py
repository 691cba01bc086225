"""The checkpoint a run resumes from must match its own file record; `train.resume=auto` falls back past damaged ones."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from train.checkpoint import CHECKPOINTS, complete_checkpoints, read_meta, step_of
from train.checkpoint_files import newest_intact, verify_checkpoint
from train.config import TrainConfig

AUTO = ("auto", "true", "yes", "on", "1")


def _say(message: str) -> None:
    print(f"[slm] {message}", flush=True)


def intact_resume(train: TrainConfig, run_dir: Path, chosen: Optional[Path]) -> Optional[Path]:
    """`chosen` (from train.resume) if its files match its meta.json; with resume=auto the newest intact one."""
    if chosen is None:
        return None
    hashes = train.verify_checkpoint_hashes
    if str(train.resume).strip().lower() in AUTO:
        candidates = [p for p in reversed(complete_checkpoints(run_dir / CHECKPOINTS)) if step_of(p) <= step_of(chosen)]
        return newest_intact(candidates, read_meta, hashes, _say)
    verify_checkpoint(chosen, read_meta(chosen), hashes)
    return chosen
