"""The loader: every window once per epoch across ranks and real DataLoader workers, exact resume (also
on another number of ranks), deterministic weighted mixing, and the dataset checks before the first batch."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.format.manifest import load_manifest
from data_pipeline.format.shards import open_shard
from data_pipeline.loading.loader import build_loader
from data_pipeline.prepare.dispatch import prepare
from tests.helpers import SHAKESPEARE

CORPUS = Path(SHAKESPEARE).read_text(encoding="utf-8")


def stream_tokens(data_dir: Path, split: str, source: str) -> np.ndarray:
    manifest = load_manifest(data_dir)
    return np.concatenate(
        [np.asarray(open_shard(data_dir / s.file, s.dtype)) for s in manifest.shards_of(split, source)]
    )


def all_windows(data_dir: Path, split: str, seq_len: int) -> Counter:
    """Every window of seq_len+1 tokens stepping by seq_len, per source stream, read straight from the shards."""
    windows: Counter = Counter()
    for source in load_manifest(data_dir).source_names():
        tokens = stream_tokens(data_dir, split, source).astype(np.int64)
        for w in range((len(tokens) - 1) // seq_len):
            windows[tokens[w * seq_len : w * seq_len + seq_len + 1].tobytes()] += 1
    return windows


def rows(batch: Dict[str, torch.Tensor]) -> List[bytes]:
    """The windows of a batch (inputs plus the last target)."""
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    return [row.astype(np.int64).tobytes() for row in full]


def global_order(loaders, steps: int) -> List[bytes]:
    """Samples in global order: at each step, rank 0's block then rank 1's."""
    per_rank = [[next(loader) for _ in range(steps)] for loader in loaders]
    return [window for step in range(steps) for batches in per_rank for window in rows(batches[step])]


@pytest.mark.slow
def test_one_epoch_on_two_ranks_by_two_workers_yields_every_window_once(tiny_data_dir):
    seq_len, batch = 128, 16
    expected = all_windows(tiny_data_dir, "train", seq_len)
    windows = sum(expected.values())
    loaders = [
        build_loader(tiny_data_dir, "train", seq_len, batch, rank, 2, seed=7, num_workers=2)
        for rank in (0, 1)
    ]
    assert loaders[0].windows_per_epoch == windows
    steps = math.ceil(2 * windows / (2 * batch))
    order = global_order(loaders, steps)
    first, second = order[:windows], order[windows : 2 * windows]
    assert Counter(first) == expected
    assert Counter(second) == expected and second != first  # the next epoch reshuffles
    assert loaders[0].state_dict()["samples_seen"] == steps * 2 * batch
    assert 2.0 <= loaders[0].epoch < 2.1

    in_process = build_loader(tiny_data_dir, "train", seq_len, batch, 1, 2, seed=7, num_workers=0)
    assert [w for _ in range(3) for w in rows(next(in_process))] == order[batch : 2 * batch] + order[
        3 * batch : 4 * batch
    ] + order[5 * batch : 6 * batch]
    other_seed = build_loader(tiny_data_dir, "train", seq_len, batch, 0, 2, seed=8)
    assert rows(next(other_seed)) != order[:batch]


def test_batches_are_shifted_windows(tiny_data_dir):
    loader = build_loader(tiny_data_dir, "val", 64, 4, 0, 1, seed=0)
    batch = next(loader)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 64)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert Counter(rows(batch)) <= all_windows(tiny_data_dir, "val", 64)


@pytest.mark.slow
def test_state_dict_round_trip_mid_epoch(tiny_data_dir):
    loader = build_loader(tiny_data_dir, "train", 64, 4, 0, 1, seed=3, num_workers=2)
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["samples_seen"] == 28
    expected = [next(loader) for _ in range(5)]
    resumed = build_loader(tiny_data_dir, "train", 64, 4, 0, 1, seed=3, num_workers=0)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5))):
        assert torch.equal(want["input_ids"], got["input_ids"]) and torch.equal(want["labels"], got["labels"])
    changed = build_loader(tiny_data_dir, "train", 32, 4, 0, 1, seed=3)
    with pytest.raises(DataError, match=r"manifest\.json.*seq_len 64 but this loader has 32"):
        changed.load_state_dict(state)


@pytest.mark.slow
def test_state_saved_on_two_ranks_continues_on_one(tiny_data_dir):
    ranks = [build_loader(tiny_data_dir, "train", 64, 4, rank, 2, seed=5, num_workers=1) for rank in (0, 1)]
    for _ in range(6):
        for loader in ranks:
            next(loader)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    following = [next(loader) for loader in ranks]
    single = build_loader(tiny_data_dir, "train", 64, 8, 0, 1, seed=5, num_workers=2)
    single.load_state_dict(state)
    batch = next(single)
    assert torch.equal(batch["input_ids"], torch.cat([b["input_ids"] for b in following]))
    assert torch.equal(batch["labels"], torch.cat([b["labels"] for b in following]))


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    """Two sources: Shakespeare text, and a smaller corpus of numbers (so it is repeated when upweighted)."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "letters.txt").write_text(CORPUS[:80_000], encoding="utf-8")
    rng = random.Random(0)
    numbers = "\n\n".join(" ".join(str(rng.randrange(10**6)) for _ in range(40)) for _ in range(40))
    (root / "digits.txt").write_text(numbers, encoding="utf-8")
    cfg = DataConfig(
        dir=str(root / "data"),
        shard_tokens=4096,
        num_proc=1,
        sources=[
            SourceConfig(path=str(root / "letters.txt"), doc_boundary="blank_line", weight=3),
            SourceConfig(path=str(root / "digits.txt"), doc_boundary="blank_line", weight=1),
        ],
    )
    return prepare(cfg, TokenizerConfig(vocab_size=300))


@pytest.mark.slow
def test_mixing_three_to_one(mixed_dir):
    digit_tokens = set(stream_tokens(mixed_dir, "train", "digits").tolist())
    weights = {"letters": 3.0, "digits": 1.0}
    loader = build_loader(mixed_dir, "train", 64, 10, 0, 1, seed=11, weights=weights, num_workers=2)
    samples = [window for _ in range(100) for window in rows(next(loader))]
    digits = sum(set(np.frombuffer(w, dtype=np.int64).tolist()) <= digit_tokens for w in samples)
    assert abs(digits / 1000 - 0.25) <= 0.02
    report = loader.mixture_report()
    assert report["letters"]["samples"] + report["digits"]["samples"] == 1000
    assert abs(report["letters"]["fraction"] - 0.75) <= 0.002 and report["letters"]["target"] == 0.75
    assert (
        report["digits"]["samples"] == digits and report["digits"]["epochs"] > 1
    )  # the small source repeats
    natural = load_manifest(mixed_dir).tokens("train", "digits") / load_manifest(mixed_dir).tokens("train")
    assert natural < 0.2

    resumed = build_loader(mixed_dir, "train", 64, 10, 0, 1, seed=11, weights=weights)
    state = loader.state_dict()
    resumed.load_state_dict(state)
    assert rows(next(resumed)) == rows(next(loader))
    with pytest.raises(DataError, match="mixing weights"):
        build_loader(
            mixed_dir, "train", 64, 10, 0, 1, seed=11, weights={"letters": 1.0, "digits": 2.0}
        ).load_state_dict(state)
    with pytest.raises(
        DataError,
        match=r"name source\(s\) \['code'\] that .*manifest\.json does not hold and leave out source\(s\) \['digits'\]",
    ):
        build_loader(mixed_dir, "train", 64, 10, 0, 1, seed=11, weights={"letters": 1.0, "code": 1.0})


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    (root / "small.txt").write_text(CORPUS[:30_000], encoding="utf-8")
    cfg = DataConfig(
        dir=str(root / "data"),
        shard_tokens=2048,
        num_proc=1,
        sources=[SourceConfig(path=str(root / "small.txt"), doc_boundary="blank_line")],
    )
    return prepare(cfg, TokenizerConfig(vocab_size=300))


def edit_manifest(data_dir: Path, change) -> None:
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def corrupt_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))


SHARD = "small-train-00001.bin"
CORRUPTIONS = {
    "missing shard": (
        lambda d: (d / SHARD).unlink(),
        rf"{SHARD} listed in manifest .*manifest\.json is missing",
    ),
    "truncated shard": (
        lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:-2]),
        rf"{SHARD} is truncated: 4094 bytes",
    ),
    "grown shard": (
        lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes() + b"\0\0"),
        rf"{SHARD} is larger than recorded",
    ),
    "other tokenizer": (
        lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text() + " "),
        r"tokenizer\.json has sha256 .* but manifest .*manifest\.json was made with tokenizer sha256",
    ),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer\.json is missing"),
    "escaping path": (
        lambda d: edit_manifest(d, lambda m: m["shards"][0].update(file="../../outside.bin")),
        r"manifest\.json lists shard file '\.\./\.\./outside\.bin', which lies outside the dataset folder",
    ),
    "shard dtype": (
        lambda d: edit_manifest(d, lambda m: m["shards"][1].update(dtype="uint32")),
        rf"{SHARD} is recorded as uint32 but manifest .*manifest\.json declares uint16",
    ),
    "manifest dtype": (
        lambda d: edit_manifest(d, lambda m: m.update(dtype="int8")),
        r"manifest\.json declares dtype 'int8'",
    ),
    "dtype too small": (
        lambda d: edit_manifest(d, lambda m: m.update(vocab_size=70_000)),
        r"manifest\.json declares dtype uint16 but its tokenizer has 70000 tokens, which needs uint32",
    ),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), r"No manifest\.json in .*data"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_dataset_checks_before_the_first_batch(small_dir, tmp_path, case):
    data_dir = tmp_path / "data"
    shutil.copytree(small_dir, data_dir)
    build_loader(data_dir, "train", 32, 2, 0, 1, seed=0)
    corrupt, message = CORRUPTIONS[case]
    corrupt(data_dir)
    with pytest.raises(DataError, match=message):
        build_loader(data_dir, "train", 32, 2, 0, 1, seed=0)


def test_checksums_are_verified_on_request(small_dir, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(small_dir, data_dir)
    corrupt_bytes(data_dir / SHARD)
    build_loader(data_dir, "train", 32, 2, 0, 1, seed=0)  # sizes still match
    with pytest.raises(DataError, match=rf"{SHARD} has sha256 .* but manifest .*manifest\.json records"):
        build_loader(data_dir, "train", 32, 2, 0, 1, seed=0, verify_checksums=True)


def test_sequence_longer_than_the_split(small_dir):
    with pytest.raises(
        DataError, match=r"Split 'val' of .*manifest\.json has no window of seq_len \+ 1 = 100001 tokens"
    ):
        build_loader(small_dir, "val", 100_000, 1, 0, 1, seed=0)
