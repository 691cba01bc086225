"""Token shards: raw little-endian uint16/uint32 files of fixed size (`data.shard_tokens`), one sequence of
them per (source, split), and the checks of the token ids read from them.

A shard grows as an append-only `.partial` file in the work folder and is renamed to its final name when
full, so a reader never sees half a shard. The prepare state records how many tokens of the partial file
are committed; after a crash the file is cut back to that length (`ShardWriter.recover`).

Every read of a shard goes through `open_shard` (a read-only memory map, never the whole file in RAM). An
out-of-vocabulary token id is a DataError naming the shard and the offset, never an IndexError in the
embedding (or, on a GPU, a device-side assert): `max_id_check` scans a whole shard (with
data.verify_checksums); `window_check` is the loader's check of every window it reads, one max over
seq_len + 1 integers, far below the cost of a step.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.format.names import shard_file_name

SCAN_TOKENS = 1 << 24
"""Tokens per block when scanning a whole shard (64 MiB of uint32)."""


@dataclass
class ShardRecord:
    file: str
    """Path relative to the data folder."""
    split: str
    source: str
    index: int
    """Position in its (source, split) sequence; the sequence is one continuous token stream."""
    dtype: str
    tokens: int
    documents: int
    """Documents that end in this shard (EOT tokens)."""
    text_bytes: int
    """UTF-8 bytes of text its tokens stand for (separators excluded)."""
    sha256: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _little_endian(dtype: str | np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def open_shard(path: str | os.PathLike, dtype: str | np.dtype, random_access: bool = False) -> np.ndarray:
    """A shard's tokens, memory-mapped read-only (never read into RAM whole); an empty file gives an empty array
    (a map of 0 bytes is refused by the OS).

    `random_access` (the loader's reads of one window at a time) advises the kernel so (MADV_RANDOM): the first
    read through a fresh map otherwise triggers readahead of far more than the few KB a window needs, which
    dominated loading at corpus scale (hundreds of shards, each map opened anew; docs/benchmarks-data-scale.md).
    """
    dtype = _little_endian(dtype)
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the descriptor
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=len(mapped) // dtype.itemsize)


def _refuse(path: Path, offset: int, token: int, vocab_size: int) -> DataError:
    return DataError(
        f"Shard {path} holds token id {token} at token offset {offset}, outside the tokenizer's vocabulary "
        f"of {vocab_size} ids (0..{vocab_size - 1}); the shard is corrupt or was prepared with another "
        "tokenizer. Prepare the data again."
    )


def max_id_check(path: Path, dtype: str, vocab_size: int) -> None:
    """DataError when any token of the shard at `path` is >= vocab_size."""
    tokens = open_shard(path, dtype)
    for start in range(0, len(tokens), SCAN_TOKENS):
        block = tokens[start : start + SCAN_TOKENS]
        if len(block) and int(block.max()) >= vocab_size:
            at = int(np.flatnonzero(block >= vocab_size)[0])
            raise _refuse(path, start + at, int(block[at]), vocab_size)


def window_check(piece: np.ndarray, vocab_size: int, path: Path, offset: int) -> None:
    """DataError when a piece read from `path` at token `offset` holds an id >= vocab_size."""
    if len(piece) and int(piece.max()) >= vocab_size:
        at = int(np.flatnonzero(piece >= vocab_size)[0])
        raise _refuse(path, offset + at, int(piece[at]), vocab_size)


class ShardWriter:
    """Appends one (source, split) token stream into fixed-size shards."""

    def __init__(
        self,
        data_dir: Path,
        work_dir: Path,
        source: str,
        split: str,
        dtype: str,
        shard_tokens: int,
        eot_id: int,
        byte_lengths: np.ndarray,
        index: int = 0,
    ):
        self.data_dir, self.work_dir = data_dir, work_dir
        self.source, self.split, self.dtype = source, split, dtype
        self.shard_tokens, self.eot_id, self.byte_lengths = shard_tokens, eot_id, byte_lengths
        self.itemsize = np.dtype(dtype).itemsize
        self.index = index
        self._file: Optional[Any] = None
        self.partial_tokens = 0

    @property
    def partial_path(self) -> Path:
        return self.work_dir / (shard_file_name(self.source, self.split, self.index) + ".partial")

    def final_path(self, index: int) -> Path:
        return self.data_dir / shard_file_name(self.source, self.split, index)

    def recover(self, committed_tokens: int, journaled: set) -> None:
        """Return to the last commit: the partial shard cut back to `committed_tokens`, later files removed.

        A shard renamed to its final name after that commit (but not journaled) is moved back first."""
        final = self.final_path(self.index)
        if final.name not in journaled and final.exists():
            os.replace(final, self.partial_path)
        pattern = re.compile(rf"{re.escape(self.source)}-{self.split}-(\d+)\.bin(\.partial)?")
        for path in list(self.data_dir.glob("*.bin")) + list(self.work_dir.glob("*.bin.partial")):
            match = pattern.fullmatch(path.name)
            if match and int(match.group(1)) > self.index and path.name not in journaled:
                path.unlink()
        size = self.partial_path.stat().st_size if self.partial_path.exists() else 0
        if size < committed_tokens * self.itemsize:
            raise DataError(
                f"Cannot resume prepare: {self.partial_path} holds {size // self.itemsize} tokens but the prepare state "
                f"committed {committed_tokens}; the folder was modified. Delete {self.data_dir} and prepare again."
            )
        if self.partial_path.exists():
            with open(self.partial_path, "r+b") as f:
                f.truncate(committed_tokens * self.itemsize)
        self.partial_tokens = committed_tokens

    def _open(self) -> Any:
        if self._file is None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.partial_path, "ab")
        return self._file

    def append(self, tokens: np.ndarray) -> List[ShardRecord]:
        """Append tokens; returns the shards this completed (already renamed to their final names)."""
        done = []
        tokens = tokens.astype(_little_endian(self.dtype), copy=False)
        while len(tokens):
            room = self.shard_tokens - self.partial_tokens
            head, tokens = tokens[:room], tokens[room:]
            self._open().write(head.tobytes())
            self.partial_tokens += len(head)
            if self.partial_tokens == self.shard_tokens:
                done.append(self._seal())
        return done

    def finish(self) -> Optional[ShardRecord]:
        """Seal the last, shorter shard of the stream (None when it is empty)."""
        if self.partial_tokens == 0:
            if self.partial_path.exists():
                self.partial_path.unlink()
            return None
        return self._seal()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _seal(self) -> ShardRecord:
        self._open()
        self.sync()
        self.close()
        data = self.partial_path.read_bytes()
        tokens = np.frombuffer(data, dtype=_little_endian(self.dtype))
        record = ShardRecord(
            file=shard_file_name(self.source, self.split, self.index),
            split=self.split,
            source=self.source,
            index=self.index,
            dtype=self.dtype,
            tokens=int(len(tokens)),
            documents=int(np.count_nonzero(tokens == self.eot_id)),
            text_bytes=int(self.byte_lengths[tokens].sum()),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        os.replace(self.partial_path, self.final_path(self.index))
        self.index += 1
        self.partial_tokens = 0
        return record
