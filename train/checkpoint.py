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
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from data_pipeline.atomic import atomic_write_json, atomic_write_text, replace_dir
from train.checkpoint_files import record_files
from train.distributed import DistInfo, barrier
from train.errors import TrainError
from train.rng_state import rng_state, set_rng_state
from train.safe_load import safe_load, scan_pickles

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
LATEST = "latest"
TMP_PREFIX = "tmp."
STEP_RE = re.compile(r"^step_(\d{8,})$")
# Model keys that do not change the weights' shapes or meaning, so a resume may change them.
MODEL_KEYS_FREE_TO_CHANGE = ("init_std",)
SLEEP_IN_SAVE_ENV = "SLM_SLEEP_IN_SAVE"
"""Fault-injection hook for tests: `[STEP:]SECONDS` sleeps between DeepSpeed's save and the
COMPLETE marker/rename (only at STEP when given), so a test can `kill -9` a save deterministically."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(step_dir: Path) -> int:
    match = STEP_RE.match(Path(step_dir).name)
    if not match:
        raise TrainError(f"'{step_dir}' is not a checkpoint step folder (expected a name like step_00000100).")
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
    return found[-1] if found else None


def read_meta(step_dir: str | os.PathLike) -> Dict[str, Any]:
    """meta.json of a checkpoint: step, tokens_seen, config, tokenizer_sha256, manifest_sha256, world_size, zero_stage."""
    meta_path = Path(step_dir) / META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainError(f"Checkpoint '{step_dir}' has no {META}; expected a complete step folder written by slm train.") from None
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"Checkpoint metadata '{meta_path}' could not be read: {err}.") from None
    missing = [k for k in ("step", "tokens_seen", "config", "tokenizer_sha256", "manifest_sha256", "world_size", "zero_stage")
               if k not in meta]
    if missing:
        raise TrainError(f"Checkpoint metadata '{meta_path}' lacks {', '.join(missing)}; it was not written by this slm train.")
    return meta


# ---------------------------------------------------------------- compatibility


def _model_shape(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in config.get("model", {}).items() if k not in MODEL_KEYS_FREE_TO_CHANGE}


def load_mode(meta: Dict[str, Any], world_size: int, zero_stage: int) -> str:
    """How a checkpoint loads into a run with this layout: "plain", "universal" or "refuse".

    Same world size and ZeRO stage: plain. ZeRO 0 keeps the whole optimizer state in one file, so it
    loads plainly on any world size. ZeRO 1-3 shards it by rank: a different world size or stage goes
    through a DeepSpeed universal checkpoint. Between ZeRO 0 and 1-3 there is no conversion.
    """
    if meta["world_size"] == world_size and meta["zero_stage"] == zero_stage:
        return "plain"
    if meta["zero_stage"] == 0 and zero_stage == 0:
        return "plain"
    if meta["zero_stage"] >= 1 and zero_stage >= 1:
        return "universal"
    return "refuse"


def differences(meta: Dict[str, Any], config: Dict[str, Any], tokenizer_sha256: str, manifest_sha256: Optional[str],
                world_size: int) -> List[str]:
    """Human-readable reasons why the checkpoint cannot continue this run (empty when it can)."""
    found: List[str] = []
    saved, wanted = _model_shape(meta["config"]), _model_shape(config)
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            found.append(f"model.{key} is {saved.get(key)!r} in the checkpoint but {wanted.get(key)!r} in this run")
    if meta["tokenizer_sha256"] != tokenizer_sha256:
        found.append(f"the tokenizer differs (sha256 {str(meta['tokenizer_sha256'])[:12]}... in the checkpoint, "
                     f"{tokenizer_sha256[:12]}... in data.dir)")
    if manifest_sha256 is not None and meta["manifest_sha256"] != manifest_sha256:
        found.append(f"the data manifest differs (sha256 {str(meta['manifest_sha256'])[:12]}... in the checkpoint, "
                     f"{manifest_sha256[:12]}... in data.dir): the loader position would point into different data")
    saved_train, wanted_train = meta["config"].get("train", {}), config.get("train", {})
    if saved_train.get("precision") != wanted_train.get("precision"):
        found.append(f"train.precision is {saved_train.get('precision')!r} in the checkpoint but "
                     f"{wanted_train.get('precision')!r} in this run")
    if load_mode(meta, world_size, int(wanted_train.get("zero_stage", -1))) == "refuse":
        found.append(f"the checkpoint was written with ZeRO stage {meta['zero_stage']} on {meta['world_size']} rank(s) "
                     f"and this run uses ZeRO stage {wanted_train.get('zero_stage')} on {world_size} rank(s): "
                     "DeepSpeed cannot convert between ZeRO 0 and ZeRO 1-3 optimizer states")
    return found


def check_resumable(step_dir: Path, meta: Dict[str, Any], config: Dict[str, Any], tokenizer_sha256: str,
                    manifest_sha256: Optional[str], world_size: int) -> None:
    """Raise a TrainError listing every difference between the checkpoint and this run."""
    found = differences(meta, config, tokenizer_sha256, manifest_sha256, world_size)
    if found:
        raise TrainError(
            f"Refusing to resume from checkpoint '{step_dir}': " + "; ".join(found) + ". "
            "Resume with the configuration and data the checkpoint was trained with, start a fresh run.dir, "
            "or use train.stage=cpt with train.init_from to start new training from its weights."
        )


# ---------------------------------------------------------------- RNG state


# rng_state / set_rng_state live in train.rng_state (tensors and plain types only).


def rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rng_rank{rank:05d}.pt"


# ---------------------------------------------------------------- save / load


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sleep_in_save_hook(step: int) -> None:
    spec = os.environ.get(SLEEP_IN_SAVE_ENV)
    if not spec:
        return
    at_step, _, seconds = spec.rpartition(":")
    if at_step and int(at_step) != step:
        return
    print(f"[slm] fault injection ({SLEEP_IN_SAVE_ENV}): sleeping {seconds} s inside the save of {step_tag(step)}",
          file=sys.stderr, flush=True)
    time.sleep(float(seconds))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> List[Path]:
    """Delete all but the newest `keep` complete checkpoints and any leftover temporary folders."""
    removed = []
    for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    for stale in ckpt_dir.glob(f"{TMP_PREFIX}step_*"):  # only our own temporary names, never a user's file
        if stale.is_dir() and STEP_RE.match(stale.name[len(TMP_PREFIX):]):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    for stale in ckpt_dir.glob(".step_*.old"):
        if stale.is_dir() and STEP_RE.match(stale.name[1:-len(".old")]):
            shutil.rmtree(stale, ignore_errors=True)
    return removed


def save_checkpoint(engine: Any, run_dir: Path, step: int, client_state: Dict[str, Any], meta: Dict[str, Any],
                    tokenizer_path: Path, keep: int, dist_info: DistInfo) -> Path:
    """Save collectively (every rank calls this); returns the final step folder."""
    ckpt_dir = run_dir / CHECKPOINTS
    tag = step_tag(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    if dist_info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    barrier()
    torch.save(rng_state(), rng_file(tmp_dir, dist_info.rank))
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shards and RNG file are on disk
    _sleep_in_save_hook(step)
    if dist_info.is_main:
        shutil.copyfile(tokenizer_path, tmp_dir / "tokenizer.json")
        meta = {**meta, **record_files(tmp_dir)}  # size and hash of every file, before COMPLETE
        atomic_write_json(tmp_dir / META, meta)
        atomic_write_text(tmp_dir / COMPLETE, f"{tag}\n")
        _fsync_dir(tmp_dir)
        replace_dir(tmp_dir, final_dir)  # final_dir exists when saved again at one step (a resumed run's last save)
        _fsync_dir(ckpt_dir)
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
    args = argparse.Namespace(input_folder=str(step_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    print(f"[slm] converting {step_dir} to a DeepSpeed universal checkpoint (world size or ZeRO stage changed)",
          flush=True)
    try:
        ds_to_universal(args)
    except Exception as err:  # DeepSpeed raises assertion/value/key errors from deep inside
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainError(f"Converting checkpoint '{step_dir}' to a universal checkpoint failed ({type(err).__name__}: "
                         f"{err}); resume with the world size and ZeRO stage it was written with.") from None
    for name in (META, "tokenizer.json"):
        shutil.copyfile(step_dir / name, tmp / name)
    atomic_write_text(tmp / COMPLETE, f"{UNIVERSAL}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_checkpoint(engine: Any, step_dir: Path, rank: int, universal_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Load weights, optimizer and client state into `engine`, and this rank's RNG state; returns the client state.

    `universal_dir` is a DeepSpeed universal checkpoint converted from `step_dir` (world-size change).
    """
    source = universal_dir or step_dir
    scan_pickles(source)  # DeepSpeed unpickles with weights_only=False: refuse anything but plain types first
    try:
        load_path, client_state = engine.load_checkpoint(
            str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=False,
        )
    except (RuntimeError, KeyError, ValueError, AssertionError, OSError) as err:
        detail = " ".join(str(err).split())[:800] or missing_deepspeed_files(source)
        raise TrainError(f"DeepSpeed could not load checkpoint '{source}': {type(err).__name__}: {detail}") from None
    if load_path is None or client_state is None:
        raise TrainError(f"DeepSpeed found no checkpoint to load in '{source}'.")
    rng_path = rng_file(step_dir, rank)
    if rng_path.is_file() and universal_dir is None:
        set_rng_state(safe_load(rng_path), str(rng_path))
    return client_state
