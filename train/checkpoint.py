"""Checkpoints that are either complete or invisible, and refusal of ones that do not fit the run.

Layout under `run.dir/checkpoints/`:
  step_00000100/   DeepSpeed's files for tag `step_00000100` (the folder's parent is DeepSpeed's
                   checkpoint_dir), `rng_rank00000.pt`... (one per rank), `meta.json`, a copy of
                   `tokenizer.json`, and the completion marker `COMPLETE`.
  latest           text file naming the newest complete tag, replaced atomically.

A save writes under the temporary tag `tmp.step_00000100`; only when every rank has finished does
rank 0 add meta.json, the tokenizer and COMPLETE, rename the folder to its final name and replace
`latest`. A kill at any moment therefore leaves either the new checkpoint or the previous one; a
folder without COMPLETE is never loaded. DeepSpeed's own `latest` file (written in place) is not
used. All ranks must see the same `run.dir` (a shared filesystem on multi-node jobs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from common import faults
from common.atomic import atomic_write_json, atomic_write_text, replace_dir
from common.files import fsync_dir
from train.checkpoint_files import record_files
from train.distributed import DistInfo, barrier
from train.errors import TrainError
from train.rng_state import rng_state, set_rng_state
from train.safe_load import safe_load, scan_pickles
from train.schedule import TimedDecay

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
LATEST = "latest"
TMP_PREFIX = "tmp."
STEP_RE = re.compile(r"^step_(\d{8,})$")


@dataclass
class Progress:
    """How far a run is: what the loop counts and a checkpoint restores."""

    step: int = 0
    """Optimizer steps taken (skipped non-finite steps included)."""
    tokens_seen: int = 0
    """Training tokens consumed, over all ranks."""
    skipped_steps: int = 0
    """Steps whose update was skipped as non-finite (train.on_nonfinite=skip)."""
    timed_decay: Optional[TimedDecay] = None
    """schedule.name=wsd_time: the decay decided from the clock (start step, length), once it has started."""


@dataclass
class RunIdentity:
    """What a checkpoint must match to continue a run: the config, the data and the layout it was written with."""

    config: Dict[str, Any]
    """The resolved config (train.config.to_dict)."""
    tokenizer_sha256: str
    """sha256 of data.dir/tokenizer.json."""
    manifest_sha256: Optional[str]
    """sha256 of data.dir/manifest.json (None for instruction data)."""
    world_size: int
    """Data-parallel ranks."""
    zero_stage: int
    """DeepSpeed ZeRO stage."""
    precision: str
    """bf16, fp16 or fp32."""
    plan: Optional[Dict[str, Any]] = None
    """What the run derived from its config (train.plan.RunPlan.to_dict; None in older checkpoints)."""


@dataclass
class CheckpointRecord:
    """The one record of a checkpoint (its meta.json): progress, the loader's position and the run's identity.

    DeepSpeed's own files hold only weights, optimizer state and DeepSpeed's counters; nothing of ours is
    duplicated into its client state.
    """

    progress: Progress
    """Step, tokens seen, skipped steps."""
    loader: Dict[str, Any]
    """The training loader's state_dict (its global cursor)."""
    identity: RunIdentity
    """Config, tokenizer/manifest sha256, world size, ZeRO stage, precision."""

    def to_meta(self, files: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """meta.json: one flat JSON object (tools read step, config, ... at the top level).

        `files` is the folder's file record (train.checkpoint_files.record_files: `files`, `files_hash`), taken
        once every other file is written and before COMPLETE; loads verify the folder against it.
        """
        return {
            **asdict(self.progress),
            **asdict(self.identity),
            "loader": self.loader,
            "saved_at": time.time(),
            **(files or {}),
        }

    @classmethod
    def from_meta(cls, meta: Dict[str, Any], where: Path) -> CheckpointRecord:
        if "loader" not in meta:
            raise TrainError(
                f"Checkpoint metadata '{where / META}' has no loader state; it was written by another "
                "version of slm train and cannot be resumed exactly (start a fresh run.dir, or use its "
                "weights with train.stage=cpt and train.init_from)."
            )
        decay = meta.get("timed_decay")
        timed_decay = TimedDecay(int(decay["start_step"]), int(decay["steps"])) if decay else None
        progress = Progress(
            int(meta["step"]), int(meta["tokens_seen"]), int(meta.get("skipped_steps", 0)), timed_decay
        )
        identity = RunIdentity(
            meta["config"],
            meta["tokenizer_sha256"],
            meta["manifest_sha256"],
            int(meta["world_size"]),
            int(meta["zero_stage"]),
            str(meta.get("precision")),
            meta.get("plan"),
        )
        return cls(progress, meta["loader"], identity)


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(step_dir: Path) -> int:
    match = STEP_RE.match(Path(step_dir).name)
    if not match:
        raise TrainError(
            f"'{step_dir}' is not a checkpoint step folder (expected a name like step_00000100)."
        )
    return int(match.group(1))


def is_complete(step_dir: Path) -> bool:
    return STEP_RE.match(step_dir.name) is not None and (step_dir / COMPLETE).is_file()


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
    if STEP_RE.match(path.name):
        return path if is_complete(path) else None
    ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    found = complete_checkpoints(ckpt_dir)
    newest = found[-1] if found else None
    pointed = read_latest(ckpt_dir)
    if newest is not None and pointed != newest and (ckpt_dir / LATEST).exists():
        print(
            f"[slm] note: {ckpt_dir / LATEST} names {pointed.name if pointed else 'no complete checkpoint'} but the "
            f"newest complete checkpoint is {newest.name} (a save was interrupted after its rename); using {newest.name}",
            file=sys.stderr,
            flush=True,
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
    return folder if STEP_RE.match(name) and is_complete(folder) else None


def read_meta(step_dir: str | os.PathLike) -> Dict[str, Any]:
    """meta.json of a checkpoint: step, tokens_seen, config, tokenizer_sha256, manifest_sha256, world_size, zero_stage."""
    meta_path = Path(step_dir) / META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainError(
            f"Checkpoint '{step_dir}' has no {META}; expected a complete step folder written by slm train."
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"Checkpoint metadata '{meta_path}' could not be read: {err}.") from None
    missing = [
        k
        for k in (
            "step",
            "tokens_seen",
            "config",
            "tokenizer_sha256",
            "manifest_sha256",
            "world_size",
            "zero_stage",
        )
        if k not in meta
    ]
    if missing:
        raise TrainError(
            f"Checkpoint metadata '{meta_path}' lacks {', '.join(missing)}; it was not written by this slm train."
        )
    return meta


# ---------------------------------------------------------------- RNG state (train.rng_state: tensors and plain types)


def rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rng_rank{rank:05d}.pt"


# ---------------------------------------------------------------- save / load


def _sleep_in_save_hook(step: int) -> None:
    seconds = faults.sleep_in_save(step)
    if seconds is None:
        return
    print(
        f"[slm] fault injection ({faults.SLEEP_IN_SAVE}): sleeping {seconds:g} s inside the save of {step_tag(step)}",
        file=sys.stderr,
        flush=True,
    )
    time.sleep(seconds)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> List[Path]:
    """Delete all but the newest `keep` complete checkpoints and any leftover temporary folders."""
    removed = []
    for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    for stale in ckpt_dir.glob(f"{TMP_PREFIX}step_*"):  # only our own temporary names, never a user's file
        if stale.is_dir() and STEP_RE.match(stale.name[len(TMP_PREFIX) :]):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    for stale in ckpt_dir.glob(".step_*.old"):
        if stale.is_dir() and STEP_RE.match(stale.name[1 : -len(".old")]):
            shutil.rmtree(stale, ignore_errors=True)
    return removed


def save_checkpoint(
    engine: Any, run_dir: Path, record: CheckpointRecord, tokenizer_path: Path, keep: int, dist_info: DistInfo
) -> Path:
    """Save collectively (every rank calls this); returns the final step folder."""
    ckpt_dir = run_dir / CHECKPOINTS
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
        shutil.copyfile(tokenizer_path, tmp_dir / "tokenizer.json")
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


UNIVERSAL = "universal"


def missing_deepspeed_files(step_dir: Path) -> str:
    """What DeepSpeed's bare AssertionError means: which of its files the folder lacks."""
    if not any(step_dir.glob("mp_rank_*_model_states.pt")):
        return f"mp_rank_00_model_states.pt is missing from {step_dir} (the checkpoint is incomplete)"
    return f"one of DeepSpeed's files in {step_dir} is missing or unreadable (the checkpoint is incomplete)"


def ensure_universal(step_dir: Path) -> Path:
    """A DeepSpeed universal checkpoint of `step_dir` (ZeRO 1-3), converted once into `step_dir/universal`.

    Written under a temporary name and renamed when complete, like every checkpoint; the conversion
    runs on rank 0 only (the caller shares the result).
    """
    out = step_dir / UNIVERSAL
    if (out / COMPLETE).is_file():
        return out
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = step_dir / f"{TMP_PREFIX}{UNIVERSAL}"
    scan_pickles(step_dir)  # ds_to_universal unpickles with weights_only=False
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(step_dir),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    print(
        f"[slm] converting {step_dir} to a DeepSpeed universal checkpoint (world size or ZeRO stage changed)",
        flush=True,
    )
    try:
        ds_to_universal(args)
    except Exception as err:  # DeepSpeed raises assertion/value/key errors from deep inside
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainError(
            f"Converting checkpoint '{step_dir}' to a universal checkpoint failed ({type(err).__name__}: "
            f"{err}); resume with the world size and ZeRO stage it was written with."
        ) from None
    for name in (META, "tokenizer.json"):
        shutil.copyfile(step_dir / name, tmp / name)
    atomic_write_text(tmp / COMPLETE, f"{UNIVERSAL}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_checkpoint(
    engine: Any, step_dir: Path, rank: int, universal_dir: Optional[Path] = None
) -> Dict[str, Any]:
    """Load weights, optimizer and client state into `engine`, and this rank's RNG state; returns the client state.

    `universal_dir` is a DeepSpeed universal checkpoint converted from `step_dir` (world-size change).
    """
    source = universal_dir or step_dir
    scan_pickles(source)  # DeepSpeed unpickles with weights_only=False: refuse anything but plain types first
    try:
        load_path, client_state = engine.load_checkpoint(
            str(source.parent),
            tag=source.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    except (RuntimeError, KeyError, ValueError, AssertionError, OSError) as err:
        detail = " ".join(str(err).split())[:800] or missing_deepspeed_files(source)
        raise TrainError(
            f"DeepSpeed could not load checkpoint '{source}': {type(err).__name__}: {detail}"
        ) from None
    if load_path is None or client_state is None:
        raise TrainError(f"DeepSpeed found no checkpoint to load in '{source}'.")
    rng_path = rng_file(step_dir, rank)
    if rng_path.is_file() and universal_dir is None:
        set_rng_state(safe_load(rng_path), str(rng_path))
    return client_state


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
    ) -> None:
        self.engine, self.run_dir, self.identity, self.train_loader = engine, run_dir, identity, train_loader
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
            self.engine, self.run_dir, record, self.tokenizer_path, self.keep, self.dist_info
        )
        if self.dist_info.is_main:
            print(f"[slm] saved checkpoint {step_dir} ({time.time() - started:.1f} s)", flush=True)
        self.last_saved, self.saved_dir = progress.step, step_dir
        return step_dir

    def ensure_saved(self, progress: Progress) -> Path:
        """The checkpoint of this step: saved now unless this invocation already saved it (collective)."""
        if self.saved_dir is not None and self.last_saved == progress.step:
            return self.saved_dir
        return self.save(progress)
