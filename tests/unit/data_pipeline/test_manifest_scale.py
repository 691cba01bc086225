"""A dataset of 100,000 shards: sizes are checked from one listing and still catch a missing or truncated
shard among them, and the loader reads windows that span shard boundaries correctly."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.format.manifest import FORMAT_VERSION, load_manifest, verify_dataset
from data_pipeline.loading.loader import build_loader

SHARDS, TOKENS = 100_000, 3


def write_many_shards(data_dir: Path, tokenizer: Path) -> np.ndarray:
    """SHARDS uint16 shards of TOKENS tokens each in one source; returns the whole train token stream."""
    data_dir.mkdir()
    shutil.copy(tokenizer, data_dir / "tokenizer.json")
    stream = np.random.default_rng(0).integers(0, 4000, SHARDS * TOKENS).astype("<u2")
    records = []
    for index in range(SHARDS):
        data = stream[index * TOKENS : (index + 1) * TOKENS].tobytes()
        name = f"many-train-{index:06d}.bin"
        fd = os.open(data_dir / name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.close(fd)
        records.append(
            {
                "file": name,
                "split": "train",
                "source": "many",
                "index": index,
                "dtype": "uint16",
                "tokens": TOKENS,
                "documents": 0,
                "text_bytes": TOKENS,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "tokenizer_sha256": hashlib.sha256((data_dir / "tokenizer.json").read_bytes()).hexdigest(),
        "vocab_size": 4096,
        "eot_id": 0,
        "val_fraction": 0.0,
        "shard_tokens": TOKENS,
        "sources": [{"name": "many", "documents": 0}],
        "shards": records,
        "prepared_from": {},
    }
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return stream.astype(np.int64)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, tiny_data_dir):
    data_dir = tmp_path_factory.mktemp("many") / "data"
    yield data_dir, write_many_shards(data_dir, tiny_data_dir / "tokenizer.json")
    shutil.rmtree(data_dir)  # 100,000 files: do not leave them for pytest's rotation of old temp folders


def test_100k_shards_verify_and_load(many_shards):
    data_dir, stream = many_shards
    manifest = load_manifest(data_dir)
    assert len(manifest.shards) == SHARDS
    verify_dataset(manifest, splits=("train",))
    seq_len = 10
    loader = build_loader(data_dir, "train", seq_len, 4, 0, 1, seed=1)
    assert loader.windows_per_epoch == (SHARDS * TOKENS - 1) // seq_len
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len]
    batch = next(loader)
    for inputs, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
        row = np.concatenate([inputs, labels[-1:]])
        assert (windows == row).all(axis=1).sum() == 1  # each row is one real window, across shard boundaries
        assert np.array_equal(inputs[1:], labels[:-1])


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_one_bad_shard_among_100k_is_named(many_shards, damage):
    data_dir, _ = many_shards
    victim = data_dir / "many-train-054321.bin"
    saved = victim.read_bytes()
    try:
        if damage == "missing":
            victim.unlink()
            message = r"many-train-054321\.bin listed in manifest .* is missing"
        else:
            victim.write_bytes(saved[:-2])
            message = r"many-train-054321\.bin is truncated: 4 bytes"
        with pytest.raises(DataError, match=message):
            verify_dataset(load_manifest(data_dir), splits=("train",))
    finally:
        victim.write_bytes(saved)
