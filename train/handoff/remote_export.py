"""Weights named by a URL (`train.init_from`, `slm export`, `slm generate`, `slm eval`): an export or a checkpoint,
copied once into the local cache.

A checkpoint URL (checkpoint.dir, or one step folder of it) is fetched and verified by train.checkpoint.remote.
An export is a handful of plain files (safetensors, JSON, tokenizer) with no pickle, so a copy is all it takes. The copy goes to a folder of the node-local cache (`data.cache_dir`) named
by the URL, is written beside it and renamed into place, and is reused while every file keeps its size on
the store. Nothing on the store is written or deleted.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from common.atomic import replace_dir
from common.log import say
from data_pipeline.storage.cache import dataset_cache_dir
from data_pipeline.storage.store import DataStore
from train.checkpoint import fetch_checkpoint_url, holds_checkpoints
from train.errors import TrainError

EXPORT_MARKS = ("config.json", "tokenizer.json")
"""Files every `slm export` folder holds besides its safetensors weights."""


def _sizes(folder: Path) -> Dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def fetch_export(
    url: str, storage_options: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None
) -> Path:
    """The local copy of the export at `url` (downloaded, or reused when it matches the store's listing)."""
    store = DataStore(url, storage_options)
    listing = store.listing()
    weights = [name for name in listing if name.endswith(".safetensors")]
    missing = [name for name in EXPORT_MARKS if name not in listing]
    if missing or not weights:
        found = ", ".join(sorted(listing)[:8]) or "nothing"
        raise TrainError(
            f"{url} is not a Hugging Face export (found {found}; expected config.json, tokenizer.json and "
            "*.safetensors) nor a checkpoint folder (step_XXXXXXXX/COMPLETE); expected an `slm export` folder, "
            "a checkpoint.dir URL or one step folder of it."
        )
    target = dataset_cache_dir(store, cache_dir)
    if target.is_dir() and _sizes(target) == listing:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        store.download_listing(listing, tmp, TrainError)
        replace_dir(tmp, target)  # target is our own cache folder for this URL
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"copied the export {url} to {target}")
    return target


def fetch_weights(
    url: str, storage_options: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None
) -> Path:
    """The local copy of the checkpoint (its newest intact complete step, or the step folder named) or export at
    `url`."""
    if holds_checkpoints(url, storage_options):
        found = fetch_checkpoint_url(url, storage_options, cache_dir)
        if found is None:
            raise TrainError(f"{url} holds no intact complete checkpoint.")
        return found
    return fetch_export(url, storage_options, cache_dir)
