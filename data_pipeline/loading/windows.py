"""The sample -> window map of one rank and the reads of its windows (the order is described in loader.py).

TokenWindows is the IterableDataset that loader.TokenLoader runs (in DataLoader workers or in process):
it locates LOCATE_STEPS batches at a time through order.py's keyed bijection, tells a remote dataset's
ShardCache what those batches will read, and reads each window from the memory-mapped (or cached) shards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.format.manifest import Manifest, shard_name
from data_pipeline.format.shards import open_shard, window_check
from data_pipeline.loading.order import round_keys, shuffle
from data_pipeline.storage.cache import ShardCache

LOCATE_STEPS = 64
"""Batches whose windows are located in one vectorised call."""
OPEN_SHARDS = 64
log = logging.getLogger(__name__)


@dataclass
class Stream:
    """One source's token stream in a split."""

    name: str
    paths: List[Path]
    """Local shard files (or, for a remote dataset, their names relative to it)."""
    starts: np.ndarray
    """Token offset of each shard in the stream (plus the total at the end)."""
    windows: int


class TokenWindows(IterableDataset):
    """Yields whole micro-batches for one rank, starting at global sample `start`."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        weights: Optional[Dict[str, float]] = None,
        cache: Optional[ShardCache] = None,
    ):
        super().__init__()
        self.cache = cache
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed % (2**63)
        self.dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self.vocab_size = manifest.vocab_size
        self.start = 0
        self.streams: List[Stream] = []
        root = manifest.data_dir.resolve() if cache is None else None
        for name in manifest.source_names():
            shards = manifest.shards_of(split, name)
            starts = np.cumsum([0] + [s.tokens for s in shards], dtype=np.int64)
            windows = max(int(starts[-1]) - 1, 0) // seq_len
            paths = [
                Path(shard_name(manifest, s)) if cache else root / shard_name(manifest, s) for s in shards
            ]
            self.streams.append(Stream(name, paths, starts, windows))
        self.pool_starts = np.cumsum([0] + [s.windows for s in self.streams], dtype=np.int64)
        self.windows = int(self.pool_starts[-1])
        if self.windows == 0:
            held = ", ".join(f"{s.name}: {int(s.starts[-1]):,}" for s in self.streams)
            raise DataError(
                f"Split '{split}' of {manifest.path} has no window of seq_len + 1 = {seq_len + 1} tokens (tokens per "
                f"source: {held}). Use more data, a larger data.val_fraction or a shorter sequence."
            )
        self.probabilities = self._mixture(manifest, weights)
        self.levels = self._levels() if self.probabilities is not None else []
        self._maps: Dict[tuple, np.ndarray] = {}
        self._keys: Dict[tuple, np.ndarray] = {}

    def _mixture(self, manifest: Manifest, weights: Optional[Dict[str, float]]) -> Optional[np.ndarray]:
        """Normalised weights in manifest source order (None: the natural proportions of one pool)."""
        if weights is None:
            return None
        names = [s.name for s in self.streams]
        unknown = sorted(set(weights) - set(names))
        missing = sorted(set(names) - set(weights))
        if unknown or missing:
            problems = (
                [f"name source(s) {unknown} that {manifest.path} does not hold"] if unknown else []
            ) + ([f"leave out source(s) {missing} of {manifest.path}"] if missing else [])
            raise DataError(
                f"Mixing weights {' and '.join(problems)}; the manifest's sources are {names}. Weights must name "
                f"exactly the prepared sources (prepare the data with the same data.sources)."
            )
        raw = np.array([float(weights[n]) for n in names])
        if not np.all(np.isfinite(raw)) or np.any(raw < 0) or raw.sum() <= 0:
            raise DataError(
                f"Mixing weights {weights} for {manifest.path} must be non-negative with a positive sum."
            )
        for stream, weight in zip(self.streams, raw):
            if weight > 0 and stream.windows == 0:
                if self.split == "train":
                    raise DataError(
                        f"Source '{stream.name}' has weight {weight} but its {self.split} split in {manifest.path} holds "
                        f"fewer than seq_len + 1 = {self.seq_len + 1} tokens."
                    )
                log.warning(
                    "source '%s' has no %s window of %d tokens; it is left out of the %s mixture",
                    stream.name,
                    self.split,
                    self.seq_len + 1,
                    self.split,
                )
        raw = np.where([s.windows > 0 for s in self.streams], raw, 0.0)
        if raw.sum() <= 0:
            raise DataError(
                f"No source with a positive weight in {weights} has a {self.split} window in {manifest.path}."
            )
        return raw / raw.sum()

    # --- the sample -> window map --------------------------------------------------------------------
    def _levels(self) -> List[float]:
        """The take-rate of each source among the samples the earlier sources left (1 for the last one)."""
        assert self.probabilities is not None
        levels, remaining = [], 1.0
        last = int(np.flatnonzero(self.probabilities)[-1])
        for s, p in enumerate(self.probabilities):
            levels.append(1.0 if s == last else (min(p / remaining, 1.0) if remaining > 0 else 0.0))
            remaining -= p
        return levels

    def order(self, key: int, epoch: int, size: int, positions: np.ndarray) -> np.ndarray:
        """The windows at `positions` of stream `key`'s order in `epoch` (key 0: the pool, 1 + s: source s)."""
        keys = self._keys.get((key, epoch))
        if keys is None:
            if len(self._keys) >= 64:
                self._keys.pop(next(iter(self._keys)))
            keys = self._keys[(key, epoch)] = round_keys(self.seed, key, epoch)
        return shuffle(positions, size, keys)

    def draws(self, samples: np.ndarray) -> tuple:
        """(source, n-th draw from that source) of each global sample index, for the weighted mix."""
        source = np.full(len(samples), -1, dtype=np.int64)
        draw = np.zeros(len(samples), dtype=np.int64)
        rest = samples.astype(np.int64).copy()
        active = np.ones(len(samples), dtype=bool)
        for s, q in enumerate(self.levels):
            before = np.floor(rest * q).astype(np.int64)
            take = active & (np.floor((rest + 1) * q).astype(np.int64) > before)
            source[take], draw[take] = s, before[take]
            keep = active & ~take
            rest[keep] -= before[keep]
            active = keep
            if not active.any():
                break
        return source, draw

    def draw_counts(self, samples: int) -> np.ndarray:
        """How many of the first `samples` global samples each source received (weighted mix)."""
        counts, rest = [], samples
        for q in self.levels:
            taken = int(math.floor(rest * q))
            counts.append(taken)
            rest -= taken
        return np.array(counts, dtype=np.int64)

    def locate(self, samples: np.ndarray) -> tuple:
        """(source index, window index within the source) of each global sample index."""
        if self.probabilities is None:
            epochs, positions = np.divmod(samples, self.windows)
            pooled = np.empty(len(samples), dtype=np.int64)
            for epoch in np.unique(epochs):
                here = epochs == epoch
                pooled[here] = self.order(0, int(epoch), self.windows, positions[here])
            source = np.searchsorted(self.pool_starts, pooled, side="right") - 1
            return source, pooled - self.pool_starts[source]
        source, draw = self.draws(samples)
        window = np.empty(len(samples), dtype=np.int64)
        for s in np.unique(source):
            here = source == s
            size = self.streams[s].windows
            epochs, positions = np.divmod(draw[here], size)
            picked = np.empty(len(positions), dtype=np.int64)
            for epoch in np.unique(epochs):
                at = epochs == epoch
                picked[at] = self.order(1 + int(s), int(epoch), size, positions[at])
            window[here] = picked
        return source, window

    # --- reading -------------------------------------------------------------------------------------
    def _shard(self, s: int, k: int) -> np.ndarray:
        """Shard k of source s, memory-mapped; at most OPEN_SHARDS stay open (each holds a file descriptor)."""
        key = (s, k)
        mapped = self._maps.pop(key, None)
        if mapped is None:
            mapped = open_shard(self.streams[s].paths[k], self.dtype, random_access=True)
            if len(self._maps) >= OPEN_SHARDS:
                self._maps.pop(next(iter(self._maps)))
        self._maps[key] = mapped
        return mapped

    def pieces(self, s: int, window: int) -> Iterator[tuple]:
        """(shard k, first token, end token) of each shard's part of a window, in order."""
        stream = self.streams[s]
        offset, end = window * self.seq_len, window * self.seq_len + self.seq_len + 1
        k = int(np.searchsorted(stream.starts, offset, side="right")) - 1
        while offset < end:
            shard_start = int(stream.starts[k])
            stop = min(end, int(stream.starts[k + 1])) - shard_start
            yield k, offset - shard_start, stop
            offset, k = shard_start + stop, k + 1

    def read_window(self, s: int, window: int, out: np.ndarray) -> None:
        filled, paths = 0, self.streams[s].paths
        for k, start, stop in self.pieces(s, window):
            if self.cache is None:
                piece = self._shard(s, k)[start:stop]
            else:
                piece = self.cache.tokens(paths[k].as_posix(), start, stop)
            window_check(piece, self.vocab_size, paths[k], start)
            out[filled : filled + len(piece)] = piece
            filled += len(piece)

    def batch(self, first_sample: int) -> np.ndarray:
        """The windows (B, T+1) of global samples first_sample .. first_sample+B-1."""
        samples = np.arange(first_sample, first_sample + self.micro_batch_size, dtype=np.int64)
        return self.read_rows(*self.locate(samples))

    def read_rows(self, sources: np.ndarray, windows: np.ndarray) -> np.ndarray:
        rows = np.empty((len(sources), self.seq_len + 1), dtype=np.int64)
        for row, s, w in zip(rows, sources, windows):
            self.read_window(int(s), int(w), row)
        return rows

    def planned(self, worker: int, workers: int) -> Iterator[tuple]:
        """(sources, windows) of this rank's batches for this worker, located LOCATE_STEPS steps at a time:
        one vectorised call per block instead of one per batch."""
        per_step, batch = self.world_size * self.micro_batch_size, self.micro_batch_size
        step = worker
        while True:
            steps = np.arange(step, step + LOCATE_STEPS * workers, workers, dtype=np.int64)
            firsts = self.start + steps * per_step + self.rank * batch
            sources, windows = self.locate((firsts[:, None] + np.arange(batch, dtype=np.int64)).ravel())
            if self.cache is not None:
                self.cache.plan(self.shards_read(sources, windows))
            for i in range(LOCATE_STEPS):
                yield sources[i * batch : (i + 1) * batch], windows[i * batch : (i + 1) * batch]
            step += LOCATE_STEPS * workers

    def shards_read(self, sources: np.ndarray, windows: np.ndarray) -> List[tuple]:
        """(shard name, first token, end token) of every piece these windows read, in order of use: what
        the cache fetches next (whole shards, or these ranges when the shards do not fit)."""
        return [
            (self.streams[s].paths[k].as_posix(), start, stop)
            for s, w in zip(sources.tolist(), windows.tolist())
            for k, start, stop in self.pieces(s, w)
        ]

    def __iter__(self) -> Iterator[np.ndarray]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for sources, windows in self.planned(worker, workers):
            yield self.read_rows(sources, windows)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state
