"""The O(1)-memory sample order: a bijection on [0, n) for any n, a pure function of (seed, stream, epoch,
index) that is the same in another process, and a real shuffle (epochs and seeds differ)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.loading.loader import build_loader
from data_pipeline.loading.order import round_keys, shuffle

SIZES = [1, 2, 3, 7, 64, 97, 256, 1000, 1024, 4099, 65536, 65537, 1_000_003]


@pytest.mark.parametrize("n", SIZES)
def test_every_index_exactly_once_per_epoch(n):
    for epoch in (0, 1):
        order = shuffle(np.arange(n), n, round_keys(7, 0, epoch))
        assert order.dtype == np.int64 and order.shape == (n,)
        assert np.array_equal(np.sort(order), np.arange(n))


def test_indices_map_one_at_a_time_as_in_bulk():
    n, keys = 4099, round_keys(3, 2, 5)
    bulk = shuffle(np.arange(n), n, keys)
    picked = np.array([17, 0, 4098, 17, 2048])
    assert np.array_equal(shuffle(picked, n, keys), bulk[picked])
    assert all(int(shuffle(np.array([i]), n, keys)[0]) == bulk[i] for i in range(0, n, 97))


def test_epochs_seeds_and_streams_give_other_orders():
    n = 10_000
    base = shuffle(np.arange(n), n, round_keys(1, 0, 0))
    for keys in (round_keys(1, 0, 1), round_keys(2, 0, 0), round_keys(1, 1, 0)):
        other = shuffle(np.arange(n), n, keys)
        assert np.mean(other == base) < 0.01
    assert np.mean(base == np.arange(n)) < 0.01  # not the identity
    # A shuffle, not a rotation: neighbours land far apart, and both halves are spread over the range.
    assert np.median(np.abs(np.diff(base))) > n / 10
    assert abs(np.mean(base[: n // 2]) - n / 2) < n / 20


def test_same_order_in_another_process():
    n = 12_345
    here = shuffle(np.arange(0, n, 7), n, round_keys(2**62 + 5, 3, 11))
    code = (
        "import numpy as np, sys; from data_pipeline.loading.order import round_keys, shuffle; "
        "sys.stdout.write(shuffle(np.arange(0, 12345, 7), 12345, round_keys(2**62 + 5, 3, 11)).tobytes().hex())"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert bytes.fromhex(there) == here.tobytes()


def test_bad_positions_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        shuffle(np.array([5]), 5, round_keys(0, 0, 0))
    with pytest.raises(ValueError, match="n >= 1"):
        shuffle(np.array([], dtype=np.int64), 0, round_keys(0, 0, 0))


def test_an_old_loader_state_is_refused(tiny_data_dir):
    loader = build_loader(tiny_data_dir, "train", 64, 4, 0, 1, seed=3)
    next(loader)
    state = {**loader.state_dict(), "version": 1}
    with pytest.raises(
        DataError, match=r"saved loader state has version 1 .* writes version 2.*sample order"
    ):
        build_loader(tiny_data_dir, "train", 64, 4, 0, 1, seed=3).load_state_dict(state)
