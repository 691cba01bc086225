"""manifest.json: the table of contents of a prepared dataset, and the checks that it still holds.

It records the format version, the token dtype, the tokenizer's sha256 (its identity), what the data
was prepared from, each source's document counts, and per shard its file (relative), split, source,
token/document/text-byte counts and sha256. It is written last, so it also marks a complete prepare.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from common.atomic import atomic_write_json
from common.files import file_sha256
from data_pipeline.errors import DataError
from data_pipeline.shards import ShardRecord
from data_pipeline.tokenizer import token_dtype

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")


@dataclass
class Manifest:
    path: Path
    """The manifest file (shard paths are relative to its folder)."""
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

    @property
    def data_dir(self) -> Path:
        return self.path.parent

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
            "format_version": self.format_version, "dtype": self.dtype, "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size, "eot_id": self.eot_id, "val_fraction": self.val_fraction,
            "shard_tokens": self.shard_tokens, "sources": self.sources,
            "shards": [s.to_dict() for s in self.shards], "prepared_from": self.prepared_from,
        }


def write_manifest(manifest: Manifest) -> None:
    atomic_write_json(manifest.path, manifest.to_dict())


def manifest_sha256(data_dir: str | os.PathLike) -> str:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"No {MANIFEST} in {data_dir}: run `slm prepare CONFIG` first.")
    return file_sha256(path)


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Read and sanity-check manifest.json (DataError naming the file when absent or malformed)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        partial = " A prepare was interrupted there: run it again to resume." if (Path(data_dir) / ".prepare").exists() else ""
        raise DataError(f"No {MANIFEST} in {data_dir}: expected a dataset written by `slm prepare CONFIG`.{partial}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"Manifest {path} could not be read ({err}); expected the JSON written by `slm prepare`.") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        raise DataError(f"Manifest {path} has format version {version!r}; this slm-forge reads version {FORMAT_VERSION}. Prepare the data again.")
    try:
        shards = [ShardRecord(**s) for s in raw["shards"]]
        manifest = Manifest(
            path=path, format_version=raw["format_version"], dtype=raw["dtype"], tokenizer_sha256=raw["tokenizer_sha256"],
            vocab_size=int(raw["vocab_size"]), eot_id=int(raw["eot_id"]), val_fraction=float(raw["val_fraction"]),
            shard_tokens=int(raw["shard_tokens"]), sources=list(raw["sources"]), shards=shards,
            prepared_from=dict(raw.get("prepared_from") or {}),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"Manifest {path} is malformed ({type(err).__name__}: {err}); prepare the data again.") from None
    return manifest


def _check_dtype(manifest: Manifest, shards: Sequence[ShardRecord]) -> None:
    if manifest.dtype not in DTYPES:
        raise DataError(f"Manifest {manifest.path} declares dtype {manifest.dtype!r}; expected one of {', '.join(DTYPES)}.")
    needed = token_dtype(manifest.vocab_size)
    if np.dtype(manifest.dtype).itemsize < np.dtype(needed).itemsize:
        raise DataError(
            f"Manifest {manifest.path} declares dtype {manifest.dtype} but its tokenizer has {manifest.vocab_size} tokens, "
            f"which needs {needed}."
        )
    for shard in shards:
        if shard.dtype != manifest.dtype:
            raise DataError(
                f"Shard {manifest.data_dir / shard.file} is recorded as {shard.dtype} but manifest {manifest.path} "
                f"declares {manifest.dtype}; a dataset holds one dtype."
            )


def shard_path(manifest: Manifest, shard: ShardRecord) -> Path:
    """The shard's absolute path; DataError when the recorded path leaves the dataset folder."""
    root = manifest.data_dir.resolve()
    path = (root / shard.file).resolve()
    if Path(shard.file).is_absolute() or not path.is_relative_to(root):
        raise DataError(
            f"Manifest {manifest.path} lists shard file {shard.file!r}, which lies outside the dataset folder {root}; "
            f"shard paths must be relative and stay inside it."
        )
    return path


def verify_dataset(manifest: Manifest, splits: Sequence[str] = SPLITS, checksums: bool = False) -> None:
    """Check before any batch is read: tokenizer identity, dtype, and every shard's place, size (and sha256)."""
    tokenizer = manifest.data_dir / TOKENIZER
    if not tokenizer.is_file():
        raise DataError(f"Tokenizer {tokenizer} is missing; manifest {manifest.path} was made with tokenizer sha256 {manifest.tokenizer_sha256}.")
    actual = file_sha256(tokenizer)
    if actual != manifest.tokenizer_sha256:
        raise DataError(
            f"Tokenizer {tokenizer} has sha256 {actual} but manifest {manifest.path} was made with tokenizer sha256 "
            f"{manifest.tokenizer_sha256}: the shards would decode to the wrong text. Restore the tokenizer or prepare again."
        )
    shards = [s for s in manifest.shards if s.split in splits]
    _check_dtype(manifest, shards)
    itemsize = np.dtype(manifest.dtype).itemsize
    for shard in shards:
        path = shard_path(manifest, shard)
        if not path.is_file():
            raise DataError(f"Shard {path} listed in manifest {manifest.path} is missing; prepare the data again.")
        size, expected = path.stat().st_size, shard.tokens * itemsize
        if size != expected:
            what = "truncated" if size < expected else "larger than recorded"
            raise DataError(
                f"Shard {path} is {what}: {size} bytes, but manifest {manifest.path} records {shard.tokens} "
                f"{manifest.dtype} tokens = {expected} bytes."
            )
        if checksums:
            digest = file_sha256(path)
            if digest != shard.sha256:
                raise DataError(f"Shard {path} has sha256 {digest} but manifest {manifest.path} records {shard.sha256}: the file is corrupt.")


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
