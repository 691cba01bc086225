"""An out-of-vocabulary token id is a DataError naming the shard and the offset, before the embedding sees it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from common.files import file_sha256
from data_pipeline.errors import DataError
from data_pipeline.loading.loader import build_loader

BAD_OFFSET = 100


@pytest.fixture
def damaged(tmp_path, tiny_data_dir):
    """A copy of the tiny dataset whose val shard holds an id past the vocabulary at BAD_OFFSET (size unchanged)."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    record = next(s for s in manifest["shards"] if s["split"] == "val")
    path = data_dir / record["file"]
    tokens = np.fromfile(path, dtype=np.dtype(record["dtype"]).newbyteorder("<"))
    tokens[BAD_OFFSET] = manifest["vocab_size"] + 7
    tokens.tofile(path)
    return data_dir, path, manifest, record


def test_the_loader_names_shard_and_offset_of_an_out_of_vocab_id(damaged):
    data_dir, path, _, _ = damaged
    loader = build_loader(data_dir, "val", 32, 4, 0, 1, seed=0)
    with pytest.raises(
        DataError, match=rf"Shard {path} holds token id \d+ at token offset {BAD_OFFSET}, outside"
    ):
        for _ in range(loader.windows_per_epoch):
            next(loader)


def test_verify_checksums_checks_the_largest_id_of_every_shard(damaged):
    data_dir, path, manifest, record = damaged
    record["sha256"] = file_sha256(path)  # a shard prepared with another tokenizer: its sha256 is consistent
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    build_loader(data_dir, "val", 32, 4, 0, 1, seed=0)  # sizes only: accepted here, caught when read
    with pytest.raises(DataError, match=rf"token offset {BAD_OFFSET}, outside the tokenizer's vocabulary"):
        build_loader(data_dir, "val", 32, 4, 0, 1, seed=0, verify_checksums=True)
