"""Session fixtures shared by every package's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import built_once_per_run, shared_builds_changed, venv_path

for _key, _value in dict(
    HF_DATASETS_OFFLINE="1",
    HF_HUB_OFFLINE="1",
    WANDB_MODE="disabled",
    TOKENIZERS_PARALLELISM="false",
    OMP_NUM_THREADS="1",
).items():
    os.environ.setdefault(_key, _value)
os.environ["PATH"] = venv_path()

# One compute thread per test process, like every subprocess the tests start (tests.helpers.test_env). The suite
# runs two pytest workers on two cores next to training subprocesses: torch's default of one OpenMP thread per
# core then oversubscribes the cores, and its spinning threads made an in-process 130-step test 12x slower.
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def shared_builds_unchanged():
    """At the end of each worker's session: the builds shared by the workers (built_once_per_run) are as they were
    built. A test that wrote into one would change what tests on the other worker read."""
    yield
    changed = shared_builds_changed()
    assert not changed, "tests wrote into shared builds (copy them first):\n" + "\n".join(changed[:20])


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """tinyshakespeare prepared once per run with the tiny preset (tokenizer, shards, manifest), the way the
    benchmarks prepare it; shared by the workers, so read-only (copy it to change it)."""
    from bench.slm_runs import prepare_tiny_shakespeare

    return built_once_per_run(tmp_path_factory, "tiny_data", prepare_tiny_shakespeare)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback for the session (skipped, with the reason, if it cannot start)."""
    from tests.s3_localhost import start_s3

    servers = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        server = next(servers)
    except RuntimeError as err:
        pytest.skip(f"no S3 server: {err}")
    yield server
    servers.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server's credentials and endpoint in the standard AWS_* variables, as a user sets them."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
