"""An object store that cannot be reached is said to be unreachable at the first look-up, before anything is
prepared or announced (issue 21: `slm train` printed "preparing the data now" first)."""

from __future__ import annotations

import pytest

from data_pipeline.errors import DataError
from data_pipeline.storage.store import DataStore
from launch.config import load_config
from launch.prepare_missing import prepare_missing_data
from tests.helpers import TINY, free_port


def test_unreachable_store_fails_before_preparing(monkeypatch, capsys):
    """Nothing listens on the port; s3fs would answer isfile() False and the run would start preparing."""
    for key, value in dict(
        AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1"
    ).items():
        monkeypatch.setenv(key, value)
    endpoint = f"http://127.0.0.1:{free_port()}"
    options = {"client_kwargs": {"endpoint_url": endpoint}, "retries": 1}
    with pytest.raises(DataError, match=r"Could not look up s3://bucket/run/manifest.json .*reachable"):
        DataStore("s3://bucket/run", options).exists("manifest.json")
    cfg = load_config(
        TINY,
        [
            "data.dir=s3://bucket/run",
            f"data.storage_options={{client_kwargs: {{endpoint_url: '{endpoint}'}}, retries: 1}}",
        ],
    )
    with pytest.raises(DataError, match="Could not look up"):
        prepare_missing_data(cfg)
    assert "preparing the data now" not in capsys.readouterr().err


def test_exists_on_a_real_store_tells_files_from_prefixes_and_absence(s3_env, tmp_path):
    """exists() now asks fs.info (isfile swallowed connection errors): a file, a prefix, nothing."""
    from tests.s3_localhost import BUCKET

    store = DataStore(f"s3://{BUCKET}/exists-check")
    local = tmp_path / "manifest.json"
    local.write_text("{}")
    store.upload(local, "sub/manifest.json")
    assert store.exists("sub/manifest.json")
    assert not store.exists("sub") and not store.exists("missing.json")
