"""Token ids against the vocabulary: an out-of-vocabulary id is a DataError naming the shard and the offset,
never an IndexError in the embedding (or, on a GPU, a device-side assert).

`max_id_check` scans a whole shard (with data.verify_checksums); `window_check` is the loader's check of
every window it reads: one max over seq_len + 1 integers, far below the cost of a step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError

SCAN_TOKENS = 1 << 24
"""Tokens per block when scanning a whole shard (64 MiB of uint32)."""


def _refuse(path: Path, offset: int, token: int, vocab_size: int) -> DataError:
    return DataError(
        f"Shard {path} holds token id {token} at token offset {offset}, outside the tokenizer's vocabulary "
        f"of {vocab_size} ids (0..{vocab_size - 1}); the shard is corrupt or was prepared with another "
        "tokenizer. Prepare the data again."
    )


def max_id_check(path: Path, dtype: str, vocab_size: int) -> None:
    """DataError when any token of the shard at `path` is >= vocab_size."""
    tokens = (
        np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        if path.stat().st_size
        else np.zeros(0)
    )
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
