"""The training loader: packed windows of `seq_len + 1` tokens read from the shards through np.memmap.

Windows. Each (source, split) is one token stream (its shards back to back, documents separated by EOT
and concatenated across document and shard boundaries). Window w of a stream holds tokens
[w·T, w·T + T + 1): windows step by T, so consecutive windows share one boundary token, every token is a
target exactly once per epoch, and inputs/labels are the window without its last/first token.

Order. Global sample i of the run maps to a window by a pure function of (seed, epoch, i):
  - unweighted: all windows of the split form one pool; epoch e = i // n_windows, and the pool is read in
    the order of a permutation seeded by (seed, e), so each epoch reshuffles;
  - weighted: sample i goes to a source by a deterministic low-discrepancy rule (source s takes sample i
    when floor((r+1)·q_s) > floor(r·q_s) at its level, r being i's index among samples the earlier
    sources did not take), which realises the weights within one sample at any point; within a source,
    its n-th draw is read through that source's own seeded permutation for epoch n // n_windows(source),
    so small sources are repeated and large ones subsampled.

Ranks and workers. Step k of the run consumes global samples [k·W·B, (k+1)·W·B); rank r takes the r-th
block of B. DataLoader worker j of a rank produces steps j, j + n_workers, ... which torch's DataLoader
returns round-robin, i.e. in step order. The only state is the global cursor (samples consumed), so a run
resumes exactly with another number of ranks, workers or even micro-batch size.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.manifest import (
    SPLITS,
    Manifest,
    load_manifest,
    manifest_sha256,
    shard_path,
    verify_dataset,
)
from data_pipeline.token_check import window_check

STATE_VERSION = 1
PERMUTATION_CACHE = 4
OPEN_SHARDS = 64
log = logging.getLogger(__name__)


@dataclass
class Stream:
    """One source's token stream in a split."""
    name: str
    paths: List[Path]
    starts: np.ndarray
    """Token offset of each shard in the stream (plus the total at the end)."""
    windows: int


class TokenWindows(IterableDataset):
    """Yields whole micro-batches for one rank, starting at global sample `start`."""

    def __init__(self, manifest: Manifest, split: str, seq_len: int, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, weights: Optional[Dict[str, float]] = None):
        super().__init__()
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed % (2**63)
        self.dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self.vocab_size = manifest.vocab_size
        self.start = 0
        self.streams: List[Stream] = []
        for name in manifest.source_names():
            shards = manifest.shards_of(split, name)
            starts = np.cumsum([0] + [s.tokens for s in shards], dtype=np.int64)
            windows = max(int(starts[-1]) - 1, 0) // seq_len
            self.streams.append(Stream(name, [shard_path(manifest, s) for s in shards], starts, windows))
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
        self._permutations: Dict[tuple, np.ndarray] = {}

    def _mixture(self, manifest: Manifest, weights: Optional[Dict[str, float]]) -> Optional[np.ndarray]:
        """Normalised weights in manifest source order (None: the natural proportions of one pool)."""
        if weights is None:
            return None
        names = [s.name for s in self.streams]
        unknown = sorted(set(weights) - set(names))
        missing = sorted(set(names) - set(weights))
        if unknown or missing:
            problems = ([f"name source(s) {unknown} that {manifest.path} does not hold"] if unknown else []) + (
                [f"leave out source(s) {missing} of {manifest.path}"] if missing else [])
            raise DataError(
                f"Mixing weights {' and '.join(problems)}; the manifest's sources are {names}. Weights must name "
                f"exactly the prepared sources (prepare the data with the same data.sources)."
            )
        raw = np.array([float(weights[n]) for n in names])
        if not np.all(np.isfinite(raw)) or np.any(raw < 0) or raw.sum() <= 0:
            raise DataError(f"Mixing weights {weights} for {manifest.path} must be non-negative with a positive sum.")
        for stream, weight in zip(self.streams, raw):
            if weight > 0 and stream.windows == 0:
                if self.split == "train":
                    raise DataError(
                        f"Source '{stream.name}' has weight {weight} but its {self.split} split in {manifest.path} holds "
                        f"fewer than seq_len + 1 = {self.seq_len + 1} tokens."
                    )
                log.warning("source '%s' has no %s window of %d tokens; it is left out of the %s mixture",
                            stream.name, self.split, self.seq_len + 1, self.split)
        raw = np.where([s.windows > 0 for s in self.streams], raw, 0.0)
        if raw.sum() <= 0:
            raise DataError(f"No source with a positive weight in {weights} has a {self.split} window in {manifest.path}.")
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

    def permutation(self, key: int, epoch: int, size: int) -> np.ndarray:
        cache_key = (key, epoch)
        perm = self._permutations.get(cache_key)
        if perm is None:
            perm = np.random.default_rng([self.seed, key, epoch]).permutation(size)
            if len(self._permutations) >= PERMUTATION_CACHE:
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[cache_key] = perm
        return perm

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
                pooled[here] = self.permutation(0, int(epoch), self.windows)[positions[here]]
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
                picked[at] = self.permutation(1 + int(s), int(epoch), size)[positions[at]]
            window[here] = picked
        return source, window

    # --- reading -------------------------------------------------------------------------------------
    def _shard(self, s: int, k: int) -> np.ndarray:
        """Shard k of source s, memory-mapped; at most OPEN_SHARDS stay open (each holds a file descriptor)."""
        key = (s, k)
        mapped = self._maps.pop(key, None)
        if mapped is None:
            path = self.streams[s].paths[k]
            mapped = np.memmap(path, dtype=self.dtype, mode="r") if os.path.getsize(path) else np.zeros(0, self.dtype)
            if len(self._maps) >= OPEN_SHARDS:
                self._maps.pop(next(iter(self._maps)))
        self._maps[key] = mapped
        return mapped

    def read_window(self, s: int, window: int, out: np.ndarray) -> None:
        stream = self.streams[s]
        offset, filled, need = window * self.seq_len, 0, self.seq_len + 1
        k = int(np.searchsorted(stream.starts, offset, side="right")) - 1
        while filled < need:
            local = offset - int(stream.starts[k])
            piece = self._shard(s, k)[local:local + need - filled]
            window_check(piece, self.vocab_size, stream.paths[k], local)
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            offset += len(piece)
            k += 1

    def batch(self, first_sample: int) -> np.ndarray:
        """The windows (B, T+1) of global samples first_sample .. first_sample+B-1."""
        samples = np.arange(first_sample, first_sample + self.micro_batch_size, dtype=np.int64)
        sources, windows = self.locate(samples)
        rows = np.empty((self.micro_batch_size, self.seq_len + 1), dtype=np.int64)
        for row, s, w in zip(rows, sources, windows):
            self.read_window(int(s), int(w), row)
        return rows

    def __iter__(self) -> Iterator[np.ndarray]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        per_step = self.world_size * self.micro_batch_size
        step = worker
        while True:
            yield self.batch(self.start + step * per_step + self.rank * self.micro_batch_size)
            step += workers

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"], state["_permutations"] = {}, {}
        return state


def _as_is(batch: np.ndarray) -> np.ndarray:
    return batch


class TokenLoader:
    """An endless iterator of {"input_ids", "labels"} LongTensor(B, T) batches with an exact resume point.

    `iter(loader)` returns the loader itself and continues where it stands; `state_dict()` captures the
    global cursor after the batches handed out so far (prefetched ones do not count)."""

    def __init__(self, dataset: TokenWindows, num_workers: int, manifest: Manifest, manifest_sha: str):
        self.dataset, self.num_workers, self.manifest, self.manifest_sha = dataset, num_workers, manifest, manifest_sha
        self.samples_seen = 0
        self._iterator: Optional[Iterator[np.ndarray]] = None

    @property
    def samples_per_step(self) -> int:
        return self.dataset.world_size * self.dataset.micro_batch_size

    @property
    def windows_per_epoch(self) -> int:
        return self.dataset.windows

    @property
    def epoch(self) -> float:
        """Epochs of the split consumed so far (all ranks together)."""
        return self.samples_seen / self.dataset.windows

    def _start(self) -> Iterator[np.ndarray]:
        self.dataset.start = self.samples_seen
        if self.num_workers == 0:
            return iter(self.dataset)
        # Windows travel from the workers as pickled numpy arrays: for batches this small that is several
        # times faster than torch's shared-memory tensors.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            prefetch_factor=4)
        return iter(loader)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start()
        rows = torch.from_numpy(next(self._iterator))
        self.samples_seen += self.samples_per_step
        return {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        self._iterator = None

    def _weights(self) -> Optional[Dict[str, float]]:
        p = self.dataset.probabilities
        return None if p is None else {s.name: float(w) for s, w in zip(self.dataset.streams, p)}

    def state_dict(self) -> Dict[str, Any]:
        d = self.dataset
        return {
            "version": STATE_VERSION, "samples_seen": self.samples_seen, "split": d.split, "seq_len": d.seq_len,
            "seed": d.seed, "manifest_sha256": self.manifest_sha, "weights": self._weights(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue at the state's global sample; refuses a state that would not continue the same stream."""
        d = self.dataset
        expected = {"version": STATE_VERSION, "split": d.split, "seq_len": d.seq_len, "seed": d.seed,
                    "manifest_sha256": self.manifest_sha}
        for key, value in expected.items():
            if state.get(key) != value:
                what = "data set (manifest sha256)" if key == "manifest_sha256" else key
                raise DataError(
                    f"Cannot resume the {d.split} loader of {self.manifest.path}: the saved loader state has {what} "
                    f"{state.get(key)!r} but this loader has {value!r}, so the sample order would differ (samples "
                    f"would repeat or be skipped). Resume with the same data and settings."
                )
        saved, current = state.get("weights"), self._weights()
        if (saved is None) != (current is None) or (saved is not None and (
                set(saved) != set(current) or any(abs(saved[k] - current[k]) > 1e-9 for k in saved))):
            raise DataError(
                f"Cannot resume the {d.split} loader of {self.manifest.path}: the saved mixing weights {saved} differ "
                f"from this loader's {current}."
            )
        self.samples_seen = int(state["samples_seen"])
        self._iterator = None

    def mixture_report(self) -> Dict[str, Dict[str, float]]:
        """Per source: target share, samples drawn so far (all ranks), realised share, epochs of that source."""
        d, seen = self.dataset, self.samples_seen
        if d.probabilities is not None:
            counts, targets = d.draw_counts(seen), d.probabilities
        else:
            epochs, rest = divmod(seen, d.windows)
            counts = np.array([s.windows for s in d.streams], dtype=np.int64) * epochs
            if rest:
                pooled = d.permutation(0, epochs, d.windows)[:rest]
                counts += np.bincount(np.searchsorted(d.pool_starts, pooled, side="right") - 1, minlength=len(d.streams))
            targets = np.array([s.windows for s in d.streams]) / d.windows
        return {
            s.name: {"target": float(t), "samples": int(n), "fraction": float(n / seen) if seen else 0.0,
                     "epochs": float(n / s.windows) if s.windows else 0.0}
            for s, t, n in zip(d.streams, targets, counts)
        }


def build_loader(data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int = 0, weights: Optional[Dict[str, float]] = None,
                 verify_checksums: bool = False) -> TokenLoader:
    """Check the prepared dataset (tokenizer identity, dtype, shard sizes, sha256 on request), then build
    the loader for one rank. Every problem is a DataError naming the file."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    if seq_len < 1 or micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise DataError(
            f"Bad loader arguments seq_len={seq_len}, micro_batch_size={micro_batch_size}, rank={rank}, "
            f"world_size={world_size}, num_workers={num_workers}; expected positive sizes and 0 <= rank < world_size."
        )
    manifest = load_manifest(data_dir)
    verify_dataset(manifest, splits=(split,), checksums=verify_checksums)
    dataset = TokenWindows(manifest, split, seq_len, micro_batch_size, rank, world_size, seed, weights)
    return TokenLoader(dataset, num_workers, manifest, manifest_sha256(data_dir))
