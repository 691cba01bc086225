"""Finding and rotating the checkpoints of a run: the complete step folders, the `latest` pointer, pruning."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

from common.log import say
from train.checkpoint.layout import LATEST, TMP_PREFIX, checkpoints_dir, is_complete, is_step_name, step_of


def complete_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete step folders in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=step_of)


def find_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """The newest complete step folder under a run dir, a checkpoints dir, or the step folder itself.

    The highest complete step wins (a kill between the rename and the `latest` update still finds
    it); folders without COMPLETE, and temporary `tmp.*` folders, are ignored. None when there is none.
    """
    path = Path(path)
    if not path.exists():
        return None
    if is_step_name(path.name):
        return path if is_complete(path) else None
    ckpt_dir = checkpoints_dir(path) if checkpoints_dir(path).is_dir() else path
    found = complete_checkpoints(ckpt_dir)
    newest = found[-1] if found else None
    pointed = read_latest(ckpt_dir)
    if newest is not None and pointed != newest and (ckpt_dir / LATEST).exists():
        say(
            f"note: {ckpt_dir / LATEST} names {pointed.name if pointed else 'no complete checkpoint'} but the "
            f"newest complete checkpoint is {newest.name} (a save was interrupted after its rename); using {newest.name}"
        )
    return newest


def read_latest(ckpt_dir: Path) -> Optional[Path]:
    """The complete step folder that `ckpt_dir/latest` names; None when it is missing or names no complete folder.

    `latest` is the pointer for people and shell tools (`cat checkpoints/latest`); slm itself trusts the
    highest complete step and reads `latest` only to report when the two disagree.
    """
    try:
        name = (ckpt_dir / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    folder = ckpt_dir / name
    return folder if is_step_name(name) and is_complete(folder) else None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> List[Path]:
    """Delete all but the newest `keep` complete checkpoints and any leftover temporary folders."""
    removed = []
    for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    for stale in ckpt_dir.glob(f"{TMP_PREFIX}step_*"):  # only our own temporary names, never a user's file
        if stale.is_dir() and is_step_name(stale.name[len(TMP_PREFIX) :]):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    for stale in ckpt_dir.glob(".step_*.old"):
        if stale.is_dir() and is_step_name(stale.name[1 : -len(".old")]):
            shutil.rmtree(stale, ignore_errors=True)
    return removed
