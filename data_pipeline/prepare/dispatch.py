"""`slm prepare`: raw sources -> tokenizer.json + token shards + manifest.json in `data.dir`.

The entry point only sends each request where it is done, and nothing imports it back: a local data.dir
to local.py (which runs engine.py), a URL data.dir to remote.py, --tokenizer-only / --part K/N / --merge to
parts.py. A tokenizer.path that is a URL is fetched into the cache first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare import parts
from data_pipeline.prepare.local import prepare_local
from data_pipeline.prepare.remote import prepare_remote
from data_pipeline.storage.cache import local_file
from data_pipeline.storage.store import is_remote


def prepare(
    data_cfg: DataConfig,
    tokenizer_cfg: TokenizerConfig,
    part: Optional[str] = None,
    merge: bool = False,
    tokenizer_only: bool = False,
) -> Path | str:
    """Train (or copy) the tokenizer and write the shards and manifest into data.dir; idempotent and resumable.
    On many nodes: tokenizer_only once, then part="K/N" for K in 1..N, then merge (parts.py).

    A URL data.dir is prepared in a local staging folder and uploaded as it goes (remote.py)."""
    if tokenizer_cfg.path and is_remote(tokenizer_cfg.path):
        local = local_file(tokenizer_cfg.path, data_cfg.storage_options, data_cfg.cache_dir)
        tokenizer_cfg = dataclasses.replace(tokenizer_cfg, path=str(local))
    if part or merge or tokenizer_only:
        if is_remote(data_cfg.dir):
            raise DataError(
                f"--part/--merge/--tokenizer-only need a local or shared data.dir, not {data_cfg.dir}; "
                f"prepare to a shared folder, then copy it to the object store, or prepare in one process."
            )
        if tokenizer_only:
            return parts.prepare_tokenizer_only(data_cfg, tokenizer_cfg)
        if merge:
            return parts.merge_parts(data_cfg, tokenizer_cfg)
        return parts.prepare_part(data_cfg, tokenizer_cfg, *parts.parse_part(part))
    if is_remote(data_cfg.dir):
        return prepare_remote(data_cfg, tokenizer_cfg)
    return prepare_local(data_cfg, tokenizer_cfg)
