"""Local copies of a remote dataset's shards: whole shards fetched ahead of the loader, an LRU size bound,
and ranged reads when the bound is smaller than what the loader needs next.

The loader knows its future order exactly, so before reading a block of batches it tells the cache which
shards that block touches (`plan`). When they all fit under `data.cache_limit`, a background thread
downloads the missing ones in first-use order, evicting the least recently used files; when they do not
fit, the shards not already cached are read by ranged requests (`cat_file(start, end)`) and a warning
says so once. Either way no request waits on space that cannot be freed, so there is no deadlock.

Every shard's sha256 is checked once per process before its tokens are used: a downloaded copy before it
is renamed into the cache (so a cached file is a verified one), a ranged-read shard by streaming it once
through the hash. The cache folder holds only files this module wrote; nothing on the remote is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Set

import numpy as np

from common.files import file_sha256
from common.log import say
from data_pipeline.errors import DataError
from data_pipeline.format.shards import open_shard
from data_pipeline.storage.store import DataStore, is_remote, local_path

FETCH_THREADS = 8
"""Concurrent downloads or ranged reads per process (object stores answer each request with latency)."""
HASH_PIECE = 8 << 20
"""Bytes per ranged request while hashing a shard that is not cached."""
LOCKS = ".locks"
"""Per-shard lock files and the reservations of downloads in flight, inside the dataset's cache folder."""
RESERVED = ".reserved"
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Node-local temp ($TMPDIR or /tmp), shared by the ranks and workers of a node."""
    return Path(tempfile.gettempdir()) / "slm-forge-cache"


def dataset_cache_dir(store: DataStore, cache_dir: Optional[str]) -> Path:
    """This dataset's folder in the cache: one per URL, so two datasets never share a file name."""
    key = hashlib.sha256(store.location.encode("utf-8")).hexdigest()[:16]
    name = store.location.split("://", 1)[-1].strip("/").replace("/", "_")[-48:]
    return Path(cache_dir or default_cache_dir()) / f"{name}-{key}"


def local_copy(store: DataStore, name: str, cache_dir: Optional[str]) -> Path:
    """A small file of the dataset (tokenizer.json) as a local path: itself when local, else a fresh copy."""
    if store.root is not None:
        return store.root / name
    folder = dataset_cache_dir(store, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        store.download(name, Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def local_file(location: str, storage_options: Optional[Dict[str, Any]], cache_dir: Optional[str]) -> Path:
    """A file named by a path or URL (tokenizer.path) as a local path: downloaded into the cache when remote."""
    if not is_remote(location):
        return local_path(location)
    folder, name = location.rstrip("/").rsplit("/", 1)
    return local_copy(DataStore(folder, storage_options), name, cache_dir)


class ShardCache:
    """Token reads of a remote dataset's shards through a bounded local cache (one per process)."""

    def __init__(
        self,
        store: DataStore,
        cache_dir: Optional[str],
        limit: Optional[int],
        shards: Dict[str, tuple],
        dtype: np.dtype,
    ):
        if limit is not None and limit < 0:
            raise DataError(
                f"data.cache_limit is {limit}; expected a size in bytes >= 0, or null for no bound."
            )
        self.store, self.limit, self.dtype = store, limit, dtype
        self.shards = shards
        """name -> (size in bytes, sha256) from the manifest."""
        self.folder = dataset_cache_dir(store, cache_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._verified: Set[str] = set()
        self._ranged: Set[str] = set()
        self._maps: Dict[str, np.ndarray] = {}
        self._pending: Dict[str, Future] = {}
        self._pieces: Dict[tuple, Future] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self.warned = False

    def __getstate__(self) -> Dict[str, Any]:
        """DataLoader workers get a fresh cache object (threads and maps do not cross processes)."""
        state = dict(self.__dict__)
        state.update(
            _verified=set(),
            _ranged=set(),
            _maps={},
            _pending={},
            _pieces={},
            _pool=None,
            _lock=None,
            warned=self.warned,
        )
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- planning ------------------------------------------------------------------------------------
    def plan(self, pieces: Iterable[tuple]) -> None:
        """The (shard, first token, end token) pieces the next block of batches reads, in order of use:
        fetch their shards whole if they fit, else start ranged reads of exactly these pieces."""
        pieces = list(pieces)
        names = list(dict.fromkeys(name for name, _, _ in pieces))
        need = sum(self.shards[n][0] for n in names)
        if self.limit is not None and need > self.limit:
            missing = [n for n in names if not self._cached(n)]
            if missing and not self.warned:
                log.warning(
                    "data.cache_limit %d bytes is smaller than the %d bytes of shards the next batches read; "
                    "reading %d shard(s) by ranged requests instead of caching them whole (slower, correct)",
                    self.limit,
                    need,
                    len(missing),
                )
                say(
                    f"[data] data.cache_limit={self.limit} bytes < {need} bytes of shards needed next: reading "
                    f"shards of {self.store} by ranged requests (slower); raise data.cache_limit to cache them"
                )
                self.warned = True
            self._ranged.update(missing)
            pool = self._executor()
            for piece in pieces:
                if piece[0] in self._ranged and piece not in self._pieces:
                    self._pieces[piece] = pool.submit(self._read_piece, *piece)
            return
        for name in names:
            self._ranged.discard(name)
            if name not in self._maps and name not in self._pending and not self._cached(name):
                self._pending[name] = self._executor().submit(self._fetch, name, set(names))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="shard-fetch")
        return self._pool

    # --- reads ---------------------------------------------------------------------------------------
    def tokens(self, name: str, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of a shard."""
        if name in self._ranged:
            self._verify_streamed(name)
            pending = self._pieces.pop((name, start, stop), None)
            data = pending.result() if pending is not None else self._read_piece(name, start, stop)
            return np.frombuffer(data, dtype=self.dtype)
        return self._mapped(name)[start:stop]

    def _read_piece(self, name: str, start: int, stop: int) -> bytes:
        size = self.dtype.itemsize
        return self.store.read_range(name, start * size, stop * size)

    def _mapped(self, name: str) -> np.ndarray:
        mapped = self._maps.get(name)
        if mapped is not None:
            return mapped
        pending = self._pending.pop(name, None)
        mapped = pending.result() if pending is not None else self._fetch(name, {name})
        if len(self._maps) >= 64:
            self._maps.pop(next(iter(self._maps)))
        self._maps[name] = mapped
        self._verified.add(name)
        return mapped

    def _cached(self, name: str) -> bool:
        path = self.folder / name
        return path.is_file() and path.stat().st_size == self.shards[name][0]

    # --- the cache folder ----------------------------------------------------------------------------
    def _fetch(self, name: str, keep: Set[str]) -> np.ndarray:
        """The verified local copy of a shard, downloaded if absent, memory-mapped (another process may evict the
        file right after, and the map stays valid).

        Each shard has its own lock, so the ranks of a node download different shards in parallel and one shard
        once. The size bound holds across processes through reservations: under the folder's lock, held only to
        decide, a download first evicts least recently used files and then reserves its shard's size."""
        path = self.folder / name
        size, sha = self.shards[name]
        with self._shard_lock(name):
            if self._cached(name):
                os.utime(path)
                return open_shard(path, self.dtype, random_access=True)
            reservation = self._reserve(name, size, keep)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                self.store.download(name, Path(tmp))
                self._check(name, file_sha256(tmp), sha)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                reservation.unlink(missing_ok=True)
            return open_shard(path, self.dtype, random_access=True)

    @contextlib.contextmanager
    def _shard_lock(self, name: str) -> Iterator[None]:
        with open(self._lock_path(name), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _lock_path(self, name: str) -> Path:
        path = self.folder / LOCKS / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _reserve(self, name: str, size: int, keep: Set[str]) -> Path:
        """Evict to make room for `size` bytes, then hold them with a sparse reservation file of that size."""
        reservation = self._lock_path(name).with_suffix(RESERVED)
        reservation.unlink(missing_ok=True)  # we hold this shard's lock: one left here is a dead process's
        with open(self.folder / ".lock", "w") as folder_lock:
            fcntl.flock(folder_lock, fcntl.LOCK_EX)
            self._evict(size, keep)
            with open(reservation, "wb") as handle:
                handle.truncate(size)
        return reservation

    def _live_reservations(self) -> int:
        """Bytes reserved by downloads in flight; a reservation whose shard lock nobody holds is stale (its process
        died) and is removed (the caller holds the folder lock, so no new reservation appears meanwhile)."""
        reserved = 0
        for reservation in (self.folder / LOCKS).rglob(f"*{RESERVED}"):
            name = reservation.relative_to(self.folder / LOCKS).as_posix()[: -len(RESERVED)]
            with open(self._lock_path(name), "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    reserved += reservation.stat().st_size
                    continue
                reservation.unlink(missing_ok=True)
        return reserved

    def _evict(self, incoming: int, keep: Set[str]) -> None:
        if self.limit is None:
            return
        files = [
            (p.stat().st_mtime, p.stat().st_size, p)
            for p in self.folder.rglob("*.bin")
            if p.is_file() and LOCKS not in p.relative_to(self.folder).parts
        ]
        used = sum(size for _, size, _ in files) + self._live_reservations()
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if used + incoming <= self.limit:
                break
            name = path.relative_to(self.folder).as_posix()
            if name in keep or not self._unlink_unless_in_use(name, path):
                continue
            self._maps.pop(name, None)
            used -= size

    def _unlink_unless_in_use(self, name: str, path: Path) -> bool:
        """Evict a cached shard unless a process holds its lock (it is about to map the file)."""
        with open(self._lock_path(name), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink()
            return True

    def _verify_streamed(self, name: str) -> None:
        if name in self._verified:
            return
        size, sha = self.shards[name]
        digest = hashlib.sha256()
        for start in range(0, size, HASH_PIECE):
            digest.update(self.store.read_range(name, start, min(start + HASH_PIECE, size)))
        self._check(name, digest.hexdigest(), sha)
        self._verified.add(name)

    def _check(self, name: str, actual: str, expected: str) -> None:
        if actual != expected:
            raise DataError(
                f"Shard {self.store.url(name)} has sha256 {actual} but its manifest records {expected}: the shard "
                f"was changed after prepare (or the download is corrupt). Prepare the data again into a new data.dir."
            )
