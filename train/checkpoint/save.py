"""Saving a checkpoint that is either complete or invisible (the layout and its steps: train.checkpoint.layout)."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

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
    rng_file,
    step_of,
    step_tag,
    tokenizer_file,
)
from train.checkpoint.record import FILES_KEY, HASH_KEY, CheckpointRecord, Progress, RunIdentity
from train.checkpoint.remote import RemoteCheckpoints
from train.checkpoint.rng_state import rng_state
from train.distributed import DistInfo, barrier, gather_objects
from train.errors import TrainError


def _sleep_in_save_hook(step: int) -> None:
    seconds = faults.sleep_in_save(step)
    if seconds is None:
        return
    say(
        f"fault injection ({faults.SLEEP_IN_SAVE}): sleeping {seconds:g} s inside the save of {step_tag(step)}"
    )
    faults.pause_in_save(seconds)


Finish = Optional[Callable[[], Path]]
"""Rank 0's rest of a save once every rank's states are on local disk (hashes, upload, meta.json, COMPLETE,
rotation); None on the other ranks."""


def _fail_save_hook(step: int) -> None:
    if faults.fail_save(step):
        raise OSError(
            f"fault injection ({faults.FAIL_SAVE_AT_STEP}): the save of {step_tag(step)} fails here"
        )


@contextlib.contextmanager
def disk_full_refused(states_dir: Path, tag: str) -> Iterator[None]:
    """A save whose local writes fail because the disk is full removes its own partial folder and says so, naming
    the resume point (the previous checkpoint), instead of a deep traceback from torch.save."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not (states_dir.is_dir() and disk_is_full(err, states_dir)):
            raise
        tmp_dir = states_dir / (TMP_PREFIX + tag)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # ours, incomplete, and holding the space
        latest = states_dir / LATEST
        previous = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
        kept = (
            f"the previous checkpoint {states_dir / previous} stays the resume point"
            if previous
            else "the previous complete checkpoint, if any, stays the resume point"
        )
        raise TrainError(
            f"Saving checkpoint {tag} into {states_dir} failed: the disk is full ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:120]}). The partial {tmp_dir.name} was removed and {kept}. Free space "
            f"on that disk (or lower checkpoint.keep) and run the same command to resume."
        ) from None


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
    with disk_full_refused(
        remote.staging if remote is not None else ckpt_dir, step_tag(record.progress.step)
    ):
        final_dir, finish = stage_checkpoint(
            engine, ckpt_dir, record, tokenizer_path, keep, dist_info, remote
        )
        if finish is not None:
            finish()
    barrier()
    return final_dir


def stage_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    record: CheckpointRecord,
    tokenizer_path: Path,
    keep: int,
    dist_info: DistInfo,
    remote: Optional[RemoteCheckpoints] = None,
) -> Tuple[Path, Finish]:
    """The collective part of a save: every rank's states written to local disk (and, on several nodes with a
    URL, each node's part uploaded). Returns the final step folder and rank 0's `Finish`, which may run in a
    background thread (it calls no collective)."""
    tag = step_tag(record.progress.step)
    if remote is not None:
        return remote.copy_dir(tag), _stage_remote(engine, remote, record, tokenizer_path, keep, dist_info)
    tmp_dir, final_dir = ckpt_dir / (TMP_PREFIX + tag), ckpt_dir / tag
    _write_states(engine, ckpt_dir, tag, dist_info, dist_info.is_main)
    if not dist_info.is_main:
        return final_dir, None

    def finish() -> Path:
        shutil.copyfile(tokenizer_path, tokenizer_file(tmp_dir))
        files = record_files(tmp_dir)
        _fail_save_hook(record.progress.step)
        atomic_write_json(tmp_dir / META, record.to_meta(files))  # every file's size and hash
        atomic_write_text(tmp_dir / COMPLETE, f"{tag}\n")
        fsync_dir(tmp_dir)
        replace_dir(
            tmp_dir, final_dir
        )  # final_dir exists when saved again at one step (a resumed run's last save)
        fsync_dir(ckpt_dir)
        atomic_write_text(ckpt_dir / LATEST, f"{tag}\n")
        prune_checkpoints(ckpt_dir, keep)
        return final_dir

    return final_dir, finish


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


def _stage_remote(
    engine: Any,
    remote: RemoteCheckpoints,
    record: CheckpointRecord,
    tokenizer_path: Path,
    keep: int,
    dist_info: DistInfo,
) -> Finish:
    """A save to a URL (train.checkpoint.remote), staged per node. On one node rank 0's Finish uploads every file;
    on several, each node's first rank uploads its node's files here and rank 0 gathers their records. Finish then
    uploads meta.json (the record of every file), COMPLETE and `latest`, and rotates."""
    tag = step_tag(record.progress.step)
    tmp_dir = remote.staging / (TMP_PREFIX + tag)
    if dist_info.is_main:
        remote.open_step(tag)
    _write_states(engine, remote.staging, tag, dist_info, dist_info.local_rank == 0)
    parts: Optional[List[Dict[str, Any]]] = None
    if dist_info.n_nodes > 1:
        part: Dict[str, Any] = {}
        if dist_info.local_rank == 0:
            if dist_info.is_main:
                shutil.copyfile(tokenizer_path, tokenizer_file(tmp_dir))
            part = remote.upload_files(tmp_dir, tag)
            if not dist_info.is_main:
                shutil.rmtree(tmp_dir, ignore_errors=True)  # this node's part is on the store
        parts = [p for p in gather_objects(part) if p]
    if not dist_info.is_main:
        return None

    def finish() -> Path:
        uploaded = parts
        if uploaded is None:  # one node: every rank's files are in this staging folder
            shutil.copyfile(tokenizer_path, tokenizer_file(tmp_dir))
            uploaded = [remote.upload_files(tmp_dir, tag)]
        files = {name: entry for p in uploaded for name, entry in p[FILES_KEY].items()}
        _fail_save_hook(record.progress.step)
        atomic_write_json(tmp_dir / META, record.to_meta({FILES_KEY: files, HASH_KEY: uploaded[0][HASH_KEY]}))
        copy = remote.publish(tmp_dir, tag)
        remote.prune(keep)
        return copy

    return finish


class BackgroundSave:
    """Rank 0's Finish of one save, running in a thread while training goes on (checkpoint.async_save)."""

    def __init__(self, finish: Callable[[], Path], where: str, started: float) -> None:
        self.where, self.started = where, started
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(finish,), name="checkpoint-save", daemon=True)
        self.thread.start()

    def _run(self, finish: Callable[[], Path]) -> None:
        try:
            finish()
        except BaseException as err:  # reported by CheckpointSaver.wait on the training thread
            self.error = err


class CheckpointSaver:
    """Saves this run's checkpoints: the record of each is built here from the progress and the loader's state.

    With `background` (checkpoint.async_save, one node), a save blocks training only while every rank writes its
    states to local disk; rank 0 then hashes, uploads, writes meta.json and COMPLETE and rotates in a thread. At
    most one save is in flight: the next save, an export and the end of the run (finished, timed out, or stopped
    by a signal) wait for it first.
    """

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
        last_dir: Optional[Path] = None,
        remote: Optional[RemoteCheckpoints] = None,
        background: bool = False,
    ) -> None:
        self.engine, self.ckpt_dir, self.identity = engine, ckpt_dir, identity
        self.train_loader, self.remote = train_loader, remote
        """remote: the checkpoint folder's URL (None when ckpt_dir is a local folder)."""
        self.tokenizer_path, self.keep, self.dist_info = tokenizer_path, keep, dist_info
        self.background = background and dist_info.n_nodes == 1
        """Finish saves in a thread (on several nodes each node uploads its part inside the collective save)."""
        self.last_saved = last_saved
        """The step of the newest checkpoint this run stands on (the resumed one, or the last saved)."""
        self.saved_dir: Optional[Path] = None
        """The folder saved by this invocation at step `last_saved` (None before the first save)."""
        self.last_dir = last_dir
        """The folder of checkpoint `last_saved` (the resumed one, possibly in another run.dir, or the last saved);
        with a background save complete only once `wait()` returns."""
        self.pending: Optional[BackgroundSave] = None
        """Rank 0: the save in flight."""
        self.failed: Optional[str] = None
        """Rank 0: why the last background save failed (None when it did not)."""

    def _where(self, step_dir: Path) -> str:
        return f"{self.remote.url}/{step_dir.name}" if self.remote is not None else str(step_dir)

    def save(self, progress: Progress, wait: bool = True) -> Path:
        """Save now (collective); returns the final step folder. With background saving and `wait=False` the
        folder is complete only once `wait()` returns."""
        self.wait()  # at most one save in flight (the other ranks wait for rank 0 inside the save's barrier)
        record = CheckpointRecord(replace(progress), self.train_loader.state_dict(), self.identity)
        started = time.time()
        args = (
            self.engine,
            self.ckpt_dir,
            record,
            self.tokenizer_path,
            self.keep,
            self.dist_info,
            self.remote,
        )
        if not self.background:
            step_dir = save_checkpoint(*args)
            say(
                f"saved checkpoint {self._where(step_dir)} ({time.time() - started:.1f} s)",
                self.dist_info.is_main,
            )
        else:
            states_dir = self.remote.staging if self.remote is not None else self.ckpt_dir
            with disk_full_refused(states_dir, step_tag(progress.step)):
                step_dir, finish = stage_checkpoint(*args)
            if finish is not None:
                self.pending = BackgroundSave(finish, self._where(step_dir), started)
            say(
                f"checkpoint {self._where(step_dir)}: states written in {time.time() - started:.1f} s (training "
                "blocked); hashing, upload and COMPLETE continue in the background",
                self.dist_info.is_main,
            )
            if wait:
                self.wait()
        self.last_saved, self.saved_dir, self.last_dir = progress.step, step_dir, step_dir
        return step_dir

    def wait(self) -> None:
        """Rank 0: let the save in flight finish (no collective). A failure is reported, and kept in `failed`: the
        previous complete checkpoint stays the resume point."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        waited = time.time()
        pending.thread.join()
        if pending.error is not None:
            self.failed = (
                f"the background save of {pending.where} failed ({type(pending.error).__name__}: {pending.error}); "
                "it is not complete, so a resume uses the previous complete checkpoint"
            )
            say(f"warning: {self.failed}")
            return
        self.failed = None
        say(
            f"saved checkpoint {pending.where} ({time.time() - pending.started:.1f} s; "
            f"{time.time() - waited:.1f} s of it waited for)"
        )

    def ensure_saved(self, progress: Progress, wait: bool = True) -> Path:
        """The checkpoint of this step: saved now unless this invocation already saved it (collective); complete
        on return unless `wait=False`."""
        if self.saved_dir is not None and self.last_saved == progress.step:
            if wait:
                self.wait()
            return self.saved_dir
        return self.save(progress, wait)
