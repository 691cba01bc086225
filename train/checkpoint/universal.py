"""DeepSpeed universal checkpoints: a step folder converted once (world size or ZeRO stage changed within 1-3)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from common.atomic import atomic_write_text
from common.log import say
from train.checkpoint.files import file_digest, record_of
from train.checkpoint.folders import find_checkpoint
from train.checkpoint.layout import COMPLETE, META, TMP_PREFIX, TOKENIZER, UNIVERSAL, UNIVERSAL_RECORD
from train.checkpoint.record import read_record
from train.checkpoint.safe_load import scan_pickles
from train.errors import TrainError

CONVERSION_WORKERS = max(1, min(8, len(os.sched_getaffinity(0))))
"""Processes DeepSpeed's converter extracts and merges with: rank 0 converts while the other ranks wait in a
collective (train.timeout_minutes), so it uses the node's cores."""


def convert_ahead(path: str) -> Path:
    """`slm convert`: the universal folder of a run's newest complete checkpoint (or of a step folder), converted
    now, before a job at another world size or ZeRO stage waits on rank 0 converting it."""
    step_dir = find_checkpoint(path)
    if step_dir is None:
        raise TrainError(
            f"No complete checkpoint at '{path}': expected a run dir, its checkpoints/ or a step folder."
        )
    if read_record(step_dir).zero_stage == 0:
        raise TrainError(
            f"{step_dir} was trained at ZeRO 0: its weights and optimizer state are whole, and a run at any world "
            "size resumes from them directly; there is nothing to convert."
        )
    return ensure_universal(step_dir)


def universal_record(folder: Path) -> Dict[str, Any]:
    """The file record (train.checkpoint.files.record_of) of every file the conversion wrote."""
    return record_of(
        folder,
        sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink() and p.name not in (COMPLETE, UNIVERSAL_RECORD)
        ),
    )


def universal_damage(folder: Path) -> Optional[str]:
    """Why a converted folder may not be reused as it is (None when it matches its record exactly): it is
    derived from the step folder, so anything else (a changed, added or linked file) means converting again."""
    try:
        record = json.loads((folder / UNIVERSAL_RECORD).read_text(encoding="utf-8"))
        recorded, algorithm = record["files"], record["files_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {UNIVERSAL_RECORD}"
    links = [p for p in folder.rglob("*") if p.is_symlink()]
    if links:
        return f"{links[0].relative_to(folder)} is a link"
    present = {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (COMPLETE, UNIVERSAL_RECORD)
    }
    if set(present) != set(recorded):
        changed = sorted(set(present) ^ set(recorded))
        return f"{changed[0]} is {'not in its record' if changed[0] in present else 'missing'}"
    for name, path in sorted(present.items()):
        entry = recorded[name]
        if path.stat().st_size != entry.get("size") or file_digest(path, algorithm) != entry.get("hash"):
            return f"{name} differs from its record"
    return None


def ensure_universal(step_dir: Path) -> Path:
    """A DeepSpeed universal checkpoint of `step_dir` (ZeRO 1-3), converted once into `step_dir/universal`.

    Written under a temporary name and renamed when complete, like every checkpoint; the conversion
    runs on rank 0 only (the caller shares the result).
    """
    out = step_dir / UNIVERSAL
    if (out / COMPLETE).is_file():
        damage = universal_damage(out)
        if damage is None:
            say(f"using the universal checkpoint converted earlier: {out}")
            return out
        say(f"{out} is not the conversion slm train wrote ({damage}); converting {step_dir} again")
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # heavy: only when converting

    tmp = step_dir / f"{TMP_PREFIX}{UNIVERSAL}"
    scan_pickles(step_dir)  # ds_to_universal unpickles with weights_only=False
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(step_dir),
        output_folder=str(tmp),
        num_extract_workers=CONVERSION_WORKERS,
        num_merge_workers=CONVERSION_WORKERS,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    say(f"converting {step_dir} to a DeepSpeed universal checkpoint (world size or ZeRO stage changed)")
    try:
        ds_to_universal(args)
    except Exception as err:  # DeepSpeed raises assertion/value/key errors from deep inside
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainError(
            f"Converting checkpoint '{step_dir}' to a universal checkpoint failed ({type(err).__name__}: "
            f"{err}); resume with the world size and ZeRO stage it was written with."
        ) from None
    for name in (META, TOKENIZER):
        shutil.copyfile(step_dir / name, tmp / name)
    atomic_write_text(tmp / UNIVERSAL_RECORD, json.dumps(universal_record(tmp)) + "\n")
    atomic_write_text(tmp / COMPLETE, f"{UNIVERSAL}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
