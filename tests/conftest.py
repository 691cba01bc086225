"""Session fixtures shared by every package's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SHAKESPEARE, TINY, venv_path

for _key, _value in dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
                         TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(_key, _value)
os.environ["PATH"] = venv_path()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """tinyshakespeare prepared once per session with the tiny preset (tokenizer, shards, manifest)."""
    from data_pipeline.prepare import prepare
    from launch.config import load_config

    data_dir = tmp_path_factory.mktemp("tiny_data")
    cfg = load_config(TINY, [f"data.dir={data_dir}", "data.num_proc=1", f"data.sources=[{{path: {SHAKESPEARE}, doc_boundary: blank_line}}]"])
    prepare(cfg.data, cfg.tokenizer)
    return data_dir
