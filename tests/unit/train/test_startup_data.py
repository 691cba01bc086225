"""train/ only reads prepared data: a data.dir without a manifest is a clear DataError, and no train/ module
imports the prepare engine (`slm train` prepares a missing data.dir in the launch layer first)."""

from __future__ import annotations

import pytest

from data_pipeline.errors import DataError
from launch.config import load_config
from tests.helpers import TINY
from tests.unit.test_layering import import_graph
from train.startup import load_data


def test_load_data_refuses_a_data_dir_without_a_manifest(tmp_path):
    cfg = load_config(TINY, [f"data.dir={tmp_path / 'data'}"])
    with pytest.raises(DataError, match=r"No manifest\.json in data\.dir .*slm prepare CONFIG"):
        load_data(cfg, None)


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
