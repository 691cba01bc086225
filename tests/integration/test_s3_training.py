"""The whole path through a real S3 server (SeaweedFS on loopback), configured only by the standard AWS_*
variables: `slm prepare` into s3:// (tokenizer.path an s3:// URL too), a prepare killed with SIGKILL and
resumed on "another node" (no staging folder) from the snapshot on the remote folder, `slm train` from s3:// killed with SIGKILL mid-run and resumed with a cache
smaller than one shard; the loss curve equals, bitwise, the same run on local shards."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from data_pipeline.format.manifest import load_manifest
from tests.helpers import SHAKESPEARE, TINY, run, slm_cmd
from tests.helpers import test_env as make_env
from tests.runs import ONE_PROC, losses, read_until, rows, start, train_args
from tests.s3_localhost import BUCKET

pytestmark = pytest.mark.slow
SOURCES = f"data.sources=[{{path: {SHAKESPEARE}, doc_boundary: blank_line}}]"


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tiny_data_dir, tmp_path_factory):
    """tinyshakespeare prepared by `slm prepare` into s3://, with the tiny data's tokenizer read from s3://.

    Slow (about 40 s on 2 busy cores, charged to the module's first test): two `slm prepare` processes, the first
    killed mid-way, each committing to the S3 server after every 4 KB chunk so that the kill lands between
    commits and the resume has a remote snapshot to restore."""
    fs, prefix = s3_server.filesystem(), f"{BUCKET}/train-{uuid.uuid4().hex[:8]}"
    fs.put_file(str(tiny_data_dir / "tokenizer.json"), f"{prefix}/tok/tokenizer.json")
    url, cache = f"s3://{prefix}/data", tmp_path_factory.mktemp("prep_cache")
    args = [
        "prepare",
        TINY,
        f"data.dir={url}",
        "data.num_proc=1",
        SOURCES,
        f"data.cache_dir={cache}",
        f"tokenizer.path=s3://{prefix}/tok/tokenizer.json",
    ]
    env = make_env(
        {
            **s3_server.env,
            "SLM_PREPARE_CHUNK_BYTES": "4096",
            "SLM_PREPARE_COMMIT_SECONDS": "0",
            "SLM_PREPARE_REMOTE_COMMIT_SECONDS": "0",
        }
    )
    proc = start(slm_cmd(args), env=env)
    # Kill the first prepare once a shard is on the server: the rerun resumes from its last commit.
    while not fs.exists(f"{prefix}/data/tinyshakespeare-train-00001.bin") and proc.poll() is None:
        fs.invalidate_cache()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the first prepare ended by itself before it was killed"
    assert not fs.exists(f"{prefix}/data/manifest.json")
    # Resume on "another machine": a fresh cache_dir, so the staging folder is gone; the remote snapshot remains.
    other = str(tmp_path_factory.mktemp("other_node_cache"))
    resumed = run(
        slm_cmd([a if not a.startswith("data.cache_dir=") else f"data.cache_dir={other}" for a in args]),
        env=env,
    )
    return url, fs, prefix, resumed.stderr


def test_prepare_to_s3_resumes_and_equals_a_local_prepare(s3_dataset, tiny_data_dir, s3_env):
    url, fs, prefix, output = s3_dataset
    assert "restored the interrupted prepare's last commit from s3://" in output
    assert "resuming an interrupted prepare" in output
    remote, local = load_manifest(url), load_manifest(tiny_data_dir)
    assert [(s.file, s.tokens, s.sha256) for s in remote.shards] == [
        (s.file, s.tokens, s.sha256) for s in local.shards
    ]
    assert remote.tokenizer_sha256 == local.tokenizer_sha256
    for shard in local.shards[:3]:
        assert fs.cat_file(f"{prefix}/data/{shard.file}") == (tiny_data_dir / shard.file).read_bytes()
    again = run(
        slm_cmd(
            [
                "prepare",
                TINY,
                f"data.dir={url}",
                "data.num_proc=1",
                SOURCES,
                f"tokenizer.path=s3://{prefix}/tok/tokenizer.json",
            ]
        ),
        env=make_env(s3_env.env),
    )
    assert "is already complete" in again.stderr


def test_train_from_s3_killed_and_resumed_with_a_tiny_cache_equals_local(
    s3_dataset, single_run, s3_server, tmp_path
):
    """Slow (about 30 s on 2 busy cores): two 1-process `slm train` start-ups, one killed after step 8 and one
    resumed to step 12 reading its shards from the S3 server through a cache smaller than a shard."""
    url, fs, _, _ = s3_dataset
    run_dir = tmp_path / "run"
    cmd = slm_cmd(train_args(run_dir, url, *ONE_PROC, f"data.cache_dir={tmp_path / 'cache'}"))
    env = make_env(s3_server.env)
    proc, seen = start(cmd, env=env), []
    read_until(proc, "train step 8 ", seen)  # after the checkpoint of step 6
    proc.kill()
    proc.wait(timeout=60)
    assert 6 <= max(r["step"] for r in rows(run_dir)) < 12
    before = sorted(fs.find(url))
    resumed = run(
        slm_cmd(
            train_args(
                run_dir, url, *ONE_PROC, f"data.cache_dir={tmp_path / 'small'}", "data.cache_limit=1000"
            )
        ),
        env=env,
    )
    assert "at step 6" in resumed.stderr and "ranged requests" in resumed.stderr
    assert losses(run_dir) == losses(single_run)  # every step, bitwise
    assert [r["step"] for r in rows(run_dir)][-6:] == list(range(7, 13))
    assert sorted(fs.find(url)) == before  # training never writes or deletes on the server
