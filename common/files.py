"""Small file helpers every package shares: the sha256 that identifies a file, and fsync of a folder."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

GIB = 1024**3
"""Bytes in a GiB (memory estimates and budgets are printed in GiB)."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (tokenizers, manifests and shards are identified by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable.

    A filesystem that cannot fsync a folder (EINVAL/ENOTSUP/EBADF on some network mounts) is not an error;
    any other failure is raised.
    """
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
