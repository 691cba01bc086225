"""train/ only reads prepared data: a data.dir without a manifest is a clear DataError, and no train/ module
imports the prepare engine (`slm train` prepares a missing data.dir in the launch layer first)."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.errors import DataError
from launch.config import load_config
from tests.helpers import TINY
from tests.unit.test_layering import import_graph
from train.distributed import DistInfo
from train.startup import load_data


def test_load_data_refuses_a_data_dir_without_a_manifest(tmp_path):
    cfg = load_config(TINY, [f"data.dir={tmp_path / 'data'}"])
    with pytest.raises(DataError, match=r"No manifest\.json in data\.dir .*slm prepare CONFIG"):
        load_data(cfg, None)


@pytest.mark.parametrize("world_size, cache", [(2, []), (1, []), (2, ["data.cache_limit=1000000"])])
def test_a_multi_rank_run_on_a_url_names_its_node_local_cache(world_size, cache):
    """On a cluster the default cache is an unbounded folder in each node's /tmp: refused before any download."""
    cfg = load_config(TINY, ["data.dir=s3://bucket/unreachable-corpus", *cache])
    place = DistInfo(0, world_size, 0, world_size, torch.device("cpu"), "gloo")
    if world_size > 1 and not cache:
        with pytest.raises(DataError, match=r"s3://bucket/unreachable-corpus .* 2 ranks.*data\.cache_dir"):
            load_data(cfg, place)
    else:  # allowed: it gets as far as asking the (absent) server for the manifest
        with pytest.raises(DataError) as err:
            load_data(cfg, place)
        assert "data.cache_dir nor" not in str(err.value)


def test_train_never_imports_the_prepare_engine():
    graph = import_graph(("data_pipeline", "train"))
    found = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.split(".")[0] == "train"
        for target in targets
        if target == "data_pipeline.prepare" or target.startswith("data_pipeline.prepare.")
    )
    assert found == []
