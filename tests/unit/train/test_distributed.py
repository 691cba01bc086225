"""How a process finds its place in the job without a launcher: rank 0 of 1, or its task in an srun step."""

from __future__ import annotations

import os

import pytest

from train.distributed import ensure_launcher_env
from train.errors import TrainError

PLACE = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def bare_env(monkeypatch):
    for key in PLACE + ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_plain_process_is_rank_0_of_1(bare_env):
    ensure_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_PORT"].isdigit()


def test_srun_task_takes_its_place_from_slurm(bare_env):
    for key, value in dict(
        SLURM_STEP_NUM_TASKS="8",
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
        SLURM_STEP_TASKS_PER_NODE="4(x2)",
        MASTER_ADDR="node1",
        MASTER_PORT="29500",
    ).items():
        bare_env.setenv(key, value)
    ensure_launcher_env()
    assert [os.environ[k] for k in PLACE] == ["5", "8", "1", "4", "node1", "29500"]


def test_srun_tasks_without_a_rendezvous_are_refused(bare_env):
    bare_env.setenv("SLURM_STEP_NUM_TASKS", "2")
    bare_env.setenv("SLURM_PROCID", "0")
    bare_env.setenv("SLURM_LOCALID", "0")
    with pytest.raises(
        TrainError, match="one of 2 tasks of an srun step.*MASTER_ADDR, MASTER_PORT is not set"
    ):
        ensure_launcher_env()
    assert "RANK" not in os.environ, "no task may go on as a rank-0 run of its own"


def test_a_launchers_place_is_kept(bare_env):
    for key, value in dict(RANK="3", WORLD_SIZE="4", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="0").items():
        bare_env.setenv(key, value)
    ensure_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")
