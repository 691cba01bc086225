"""Saving a checkpoint that is either complete or invisible (the layout and its steps: train.checkpoint.layout)."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from common import faults
from common.atomic import atomic_write_json, atomic_write_text, replace_dir
from common.files import fsync_dir
from common.log import say
from common.os_errors import disk_is_full
from train.checkpoint.files import record_files
from train.checkpoint.folders import prune_checkpoints
from train.checkpoint.layout import (
    COMPLETE,
    LATEST,
    META,
    TMP_PREFIX,
    checkpoints_dir,
    rng_file,
    step_tag,
    tokenizer_file,
)
from train.checkpoint.record import CheckpointRecord, Progress, RunIdentity
from train.checkpoint.rng_state import rng_state
from train.distributed import DistInfo, barrier
from train.errors import TrainError


def _sleep_in_save_hook(step: int) -> None:
    seconds = faults.sleep_in_save(step)
    if seconds is None:
        return
    say(
        f"fault injection ({faults.SLEEP_IN_SAVE}): sleeping {seconds:g} s inside the save of {step_tag(step)}"
    )
    faults.pause_in_save(seconds)


def save_checkpoint(
    engine: Any, run_dir: Path, record: CheckpointRecord, tokenizer_path: Path, keep: int, dist_info: DistInfo
) -> Path:
    """Save collectively (every rank calls this); returns the final step folder. A save that fails because
    the disk is full removes its own partial folder and says so (the previous checkpoint stays the resume point)."""
    ckpt_dir = checkpoints_dir(run_dir)
    tag = step_tag(record.progress.step)
    tmp_dir = ckpt_dir / (TMP_PREFIX + tag)
    try:
        return _save(engine, ckpt_dir, record, tokenizer_path, keep, dist_info)
    except (OSError, RuntimeError) as err:
        if not (ckpt_dir.is_dir() and disk_is_full(err, ckpt_dir)):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)  # ours, incomplete, and holding the space
        latest = ckpt_dir / LATEST
        previous = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
        kept = (
            f"the previous checkpoint {ckpt_dir / previous} stays the resume point"
            if previous
            else "no earlier checkpoint exists, so a restart begins at step 0"
        )
        raise TrainError(
            f"Saving checkpoint {tag} into {ckpt_dir} failed: the disk is full ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:120]}). The partial {tmp_dir.name} was removed and {kept}. Free space "
            f"on that disk (or lower checkpoint.keep) and run the same command to resume."
        ) from None


def _save(
    engine: Any,
    ckpt_dir: Path,
    record: CheckpointRecord,
    tokenizer_path: Path,
    keep: int,
    dist_info: DistInfo,
) -> Path:
    step = record.progress.step
    tag = step_tag(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    if dist_info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    barrier()
    torch.save(rng_state(), rng_file(tmp_dir, dist_info.rank))
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={}, save_latest=False)
    barrier()  # every rank's shards and RNG file are on disk
    _sleep_in_save_hook(step)
    if dist_info.is_main:
        shutil.copyfile(tokenizer_path, tokenizer_file(tmp_dir))
        atomic_write_json(tmp_dir / META, record.to_meta(record_files(tmp_dir)))  # every file's size and hash
        atomic_write_text(tmp_dir / COMPLETE, f"{tag}\n")
        fsync_dir(tmp_dir)
        replace_dir(
            tmp_dir, final_dir
        )  # final_dir exists when saved again at one step (a resumed run's last save)
        fsync_dir(ckpt_dir)
        atomic_write_text(ckpt_dir / LATEST, f"{tag}\n")
        prune_checkpoints(ckpt_dir, keep)
    barrier()
    return final_dir


class CheckpointSaver:
    """Saves this run's checkpoints: the record of each is built here from the progress and the loader's state."""

    def __init__(
        self,
        engine: Any,
        run_dir: Path,
        identity: RunIdentity,
        train_loader: Any,
        tokenizer_path: Path,
        keep: int,
        dist_info: DistInfo,
        last_saved: Optional[int],
        last_dir: Optional[Path] = None,
    ) -> None:
        self.engine, self.run_dir, self.identity, self.train_loader = engine, run_dir, identity, train_loader
        self.tokenizer_path, self.keep, self.dist_info = tokenizer_path, keep, dist_info
        self.last_saved = last_saved
        """The step of the newest checkpoint this run stands on (the resumed one, or the last saved)."""
        self.saved_dir: Optional[Path] = None
        """The folder saved by this invocation at step `last_saved` (None before the first save)."""
        self.last_dir = last_dir
        """The folder of checkpoint `last_saved` (the resumed one, possibly in another run.dir, or the last saved)."""

    def save(self, progress: Progress) -> Path:
        """Save now (collective); returns the final step folder."""
        record = CheckpointRecord(replace(progress), self.train_loader.state_dict(), self.identity)
        started = time.time()
        step_dir = save_checkpoint(
            self.engine, self.run_dir, record, self.tokenizer_path, self.keep, self.dist_info
        )
        say(f"saved checkpoint {step_dir} ({time.time() - started:.1f} s)", self.dist_info.is_main)
        self.last_saved, self.saved_dir, self.last_dir = progress.step, step_dir, step_dir
        return step_dir

    def ensure_saved(self, progress: Progress) -> Path:
        """The checkpoint of this step: saved now unless this invocation already saved it (collective)."""
        if self.saved_dir is not None and self.last_saved == progress.step:
            return self.saved_dir
        return self.save(progress)
