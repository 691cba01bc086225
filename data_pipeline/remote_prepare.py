"""`slm prepare` into a URL data.dir: shards are written in a local staging folder and uploaded as they
are sealed, each upload complete (and its size checked) before the shard is journaled; the tokenizer goes
first and the manifest last, so a half-uploaded dataset is never taken for a complete one.

The staging folder (under data.cache_dir, node-local temp by default) holds the usual `.prepare` state,
so an interrupted prepare resumes from its last commit there; the shards already uploaded are on the
remote and are not sent again. `.prepare-origin.json` on the remote records the config the shards come
from: a prepare with another config into the same URL is refused instead of overwriting them. An uploaded
shard's local copy is removed once the journal naming it is committed, so staging holds at most the
shards of one commit. Nothing on the remote is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

from data_pipeline.atomic import atomic_write_json
from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.manifest import MANIFEST, TOKENIZER, Manifest, load_manifest, verify_dataset
from data_pipeline.prepare import (
    _check_same_origin,
    _fingerprint,
    _locked,
    prepare_into,
    report_complete,
)
from data_pipeline.shard_cache import dataset_cache_dir
from data_pipeline.sources import source_names
from data_pipeline.storage import DataStore

ORIGIN = ".prepare-origin.json"


class Publisher:
    """Uploads a prepare's files from the staging folder to the remote dataset folder."""

    def __init__(self, store: DataStore, staging: Path):
        self.store, self.staging = store, staging
        self.uploaded: List[Path] = []

    def tokenizer(self, path: Path) -> None:
        self.store.upload(path, TOKENIZER)

    def shard(self, path: Path) -> None:
        self.store.upload(path, path.relative_to(self.staging).as_posix())
        self.uploaded.append(path)

    def committed(self) -> None:
        for path in self.uploaded:
            if path.exists():
                path.unlink()
        self.uploaded = []

    def manifest(self, manifest: Manifest) -> None:
        local = self.staging / ".manifest-upload.json"
        atomic_write_json(local, manifest.to_dict())
        self.store.upload(local, MANIFEST)
        local.unlink()


def _claim_origin(store: DataStore, staging: Path, fingerprint: Dict[str, Any]) -> None:
    """Record (or check) on the remote which config this folder's shards come from."""
    if store.exists(ORIGIN):
        recorded = json.loads(store.read_bytes(ORIGIN).decode("utf-8"))
        if recorded.get("prepared_from") != fingerprint:
            raise DataError(
                f"{store.url(ORIGIN)} shows that an interrupted prepare of another config wrote into {store}; its "
                f"shards would be overwritten. Use a new data.dir URL (slm-forge never deletes remote files)."
            )
        return
    local = staging / ORIGIN
    atomic_write_json(local, {"prepared_from": fingerprint})
    store.upload(local, ORIGIN)


def prepare_remote(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig) -> str:
    store = DataStore(data_cfg.dir, data_cfg.storage_options)
    source_names(data_cfg.sources)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fingerprint = _fingerprint(data_cfg, tokenizer_cfg)
    if store.exists(MANIFEST):
        manifest = load_manifest(store)
        _check_same_origin(manifest.path, store.location, manifest.prepared_from, manifest.tokenizer_sha256,
                           fingerprint, tokenizer_cfg)
        verify_dataset(manifest)
        report_complete(store, manifest)
        return store.location
    staging = dataset_cache_dir(store, data_cfg.cache_dir) / "prepare"
    with _locked(staging):
        if store.exists(MANIFEST):  # another process finished it while this one waited for the lock
            report_complete(store, load_manifest(store))
            return store.location
        _claim_origin(store, staging, fingerprint)
        print(f"prepare: writing {store} through the local staging folder {staging}", flush=True)
        prepare_into(replace(data_cfg, dir=str(staging)), tokenizer_cfg, staging, fingerprint, Publisher(store, staging))
    shutil.rmtree(staging, ignore_errors=True)
    return store.location
