"""`slm prepare` into a URL data.dir: shards are written in a local staging folder and uploaded as they
are sealed, each upload complete (and its size checked) before the shard is journaled; the tokenizer goes
first and the manifest last, so a half-uploaded dataset is never taken for a complete one.

The staging folder (under data.cache_dir, node-local temp by default) holds the usual `.prepare` state,
so an interrupted prepare resumes from its last commit there; the shards already uploaded are on the
remote and are not sent again. At most every REMOTE_COMMIT_SECONDS the commit is also mirrored to the
remote's `.prepare/` (partial shards, journal, then state.json last), so a prepare whose staging folder is
gone (another machine) resumes from that snapshot instead of from the start. `.prepare-origin.json` on the remote records the config the shards come
from: a prepare with another config into the same URL is refused instead of overwriting them. An uploaded
shard's local copy is removed once the journal naming it is committed, so staging holds at most the
shards of one commit. Nothing on the remote is ever deleted.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

from common import faults
from common.atomic import atomic_write_json
from common.log import say
from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.format.manifest import Manifest, load_manifest, verify_dataset
from data_pipeline.format.names import (
    JOURNAL,
    MANIFEST,
    ORIGIN,
    STATE,
    TOKENIZER,
    WORK_DIR,
    shard_file_name,
)
from data_pipeline.prepare.common import (
    check_same_origin,
    parse_prepare_state,
    prepare_fingerprint,
    prepare_lock,
    report_complete,
)
from data_pipeline.prepare.local import prepare_into
from data_pipeline.sources.corpus import source_names
from data_pipeline.storage.cache import dataset_cache_dir
from data_pipeline.storage.store import DataStore
from data_pipeline.tokenizer import tokenizers_single_threaded

REMOTE_COMMIT_SECONDS = 60.0
"""Mirror a commit to the remote at most this often (common.faults.prepare_remote_commit_seconds overrides it)."""


class Publisher:
    """Uploads a prepare's files from the staging folder to the remote dataset folder."""

    def __init__(self, store: DataStore, staging: Path):
        self.store, self.staging = store, staging
        self.uploaded: List[Path] = []
        self.last_snapshot = 0.0

    def tokenizer(self, path: Path) -> None:
        self.store.upload(path, TOKENIZER)

    def shard(self, path: Path) -> None:
        self.store.upload(path, path.relative_to(self.staging).as_posix())
        self.uploaded.append(path)

    def committed(self, work_dir: Path) -> None:
        for path in self.uploaded:
            if path.exists():
                path.unlink()
        self.uploaded = []
        if time.time() - self.last_snapshot >= faults.prepare_remote_commit_seconds(REMOTE_COMMIT_SECONDS):
            self._snapshot(work_dir)

    def _snapshot(self, work_dir: Path) -> None:
        """Mirror the local commit: partial shards and journal first, state.json last (the commit marker)."""
        for path in sorted(work_dir.glob("*.partial")) + [work_dir / JOURNAL, work_dir / STATE]:
            self.store.upload(path, f"{WORK_DIR}/{path.name}")
        self.last_snapshot = time.time()

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


def _restore_snapshot(store: DataStore, staging: Path, names: List[str]) -> None:
    """Rebuild the staging folder from the remote's last mirrored commit (when this node has none)."""
    work = staging / WORK_DIR
    if (work / STATE).exists() or not store.exists(f"{WORK_DIR}/{STATE}"):
        return
    state = parse_prepare_state(
        store.read_bytes(f"{WORK_DIR}/{STATE}").decode("utf-8", errors="replace"),
        store.url(f"{WORK_DIR}/{STATE}"),
        str(store),
    )
    work.mkdir(parents=True, exist_ok=True)
    wanted = [JOURNAL] + [
        shard_file_name(names[state["source_index"]], split, part["index"]) + ".partial"
        for split, part in state["source"]["partial"].items()
        if part["tokens"] and state["source_index"] < len(names)
    ]
    for name in wanted:
        store.download(f"{WORK_DIR}/{name}", work / name)
    store.download(TOKENIZER, staging / TOKENIZER)
    atomic_write_json(work / STATE, state)  # last: the local commit marker
    say(f"prepare: restored the interrupted prepare's last commit from {store.url(WORK_DIR)}")


def prepare_remote(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig) -> str:
    store = DataStore(data_cfg.dir, data_cfg.storage_options)
    source_names(data_cfg.sources)
    tokenizers_single_threaded()  # forked workers must not inherit Rust threads
    fingerprint = prepare_fingerprint(data_cfg, tokenizer_cfg)
    if store.exists(MANIFEST):
        manifest = load_manifest(store)
        check_same_origin(
            manifest.path,
            store.location,
            manifest.prepared_from,
            manifest.tokenizer_sha256,
            fingerprint,
            tokenizer_cfg,
        )
        verify_dataset(manifest)
        report_complete(store, manifest)
        return store.location
    staging = dataset_cache_dir(store, data_cfg.cache_dir) / "prepare"
    with prepare_lock(staging):
        if store.exists(MANIFEST):  # another process finished it while this one waited for the lock
            report_complete(store, load_manifest(store))
            return store.location
        _claim_origin(store, staging, fingerprint)
        _restore_snapshot(store, staging, source_names(data_cfg.sources))
        say(f"prepare: writing {store} through the local staging folder {staging}")
        prepare_into(
            replace(data_cfg, dir=str(staging)),
            tokenizer_cfg,
            staging,
            fingerprint,
            Publisher(store, staging),
        )
    shutil.rmtree(staging, ignore_errors=True)
    return store.location
