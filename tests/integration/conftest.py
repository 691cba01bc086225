"""Fixtures shared by the training tests of several modules."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from tests.helpers import built_once_per_run, run, slm_cmd
from tests.runs import ONE_PROC, train_args


@pytest.fixture(scope="session")
def single_run(tmp_path_factory, tiny_data_dir) -> Path:
    """1 process, ZeRO-2, fp32, micro-batch 4 x accumulation 2: the reference curve of the interrupted runs
    (test_training_runs.py, test_muon.py, test_s3_training.py, test_s3_checkpoints.py), made once per run and
    shared by the workers: read-only."""

    def build(folder: Path) -> None:
        run(slm_cmd(train_args(folder / "run", tiny_data_dir, *ONE_PROC)))

    return built_once_per_run(tmp_path_factory, "single_run", build) / "run"


STAGE_EXTRAS = {
    1: ["train.precision=bf16", "train.activation_checkpointing=true", "train.grad_accum_steps=2"]
}


class TwoProcRuns:
    """The 2-process run of each ZeRO stage (micro-batch 4 per rank), made on first use, once per run and shared by
    the workers: read-only.

    The ZeRO-0 run starts on an unprepared data.dir: rank 0 prepares it while rank 1 waits.
    """

    def __init__(self, tmp_path_factory, tiny_data_dir: Path):
        self.factory, self.tiny_data_dir = tmp_path_factory, tiny_data_dir
        self.made: Dict[int, Path] = {}
        self.outputs: Dict[int, str] = {}

    def data_dir(self, stage: int) -> Path:
        return self(0).parent / "data" if stage == 0 else self.tiny_data_dir

    def __call__(self, stage: int) -> Path:
        if stage not in self.made:

            def build(folder: Path) -> None:
                data_dir = folder / "data" if stage == 0 else self.tiny_data_dir
                extras = [f"train.zero_stage={stage}", "data.num_proc=1", *STAGE_EXTRAS.get(stage, [])]
                out = run(slm_cmd(train_args(folder / "run", data_dir, *extras), nproc=2))
                (folder / "status.txt").write_text(out.stderr)  # the status lines, for every worker

            folder = built_once_per_run(self.factory, f"zero{stage}_two_proc", build)
            self.made[stage], self.outputs[stage] = folder / "run", (folder / "status.txt").read_text()
        return self.made[stage]


@pytest.fixture(scope="session")
def two_proc_run(tmp_path_factory, tiny_data_dir) -> TwoProcRuns:
    """The 2-process runs (test_training_runs.py; ZeRO-2 also test_s3_checkpoints.py), made once per run."""
    return TwoProcRuns(tmp_path_factory, tiny_data_dir)
