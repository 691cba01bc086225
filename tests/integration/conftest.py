"""Fixtures shared by the training tests of several modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run, slm_cmd


@pytest.fixture(scope="session")
def single_run(tmp_path_factory, tiny_data_dir) -> Path:
    """1 process, ZeRO-2, fp32, micro-batch 4 x accumulation 2: the reference curve of the interrupted runs
    (test_training_runs.py, and the S3 run of test_s3_training.py), made once per session."""
    from tests.runs import ONE_PROC, train_args

    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(slm_cmd(train_args(run_dir, tiny_data_dir, *ONE_PROC)))
    return run_dir
