"""One place that turns a filesystem failure (disk full, read-only, a file where a folder belongs, a link loop)
into a sentence naming the path and what to do, for every command's error handler (launch/cli.py)."""

from __future__ import annotations

import errno
import os
from typing import Optional

_WHAT = {
    errno.ENOSPC: "the disk is full (no space left on the device that holds it)",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "it is on a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ELOOP: "it is a loop of symbolic links",
    errno.ENOENT: "it does not exist",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "this process has too many open files",
}

_TODO = {
    errno.ENOSPC: "Free space there (or choose a folder on another disk) and run the command again; files "
    "written completely before (earlier checkpoints, shards) are kept",
    errno.EDQUOT: "Free space within your quota and run the command again",
    errno.EROFS: "Choose a writable folder, or remount it read-write",
    errno.EACCES: "Fix its permissions or choose another folder",
    errno.ENOTDIR: "Give a path whose parents are folders",
    errno.ELOOP: "Replace the link with the folder it should point to",
}


def describe_os_error(err: OSError) -> str:
    """`err` as one paragraph: which path, what is wrong with it in words, and what to do."""
    path = err.filename if err.filename is not None else None
    if err.filename2 is not None:
        path = f"{err.filename} -> {err.filename2}"
    code = err.errno
    what = _WHAT.get(code or -1) or (err.strerror or type(err).__name__)
    if code == errno.EEXIST and err.filename is not None and os.path.isfile(err.filename):
        what, todo = "it is a file where a folder is needed", "Give the path of a folder (or of none yet)"
    elif code == errno.EEXIST and err.filename is not None and os.path.islink(err.filename):
        what = "it is a symbolic link that leads nowhere (a loop, or its target is missing)"
        todo = _TODO[errno.ELOOP]
    elif code == errno.EEXIST:
        what, todo = "it already exists", None
    else:
        todo = _TODO.get(code or -1)
    where = f"{path}: " if path is not None else ""
    return f"{where}{what} ({os.strerror(code) if code else err}).{f' {todo}.' if todo else ''}"


FULL_BELOW_BYTES = 1 << 20
"""A write that failed while less than this was left for us on its file system failed because the disk is full."""


def disk_is_full(err: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a failed write into `folder` ran out of space: an ENOSPC/EDQUOT anywhere in the error's chain,
    or (torch.save reports a full disk as 'unexpected pos ...') almost nothing left there right now."""
    seen: Optional[BaseException] = err
    for _ in range(20):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_BELOW_BYTES
