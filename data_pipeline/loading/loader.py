"""The training loader: packed windows of `seq_len + 1` tokens read from the shards through np.memmap.

Windows. Each (source, split) is one token stream (its shards back to back, documents separated by EOT
and concatenated across document and shard boundaries). Window w of a stream holds tokens
[w·T, w·T + T + 1): windows step by T, so consecutive windows share one boundary token, every token is a
target exactly once per epoch, and inputs/labels are the window without its last/first token.

Order. Global sample i of the run maps to a window by a pure function of (seed, epoch, i):
  - unweighted: all windows of the split form one pool; epoch e = i // n_windows, and position
    i % n_windows is mapped to a window by the keyed bijection of order.py seeded by (seed, e), so each
    epoch reshuffles while no process ever holds a permutation (O(1) memory in the corpus size);
  - weighted: sample i goes to a source by a deterministic low-discrepancy rule (source s takes sample i
    when floor((r+1)·q_s) > floor(r·q_s) at its level, r being i's index among samples the earlier
    sources did not take), which realises the weights within one sample at any point; within a source,
    its n-th draw is read through that source's own keyed bijection for epoch n // n_windows(source),
    so small sources are repeated and large ones subsampled.

Ranks and workers. Step k of the run consumes global samples [k·W·B, (k+1)·W·B); rank r takes the r-th
block of B. DataLoader worker j of a rank produces steps j, j + n_workers, ... which torch's DataLoader
returns round-robin, i.e. in step order. The only state is the global cursor (samples consumed), so a run
resumes exactly with another number of ranks, workers or even micro-batch size.

windows.py holds the map and the reads (TokenWindows); this module the resumable iterator and build_loader.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipeline.errors import DataError
from data_pipeline.format.manifest import Manifest, load_manifest, manifest_sha256, shard_name, verify_dataset
from data_pipeline.format.names import SPLITS
from data_pipeline.loading.windows import TokenWindows
from data_pipeline.storage.cache import ShardCache
from data_pipeline.storage.store import DataStore

STATE_VERSION = 2
"""2: the order is the Feistel bijection of order.py (1 was a numpy permutation per epoch)."""
REPORT_CHUNK = 1 << 20


def _as_is(batch: np.ndarray) -> np.ndarray:
    return batch


class TokenLoader:
    """An endless iterator of {"input_ids", "labels"} LongTensor(B, T) batches with an exact resume point.

    `iter(loader)` returns the loader itself and continues where it stands; `state_dict()` captures the
    global cursor after the batches handed out so far (prefetched ones do not count)."""

    def __init__(self, dataset: TokenWindows, num_workers: int, manifest: Manifest, manifest_sha: str):
        self.dataset, self.num_workers, self.manifest, self.manifest_sha = (
            dataset,
            num_workers,
            manifest,
            manifest_sha,
        )
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
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is, prefetch_factor=4
        )
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
            "version": STATE_VERSION,
            "samples_seen": self.samples_seen,
            "split": d.split,
            "seq_len": d.seq_len,
            "seed": d.seed,
            "manifest_sha256": self.manifest_sha,
            "weights": self._weights(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue at the state's global sample; refuses a state that would not continue the same stream."""
        d = self.dataset
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"Cannot resume the {d.split} loader of {self.manifest.path}: the saved loader state has version "
                f"{state.get('version')!r} but this slm-forge writes version {STATE_VERSION}. Version 2 changed the "
                f"sample order (a Feistel bijection in O(1) memory replaced the per-epoch permutation), so the old "
                f"cursor would point at other samples. Resume with the slm-forge that wrote the checkpoint, or start "
                f"the data from sample 0 with this one (e.g. train.init_from the checkpoint's weights)."
            )
        expected = {
            "version": STATE_VERSION,
            "split": d.split,
            "seq_len": d.seq_len,
            "seed": d.seed,
            "manifest_sha256": self.manifest_sha,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                what = "data set (manifest sha256)" if key == "manifest_sha256" else key
                raise DataError(
                    f"Cannot resume the {d.split} loader of {self.manifest.path}: the saved loader state has {what} "
                    f"{state.get(key)!r} but this loader has {value!r}, so the sample order would differ (samples "
                    f"would repeat or be skipped). Resume with the same data and settings."
                )
        saved, current = state.get("weights"), self._weights()
        if (saved is None) != (current is None) or (
            saved is not None
            and (set(saved) != set(current) or any(abs(saved[k] - current[k]) > 1e-9 for k in saved))
        ):
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
            for first in range(0, rest, REPORT_CHUNK):  # in chunks: memory stays bounded for any corpus
                pooled = d.order(0, epochs, d.windows, np.arange(first, min(first + REPORT_CHUNK, rest)))
                counts += np.bincount(
                    np.searchsorted(d.pool_starts, pooled, side="right") - 1, minlength=len(d.streams)
                )
            targets = np.array([s.windows for s in d.streams]) / d.windows
        return {
            s.name: {
                "target": float(t),
                "samples": int(n),
                "fraction": float(n / seen) if seen else 0.0,
                "epochs": float(n / s.windows) if s.windows else 0.0,
            }
            for s, t, n in zip(d.streams, targets, counts)
        }


def build_loader(
    data_dir: str | os.PathLike | DataStore,
    split: str,
    seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    weights: Optional[Dict[str, float]] = None,
    verify_checksums: bool = False,
    cache_dir: Optional[str] = None,
    cache_limit: Optional[int] = None,
) -> TokenLoader:
    """Check the prepared dataset (tokenizer identity, dtype, shard sizes, sha256 on request), then build
    the loader for one rank. Every problem is a DataError naming the file. A remote data_dir (a URL or a
    remote DataStore) is read through a ShardCache in cache_dir bounded by cache_limit bytes."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    if seq_len < 1 or micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise DataError(
            f"Bad loader arguments seq_len={seq_len}, micro_batch_size={micro_batch_size}, rank={rank}, "
            f"world_size={world_size}, num_workers={num_workers}; expected positive sizes and 0 <= rank < world_size."
        )
    store = data_dir if isinstance(data_dir, DataStore) else DataStore(data_dir)
    manifest = load_manifest(store)
    verify_dataset(manifest, splits=(split,), checksums=verify_checksums)
    cache = None
    if store.remote:
        itemsize = np.dtype(manifest.dtype).itemsize
        cache = ShardCache(
            store,
            cache_dir,
            cache_limit,
            {
                shard_name(manifest, s): (s.tokens * itemsize, s.sha256)
                for s in manifest.shards
                if s.split == split
            },
            np.dtype(manifest.dtype).newbyteorder("<"),
        )
    dataset = TokenWindows(manifest, split, seq_len, micro_batch_size, rank, world_size, seed, weights, cache)
    return TokenLoader(dataset, num_workers, manifest, manifest_sha256(store))
