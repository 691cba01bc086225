"""Saving a checkpoint that is either complete or invisible (the layout and its steps: train.checkpoint.layout)."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from common import faults
from common.atomic import atomic_write_json, atomic_write_text, replace_dir
from common.files import fsync_dir
from common.log import say
from train.checkpoint.files import record_files
from train.checkpoint.folders import prune_checkpoints
from train.checkpoint.layout import (
    COMPLETE,
    LATEST,
    META,
    TMP_PREFIX,
    rng_file,
    step_of,
    step_tag,
    tokenizer_file,
)
from train.checkpoint.record import FILES_KEY, HASH_KEY, CheckpointRecord, Progress, RunIdentity
from train.checkpoint.remote import RemoteCheckpoints
from train.checkpoint.rng_state import rng_state
from train.distributed import DistInfo, barrier, gather_objects


def _sleep_in_save_hook(step: int) -> None:
    seconds = faults.sleep_in_save(step)
    if seconds is None:
        return
    say(
        f"fault injection ({faults.SLEEP_IN_SAVE}): sleeping {seconds:g} s inside the save of {step_tag(step)}"
    )
    time.sleep(seconds)


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    record: CheckpointRecord,
    tokenizer_path: Path,
    keep: int,
    dist_info: DistInfo,
    remote: Optional[RemoteCheckpoints] = None,
) -> Path:
    """Save collectively (every rank calls this) into the checkpoint folder `ckpt_dir`, or to `remote` through its
    node-local staging folder; returns the final step folder (with `remote`: its local copy)."""
    if remote is not None:
        return _save_remote(engine, remote, record, tokenizer_path, keep, dist_info)
    step = record.progress.step
    tag = step_tag(step)
    tmp_dir, final_dir = ckpt_dir / (TMP_PREFIX + tag), ckpt_dir / tag
    _write_states(engine, ckpt_dir, tag, dist_info, dist_info.is_main)
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


def _write_states(engine: Any, ckpt_dir: Path, tag: str, dist_info: DistInfo, prepares: bool) -> None:
    """DeepSpeed's files and every rank's RNG states into `ckpt_dir/tmp.TAG` (emptied first by the ranks that
    `prepare` it: rank 0 on a shared folder, each node's first rank on a node-local one)."""
    tmp_dir = ckpt_dir / (TMP_PREFIX + tag)
    if prepares:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    barrier()
    torch.save(rng_state(), rng_file(tmp_dir, dist_info.rank))
    engine.save_checkpoint(str(ckpt_dir), tag=TMP_PREFIX + tag, client_state={}, save_latest=False)
    barrier()  # every rank's shards and RNG file are on disk
    _sleep_in_save_hook(step_of(Path(tag)))


def _save_remote(
    engine: Any,
    remote: RemoteCheckpoints,
    record: CheckpointRecord,
    tokenizer_path: Path,
    keep: int,
    dist_info: DistInfo,
) -> Path:
    """A save to a URL (train.checkpoint.remote): staged per node, each node's files uploaded by its first rank,
    then meta.json (the record of every node's files), COMPLETE and `latest` by rank 0, then the rotation."""
    tag = step_tag(record.progress.step)
    tmp_dir = remote.staging / (TMP_PREFIX + tag)
    if dist_info.is_main:
        remote.open_step(tag)
    _write_states(engine, remote.staging, tag, dist_info, dist_info.local_rank == 0)
    part: Dict[str, Any] = {}
    if dist_info.local_rank == 0:
        if dist_info.is_main:
            shutil.copyfile(tokenizer_path, tokenizer_file(tmp_dir))
        part = remote.upload_files(tmp_dir, tag)
    parts = [p for p in gather_objects(part) if p]
    copy = remote.copy_dir(tag)
    if dist_info.is_main:
        files = {name: entry for p in parts for name, entry in p[FILES_KEY].items()}
        atomic_write_json(tmp_dir / META, record.to_meta({FILES_KEY: files, HASH_KEY: parts[0][HASH_KEY]}))
        copy = remote.publish(tmp_dir, tag)
        remote.prune(keep)
    elif dist_info.local_rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # this node's part is on the store
    barrier()
    return copy


class CheckpointSaver:
    """Saves this run's checkpoints: the record of each is built here from the progress and the loader's state."""

    def __init__(
        self,
        engine: Any,
        ckpt_dir: Path,
        identity: RunIdentity,
        train_loader: Any,
        tokenizer_path: Path,
        keep: int,
        dist_info: DistInfo,
        last_saved: Optional[int],
        remote: Optional[RemoteCheckpoints] = None,
    ) -> None:
        self.engine, self.ckpt_dir, self.identity, self.train_loader = (
            engine,
            ckpt_dir,
            identity,
            train_loader,
        )
        self.remote = remote
        """The checkpoint folder's URL (None when ckpt_dir is a local folder)."""
        self.tokenizer_path, self.keep, self.dist_info = tokenizer_path, keep, dist_info
        self.last_saved = last_saved
        """The step of the newest checkpoint this run stands on (the resumed one, or the last saved)."""
        self.saved_dir: Optional[Path] = None
        """The folder saved by this invocation at step `last_saved` (None before the first save)."""

    def save(self, progress: Progress) -> Path:
        """Save now (collective); returns the final step folder."""
        record = CheckpointRecord(replace(progress), self.train_loader.state_dict(), self.identity)
        started = time.time()
        step_dir = save_checkpoint(
            self.engine, self.ckpt_dir, record, self.tokenizer_path, self.keep, self.dist_info, self.remote
        )
        where = f"{self.remote.url}/{step_dir.name}" if self.remote is not None else step_dir
        say(f"saved checkpoint {where} ({time.time() - started:.1f} s)", self.dist_info.is_main)
        self.last_saved, self.saved_dir = progress.step, step_dir
        return step_dir

    def ensure_saved(self, progress: Progress) -> Path:
        """The checkpoint of this step: saved now unless this invocation already saved it (collective)."""
        if self.saved_dir is not None and self.last_saved == progress.step:
            return self.saved_dir
        return self.save(progress)
