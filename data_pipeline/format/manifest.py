"""manifest.json: the table of contents of a prepared dataset, and the checks that it still holds.

It records the format version, the token dtype, the tokenizer's sha256 (its identity), what the data
was prepared from, each source's document counts, and per shard its file (relative), split, source,
token/document/text-byte counts and sha256. It is written last, so it also marks a complete prepare.

Before it is trusted it is checked field by field (types, ranges, cross-references), so a hand-edited or
damaged manifest fails with a DataError naming the field, never a TypeError deep in the loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from common.atomic import atomic_write_json
from common.files import file_sha256
from data_pipeline.errors import DataError
from data_pipeline.format.names import MANIFEST, SPLITS, TOKENIZER, WORK_DIR
from data_pipeline.format.shards import ShardRecord, max_id_check
from data_pipeline.storage.store import DataStore
from data_pipeline.tokenizer import token_dtype

FORMAT_VERSION = 1
DTYPES = ("uint16", "uint32")
SHARD_INTS = ("index", "tokens", "documents", "text_bytes")
SHARD_STRS = ("file", "split", "source", "dtype", "sha256")


@dataclass
class Manifest:
    path: Any
    """The manifest file (shard paths are relative to its folder): a Path, or a URL string when remote."""
    format_version: int
    dtype: str
    tokenizer_sha256: str
    vocab_size: int
    """The tokenizer's size (the model's is this rounded up to a multiple of 64)."""
    eot_id: int
    val_fraction: float
    shard_tokens: int
    sources: List[Dict[str, Any]]
    """Per source: name, documents, train/val documents, val_rule (interleave or tail), replaced_chars."""
    shards: List[ShardRecord]
    prepared_from: Dict[str, Any] = field(default_factory=dict)
    """The config that determines the shards; a prepare with another one into this folder is refused."""
    store: Optional[DataStore] = field(default=None, repr=False, compare=False)
    """The dataset folder it was read from (None: the folder of a local `path`)."""

    @property
    def data_dir(self) -> Path:
        return self.path.parent

    @property
    def dataset(self) -> DataStore:
        return self.store if self.store is not None else DataStore(self.data_dir)

    def source_names(self) -> List[str]:
        return [s["name"] for s in self.sources]

    def shards_of(self, split: str, source: Optional[str] = None) -> List[ShardRecord]:
        """A (source, split) stream's shards in stream order (all sources, in source order, if source is None)."""
        order = {name: i for i, name in enumerate(self.source_names())}
        chosen = [s for s in self.shards if s.split == split and (source is None or s.source == source)]
        return sorted(chosen, key=lambda s: (order.get(s.source, len(order)), s.index))

    def tokens(self, split: str, source: Optional[str] = None) -> int:
        return sum(s.tokens for s in self.shards_of(split, source))

    def bytes_per_token(self, split: str) -> float:
        """Text bytes per token of a split, to turn a loss in nats/token into bits per byte."""
        shards = self.shards_of(split)
        tokens = sum(s.tokens for s in shards)
        if tokens == 0:
            raise DataError(f"{self.path} lists no {split} tokens, so bytes per token is undefined.")
        return sum(s.text_bytes for s in shards) / tokens

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format_version": self.format_version,
            "dtype": self.dtype,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "val_fraction": self.val_fraction,
            "shard_tokens": self.shard_tokens,
            "sources": self.sources,
            "shards": [s.to_dict() for s in self.shards],
            "prepared_from": self.prepared_from,
        }


def write_manifest(manifest: Manifest) -> None:
    atomic_write_json(manifest.path, manifest.to_dict())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest_fields(raw: Dict[str, Any], path: Any) -> None:
    """DataError naming the first field of a raw manifest that has the wrong type, range or reference."""

    def bad(what: str) -> DataError:
        return DataError(f"Manifest {path} is malformed: {what}; prepare the data again.")

    if not isinstance(
        raw.get("dtype"), str
    ):  # which names are allowed is checked with the shards (_check_dtype)
        raise bad(f"dtype is {raw.get('dtype')!r}, expected one of {', '.join(DTYPES)}")
    for key in ("vocab_size", "shard_tokens"):
        if not _is_int(raw.get(key)) or raw[key] <= 0:
            raise bad(f"{key} is {raw.get(key)!r}, expected a positive integer")
    if not _is_int(raw.get("eot_id")) or not 0 <= raw["eot_id"] < raw["vocab_size"]:
        raise bad(f"eot_id is {raw.get('eot_id')!r}, expected an id below vocab_size {raw['vocab_size']}")
    if not isinstance(raw.get("tokenizer_sha256"), str):
        raise bad("tokenizer_sha256 is not a string")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) for s in sources
    ):
        raise bad("sources is not a list of objects with a name")
    names = {s["name"] for s in sources}
    shards = raw.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise bad("shards is not a list of objects")
    for i, shard in enumerate(shards):
        for key in SHARD_INTS:
            if not _is_int(shard.get(key)) or shard[key] < 0:
                raise bad(f"shards[{i}].{key} is {shard.get(key)!r}, expected an integer >= 0")
        for key in SHARD_STRS:
            if not isinstance(shard.get(key), str):
                raise bad(f"shards[{i}].{key} is {shard.get(key)!r}, expected a string")
        if shard["split"] not in SPLITS:
            raise bad(f"shards[{i}].split is {shard['split']!r}, expected one of {', '.join(SPLITS)}")
        if shard["source"] not in names:
            raise bad(f"shards[{i}].source {shard['source']!r} is not among the sources {sorted(names)}")
    counts = Counter(shard["file"] for shard in shards)  # one pass: a manifest may list 100k shards
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if repeated:
        raise bad(f"shard file {repeated[0]!r} is listed {counts[repeated[0]]} times (each shard once)")


def _store(data_dir: str | os.PathLike | DataStore) -> DataStore:
    return data_dir if isinstance(data_dir, DataStore) else DataStore(data_dir)


def manifest_sha256(data_dir: str | os.PathLike | DataStore) -> str:
    store = _store(data_dir)
    if not store.exists(MANIFEST):
        raise DataError(f"No {MANIFEST} in {store}: run `slm prepare CONFIG` first.")
    if store.root is not None:
        return file_sha256(store.root / MANIFEST)
    return hashlib.sha256(store.read_bytes(MANIFEST)).hexdigest()


def load_manifest(data_dir: str | os.PathLike | DataStore) -> Manifest:
    """Read and sanity-check manifest.json (DataError naming the file when absent or malformed); data_dir may
    be a local folder, an fsspec URL or a DataStore."""
    store = _store(data_dir)
    path: Any = store.root / MANIFEST if store.root is not None else store.url(MANIFEST)
    if not store.exists(MANIFEST):
        interrupted = store.root is not None and (store.root / WORK_DIR).exists()
        partial = " A prepare was interrupted there: run it again to resume." if interrupted else ""
        raise DataError(
            f"No {MANIFEST} in {store}: expected a dataset written by `slm prepare CONFIG`.{partial}"
        )
    try:
        raw = json.loads(store.read_bytes(MANIFEST).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"Manifest {path} could not be read ({err}); expected the JSON written by `slm prepare`."
        ) from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        raise DataError(
            f"Manifest {path} has format version {version!r}; this slm-forge reads version {FORMAT_VERSION}. Prepare the data again."
        )
    check_manifest_fields(raw, path)
    try:
        shards = [ShardRecord(**s) for s in raw["shards"]]
        manifest = Manifest(
            path=path,
            format_version=raw["format_version"],
            dtype=raw["dtype"],
            tokenizer_sha256=raw["tokenizer_sha256"],
            vocab_size=int(raw["vocab_size"]),
            eot_id=int(raw["eot_id"]),
            val_fraction=float(raw["val_fraction"]),
            shard_tokens=int(raw["shard_tokens"]),
            sources=list(raw["sources"]),
            shards=shards,
            prepared_from=dict(raw.get("prepared_from") or {}),
            store=store if store.remote else None,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"Manifest {path} is malformed ({type(err).__name__}: {err}); prepare the data again."
        ) from None
    return manifest


def _check_dtype(manifest: Manifest, shards: Sequence[ShardRecord]) -> None:
    if manifest.dtype not in DTYPES:
        raise DataError(
            f"Manifest {manifest.path} declares dtype {manifest.dtype!r}; expected one of {', '.join(DTYPES)}."
        )
    try:
        needed = token_dtype(manifest.vocab_size)
    except ValueError as err:
        raise DataError(f"Manifest {manifest.path} is damaged or hand-edited: {err}.") from None
    if np.dtype(manifest.dtype).itemsize < np.dtype(needed).itemsize:
        raise DataError(
            f"Manifest {manifest.path} declares dtype {manifest.dtype} but its tokenizer has {manifest.vocab_size} tokens, "
            f"which needs {needed}."
        )
    for shard in shards:
        if shard.dtype != manifest.dtype:
            raise DataError(
                f"Shard {manifest.dataset.url(shard.file)} is recorded as {shard.dtype} but manifest {manifest.path} "
                f"declares {manifest.dtype}; a dataset holds one dtype."
            )


def shard_name(manifest: Manifest, shard: ShardRecord) -> str:
    """The shard's path relative to the dataset folder, normalised; DataError when it would leave the folder.

    A lexical check (no filesystem call), so 100,000 shards cost no syscalls and it works the same on a URL."""
    name = posixpath.normpath(shard.file.replace(os.sep, "/"))
    if posixpath.isabs(name) or name == ".." or name.startswith("../") or "://" in name:
        raise DataError(
            f"Manifest {manifest.path} lists shard file {shard.file!r}, which lies outside the dataset folder "
            f"{manifest.dataset}; shard paths must be relative and stay inside it."
        )
    return name


def verify_dataset(manifest: Manifest, splits: Sequence[str] = SPLITS, checksums: bool = False) -> None:
    """Check before any batch is read: tokenizer identity, dtype, and every shard's place, size (and sha256).

    Sizes come from one listing of the dataset folder (one request on an object store, one scandir
    locally), not one stat per shard. Checksums of a remote dataset are checked by the shard cache, once
    per downloaded shard."""
    store = manifest.dataset
    tokenizer = store.url(TOKENIZER)
    sizes = store.listing()
    if TOKENIZER not in sizes:
        raise DataError(
            f"Tokenizer {tokenizer} is missing; manifest {manifest.path} was made with tokenizer sha256 {manifest.tokenizer_sha256}."
        )
    data = store.read_bytes(TOKENIZER) if store.remote else None
    actual = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(store.root / TOKENIZER)
    if actual != manifest.tokenizer_sha256:
        raise DataError(
            f"Tokenizer {tokenizer} has sha256 {actual} but manifest {manifest.path} was made with tokenizer sha256 "
            f"{manifest.tokenizer_sha256}: the shards would decode to the wrong text. Restore the tokenizer or prepare again."
        )
    shards = [s for s in manifest.shards if s.split in splits]
    _check_dtype(manifest, shards)
    itemsize = np.dtype(manifest.dtype).itemsize
    for shard in shards:
        name = shard_name(manifest, shard)
        size, expected = sizes.get(name), shard.tokens * itemsize
        if size is None:
            raise DataError(
                f"Shard {store.url(name)} listed in manifest {manifest.path} is missing; prepare the data again."
            )
        if size != expected:
            what = "truncated" if size < expected else "larger than recorded"
            raise DataError(
                f"Shard {store.url(name)} is {what}: {size} bytes, but manifest {manifest.path} records {shard.tokens} "
                f"{manifest.dtype} tokens = {expected} bytes."
            )
        if checksums and not store.remote:
            path = store.root / name
            digest = file_sha256(path)
            if digest != shard.sha256:
                raise DataError(
                    f"Shard {path} has sha256 {digest} but manifest {manifest.path} records {shard.sha256}: the file is corrupt."
                )
            max_id_check(path, manifest.dtype, manifest.vocab_size)


def summary_table(manifest: Manifest) -> str:
    """Per source and split: documents, tokens, shards, megabytes, text bytes per token."""
    itemsize = np.dtype(manifest.dtype).itemsize

    def row(name: str, split: str, shards: List[ShardRecord]) -> str:
        docs, tokens = sum(s.documents for s in shards), sum(s.tokens for s in shards)
        ratio = f"{sum(s.text_bytes for s in shards) / tokens:.3f}" if tokens else "-"
        return f"{name:<24} {split:<5} {docs:>11,} {tokens:>14,} {len(shards):>7} {tokens * itemsize / 1e6:>9.2f} {ratio:>12}"

    header = f"{'source':<24} {'split':<5} {'documents':>11} {'tokens':>14} {'shards':>7} {'MB':>9} {'bytes/token':>12}"
    lines = [header, "-" * len(header)]
    for name in manifest.source_names():
        lines += [row(name, split, manifest.shards_of(split, name)) for split in SPLITS]
    lines += ["-" * len(header), row("total", "", manifest.shards)]
    return "\n".join(lines)
