"""Real filesystem faults for tests (docs in /work/shared/faults-localhost.md): a small tmpfs that fills up and a
read-only bind mount. Both need root with CAP_SYS_ADMIN; where `mount` is refused the test is skipped, saying so."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

import pytest


def _run(cmd: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _mount_or_skip(cmd: List[str], what: str) -> None:
    try:
        proc = _run(cmd)
    except FileNotFoundError:
        pytest.skip(f"cannot mount {what}: no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount {what} here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """`path` as a fresh tmpfs of `size` (e.g. "8m"): writes past it fail with ENOSPC. Unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    _mount_or_skip(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], f"a {size} tmpfs")
    try:
        yield path
    finally:
        _run(["umount", "-l", str(path)])


@contextmanager
def read_only(source: Path, path: Path) -> Iterator[Path]:
    """`source` seen read-only at `path` (a bind mount remounted ro; root ignores chmod). Unmounted afterwards."""
    source.mkdir(parents=True, exist_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    _mount_or_skip(["mount", "--bind", str(source), str(path)], "a bind mount")
    try:
        _mount_or_skip(["mount", "-o", "remount,bind,ro", str(path)], "a read-only bind mount")
        yield path
    finally:
        _run(["umount", "-l", str(path)])
