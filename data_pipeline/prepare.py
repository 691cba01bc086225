"""`slm prepare`: raw sources -> tokenizer.json + token shards + manifest.json in `data.dir`.

The entry point: it takes the folder's lock, says a complete folder is complete (when it matches the
config), resumes or starts the prepare (prepare_run.py does the work), and sends the other modes where they
live: a URL data.dir to remote_prepare.py, --tokenizer-only / --part K/N / --merge to prepare_parts.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from common.files import file_sha256
from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.manifest import MANIFEST, TOKENIZER, Manifest, load_manifest, summary_table, verify_dataset
from data_pipeline.prepare_origin import check_same_origin, prepare_fingerprint
from data_pipeline.prepare_run import STATE, WORK_DIR, PrepareRun
from data_pipeline.prepare_target import claim_fresh_data_dir
from data_pipeline.prepare_tokenizer import obtain_tokenizer
from data_pipeline.shard_cache import local_file
from data_pipeline.sources import source_names
from data_pipeline.storage import is_remote
from data_pipeline.tokenizer import load_tokenizer, tokenizers_single_threaded

LOCK = ".prepare.lock"


def resolve_num_proc(num_proc: int) -> int:
    if num_proc > 0:
        return num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def prepare_lock(data_dir: Path) -> Iterator[None]:
    """One prepare per folder at a time (e.g. several ranks calling it): the others wait, then find it complete."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"prepare: another prepare of {data_dir} is running; waiting for it",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepare(
    data_cfg: DataConfig,
    tokenizer_cfg: TokenizerConfig,
    part: Optional[str] = None,
    merge: bool = False,
    tokenizer_only: bool = False,
) -> Path | str:
    """Train (or copy) the tokenizer and write the shards and manifest into data.dir; idempotent and resumable.
    On many nodes: tokenizer_only once, then part="K/N" for K in 1..N, then merge (prepare_parts.py).

    A URL data.dir is prepared in a local staging folder and uploaded as it goes (remote_prepare.py)."""
    if tokenizer_cfg.path and is_remote(tokenizer_cfg.path):
        local = local_file(tokenizer_cfg.path, data_cfg.storage_options, data_cfg.cache_dir)
        tokenizer_cfg = dataclasses.replace(tokenizer_cfg, path=str(local))
    if part or merge or tokenizer_only:
        from data_pipeline import prepare_parts

        if is_remote(data_cfg.dir):
            raise DataError(
                f"--part/--merge/--tokenizer-only need a local or shared data.dir, not {data_cfg.dir}; "
                f"prepare to a shared folder, then copy it to the object store, or prepare in one process."
            )
        if tokenizer_only:
            return prepare_parts.prepare_tokenizer_only(data_cfg, tokenizer_cfg)
        if merge:
            return prepare_parts.merge_parts(data_cfg, tokenizer_cfg)
        return prepare_parts.prepare_part(data_cfg, tokenizer_cfg, *prepare_parts.parse_part(part))
    if is_remote(data_cfg.dir):
        from data_pipeline.remote_prepare import prepare_remote

        return prepare_remote(data_cfg, tokenizer_cfg)
    data_dir = Path(data_cfg.dir)
    source_names(data_cfg.sources)
    tokenizers_single_threaded()  # forked workers must not inherit Rust threads
    with prepare_lock(data_dir):
        fingerprint = prepare_fingerprint(data_cfg, tokenizer_cfg)
        if (data_dir / MANIFEST).exists():
            manifest = load_manifest(data_dir)
            check_same_origin(
                manifest.path,
                data_dir,
                manifest.prepared_from,
                manifest.tokenizer_sha256,
                fingerprint,
                tokenizer_cfg,
            )
            verify_dataset(manifest)
            report_complete(data_dir, manifest)
            return data_dir
        if not (data_dir / WORK_DIR / STATE).exists():
            claim_fresh_data_dir(
                data_dir, WORK_DIR, LOCK
            )  # never write over files an earlier prepare did not write
        prepare_into(data_cfg, tokenizer_cfg, data_dir, fingerprint)
    return data_dir


def report_complete(where: Any, manifest: Manifest) -> None:
    print(
        f"prepare: {where} is already complete ({len(manifest.shards)} shards, "
        f"{manifest.tokens('train'):,} train + {manifest.tokens('val'):,} val tokens); nothing to do.",
        flush=True,
    )
    print(summary_table(manifest))


def prepare_into(
    data_cfg: DataConfig,
    tokenizer_cfg: TokenizerConfig,
    data_dir: Path,
    fingerprint: Dict[str, Any],
    publisher: Any = None,
) -> Manifest:
    """Start or resume the prepare in the local folder data_dir (the caller holds its lock). A publisher
    (remote_prepare.Publisher) uploads the tokenizer and each shard as it is sealed, and the manifest last."""
    num_proc = resolve_num_proc(data_cfg.num_proc)
    state_path = data_dir / WORK_DIR / STATE
    if state_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        check_same_origin(
            state_path,
            data_dir,
            state["prepared_from"],
            state["tokenizer_sha256"],
            fingerprint,
            tokenizer_cfg,
        )
        tokenizer_path = data_dir / TOKENIZER
        if not tokenizer_path.is_file() or file_sha256(tokenizer_path) != state["tokenizer_sha256"]:
            raise DataError(
                f"{tokenizer_path} is missing or is not the tokenizer (sha256 {state['tokenizer_sha256']}) that the "
                f"interrupted prepare recorded in {state_path}; delete {data_dir} and prepare again."
            )
        tokenizer, sha = load_tokenizer(tokenizer_path), state["tokenizer_sha256"]
    else:
        tokenizer, sha = obtain_tokenizer(data_cfg, tokenizer_cfg, data_dir, num_proc)
    if publisher is not None:
        publisher.tokenizer(data_dir / TOKENIZER)
    run = PrepareRun(data_cfg, data_dir, tokenizer, sha, fingerprint, num_proc)
    run.publisher = publisher
    return run.run()
