"""Reading shards from a real S3 server (SeaweedFS on loopback): the same batches as from local shards,
through a cache that prefetches whole shards, a cache smaller than one shard (ranged reads, and it says
so), a shard changed on the server after prepare refused by name, and nothing deleted on the server."""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.format.manifest import load_manifest
from data_pipeline.loading.loader import build_loader
from data_pipeline.storage.cache import RESERVED, ShardCache
from data_pipeline.storage.store import DataStore
from tests.s3_localhost import BUCKET


def upload(fs, local_dir, bucket_prefix: str) -> str:
    """The prepared folder, copied file by file to s3://bucket_prefix (manifest last, as prepare does)."""
    files = sorted(p for p in local_dir.iterdir() if p.is_file() and p.suffix in (".bin", ".json"))
    for path in sorted(files, key=lambda p: p.name == "manifest.json"):
        fs.put_file(str(path), f"{bucket_prefix}/{path.name}")
    return f"s3://{bucket_prefix}"


@pytest.fixture
def s3_data(s3_env, tiny_data_dir):
    fs = s3_env.filesystem()
    url = upload(fs, tiny_data_dir, f"{BUCKET}/loader-{uuid.uuid4().hex[:8]}")
    return url, fs


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(a, b)
    )


def test_s3_batches_equal_local_ones_and_resume(s3_data, tiny_data_dir, tmp_path):
    url, fs = s3_data
    remote_before = sorted(fs.find(url))
    local = build_loader(tiny_data_dir, "train", 64, 4, 1, 2, seed=9)
    remote = build_loader(url, "train", 64, 4, 1, 2, seed=9, cache_dir=str(tmp_path / "cache"))
    assert remote.manifest_sha == local.manifest_sha
    want = batches(local, 30)
    assert same(batches(remote, 20), want[:20])
    state = remote.state_dict()
    resumed = build_loader(
        url, "train", 64, 4, 1, 2, seed=9, cache_dir=str(tmp_path / "cache"), num_workers=2
    )
    resumed.load_state_dict(state)
    assert same(batches(resumed, 10), want[20:])
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.bin"))
    assert cached and set(cached) <= {s.file for s in load_manifest(tiny_data_dir).shards}
    assert sorted(fs.find(url)) == remote_before  # nothing on the server was deleted or added


def test_cache_smaller_than_a_shard_reads_ranges_and_says_so(
    s3_data, tiny_data_dir, tmp_path, caplog, capsys
):
    url, _ = s3_data
    local = build_loader(tiny_data_dir, "train", 64, 4, 0, 1, seed=2)
    with caplog.at_level(logging.WARNING):
        remote = build_loader(
            url, "train", 64, 4, 0, 1, seed=2, cache_dir=str(tmp_path / "c"), cache_limit=1000
        )
        assert same(batches(remote, 8), batches(local, 8))
    assert "ranged requests" in caplog.text and "data.cache_limit=1000 bytes" in capsys.readouterr().err
    assert not list((tmp_path / "c").rglob("*.bin"))  # nothing cached: the bound holds


def test_cache_bound_of_two_shards_evicts_and_stays_exact(s3_data, tiny_data_dir, tmp_path):
    url, _ = s3_data
    shard_bytes = max(s.tokens for s in load_manifest(tiny_data_dir).shards) * 2
    local = build_loader(tiny_data_dir, "val", 32, 2, 0, 1, seed=4)
    remote = build_loader(
        url, "val", 32, 2, 0, 1, seed=4, cache_dir=str(tmp_path / "c"), cache_limit=2 * shard_bytes
    )
    assert same(batches(remote, 40), batches(local, 40))
    assert sum(p.stat().st_size for p in (tmp_path / "c").rglob("*.bin")) <= 2 * shard_bytes


@pytest.mark.parametrize("limit", [None, 1000])
def test_shard_changed_on_the_server_is_refused_by_name(s3_data, tiny_data_dir, tmp_path, limit):
    url, fs = s3_data
    manifest = load_manifest(tiny_data_dir)
    victim = manifest.shards_of("train")[0].file
    data = bytearray(fs.cat_file(f"{url}/{victim}"))
    data[0] ^= 0xFF
    fs.pipe(f"{url}/{victim}", bytes(data))  # same size: only the checksum can tell
    loader = build_loader(
        url, "train", 64, 64, 0, 1, seed=0, cache_dir=str(tmp_path / "c"), cache_limit=limit
    )
    with pytest.raises(DataError, match=rf"Shard s3://.*/{victim} has sha256 .* but its manifest records"):
        batches(loader, 20)


def shard_cache(url: str, tiny_data_dir, cache_dir, limit=None) -> ShardCache:
    manifest = load_manifest(tiny_data_dir)
    dtype = np.dtype(manifest.dtype)
    shards = {s.file: (s.tokens * dtype.itemsize, s.sha256) for s in manifest.shards}
    return ShardCache(DataStore(url), str(cache_dir), limit, shards, dtype)


def test_shards_download_in_parallel_each_under_its_own_lock(s3_data, tiny_data_dir, tmp_path):
    """While one shard's download holds its lock (here: the test holds it), another shard still downloads:
    one folder-wide lock used to serialise every rank of a node behind one download stream."""
    url, _ = s3_data
    first, second = [s.file for s in load_manifest(tiny_data_dir).shards_of("train")[:2]]
    cache = shard_cache(url, tiny_data_dir, tmp_path / "c")
    with open(cache._lock_path(first), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with ThreadPoolExecutor(2) as pool:
            other = pool.submit(cache.tokens, second, 0, 8)
            blocked = pool.submit(cache.tokens, first, 0, 8)
            assert len(other.result(timeout=120)) == 8
            assert not blocked.done()  # the same shard waits for the download in flight, not a second one
            fcntl.flock(held, fcntl.LOCK_UN)
            assert len(blocked.result(timeout=120)) == 8


def test_reservations_hold_the_bound_across_processes_and_stale_ones_are_cleared(
    s3_data, tiny_data_dir, tmp_path
):
    """A download in flight elsewhere reserves its shard's bytes (a sparse file under its held lock): the next
    download evicts to make room for both. A reservation whose lock nobody holds (its process died) is removed."""
    url, _ = s3_data
    manifest = load_manifest(tiny_data_dir)
    names = [s.file for s in manifest.shards_of("train")[:3]]

    def cached(folder):
        return {p.name for p in folder.rglob("*.bin") if ".locks" not in p.parts}

    def reserve(cache, name, size):
        reservation = cache._lock_path(name).with_suffix(RESERVED)
        reservation.write_bytes(b"")
        os.truncate(reservation, size)
        return reservation

    live_cache = shard_cache(url, tiny_data_dir, tmp_path / "live")
    sizes = [live_cache.shards[n][0] for n in names]
    live_cache.limit = sizes[0] + max(
        sizes[1], sizes[2]
    )  # the first and third fit, unless the second is counted
    live_cache.tokens(names[0], 0, 4)
    with open(live_cache._lock_path(names[1]), "w") as in_flight:
        fcntl.flock(in_flight, fcntl.LOCK_EX)
        live = reserve(live_cache, names[1], sizes[1])
        live_cache.tokens(names[2], 0, 4)
        assert cached(tmp_path / "live") == {names[2]} and live.exists()

    stale_cache = shard_cache(url, tiny_data_dir, tmp_path / "stale", limit=sum(sizes))
    stale_cache.tokens(names[0], 0, 4)
    stale = reserve(stale_cache, manifest.shards_of("val")[0].file, 10**12)  # a dead process's: no lock held
    stale_cache.tokens(names[2], 0, 4)
    assert cached(tmp_path / "stale") == {names[0], names[2]} and not stale.exists()


def test_download_listing_checks_every_size_and_raises_the_callers_error(s3_data, tmp_path):
    """The one download of a listing (checkpoint fetch, export copy): a file that changed on the server since it
    was listed is refused by URL, with the error type the caller chose."""
    url, fs = s3_data
    store = DataStore(url)
    listing = store.listing()
    store.download_listing(listing, tmp_path / "copy")
    assert {n: (tmp_path / "copy" / n).stat().st_size for n in listing} == listing
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == fs.cat_file(f"{url}/manifest.json")
    fs.pipe_file(f"{url}/manifest.json", fs.cat_file(f"{url}/manifest.json") + b"\n")  # changed after listing

    class CallersError(Exception):
        pass

    with pytest.raises(CallersError, match=rf"{url}/manifest.json gave {listing['manifest.json'] + 1} bytes"):
        store.download_listing(listing, tmp_path / "again", CallersError)
