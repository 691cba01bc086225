"""How a process finds its place in the job without a launcher: rank 0 of 1, or its task in an srun step."""

from __future__ import annotations

import os

import pytest
import torch

from train.config import Config, TrainConfig
from train.distributed import (
    choose_precision,
    ensure_launcher_env,
    native_bf16,
    newton_schulz_method,
    with_auto_resolved,
)
from train.errors import TrainError
from train.optim import deepspeed_optimizer_block
from train.optim_config import OptimConfig

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


TIMEOUT_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
import torch
from train.config import TrainConfig
from train.distributed import setup_distributed
info = setup_distributed(TrainConfig(device="cpu", timeout_minutes={minutes}))
if info.rank == 0:
    time.sleep({sleep})
started = time.monotonic()
try:
    torch.distributed.barrier()
    print("barrier passed", flush=True)
except Exception as err:
    print(f"barrier failed after {{time.monotonic() - started:.0f}} s: {{type(err).__name__}}", flush=True)
"""


def test_train_timeout_minutes_bounds_a_collective_wait():
    """Rank 1 waits at a barrier while rank 0 is busy longer than train.timeout_minutes: rank 1 fails."""
    import subprocess
    import sys

    from tests.helpers import REPO, free_port
    from tests.helpers import test_env as make_env

    port = str(free_port())
    code = TIMEOUT_CHILD.format(repo=str(REPO), minutes=0.05, sleep=12)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=make_env(
                dict(
                    RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
                )
            ),
        )
        for r in (0, 1)
    ]
    waiter = procs[1].communicate(timeout=120)[0]
    procs[0].kill()
    procs[0].wait()
    assert "barrier failed after" in waiter, waiter  # 3 s, not DeepSpeed's 30 minutes
    assert int(waiter.split("after ")[1].split(" s")[0]) < 11


def test_timeout_minutes_must_be_positive():
    from train.config import TrainConfig

    with pytest.raises(ValueError, match="train.timeout_minutes' is 0"):
        TrainConfig(timeout_minutes=0).validate()


def _cpu_bf16(monkeypatch, native: bool) -> None:
    """Play a CPU with or without AVX512-BF16/AMX (both kinds exist; this machine is one of them)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, native, expected):
    _cpu_bf16(monkeypatch, native)
    assert native_bf16("cpu") is native
    assert choose_precision(TrainConfig(precision="auto"), "cpu") == expected
    for explicit in ("bf16", "fp16", "fp32"):
        assert choose_precision(TrainConfig(precision=explicit), "cpu") == explicit


@pytest.mark.parametrize("native, expected", [(True, "standard"), (False, "gram")])
def test_auto_newton_schulz_is_the_standard_one_only_where_bf16_is_native(
    monkeypatch, capsys, native, expected
):
    _cpu_bf16(monkeypatch, native)
    assert newton_schulz_method("auto", "cpu") == expected
    for explicit in ("standard", "gram"):
        assert newton_schulz_method(explicit, "cpu") == explicit
    muon = Config(train=TrainConfig(zero_stage=0), optim=OptimConfig(name="muon"))
    resolved = with_auto_resolved(muon, "cpu", is_main=True)
    assert resolved.optim.muon_ns_method == expected  # recorded as trained
    assert f"optim.muon_ns_method=auto -> {expected} on this cpu" in capsys.readouterr().err
    assert deepspeed_optimizer_block(OptimConfig(name="muon"), "cpu")["params"]["ns_method"] == expected
    with_auto_resolved(Config(), "cpu", is_main=True)  # AdamW: nothing to say about Newton-Schulz
    assert "muon_ns_method" not in capsys.readouterr().err


def test_resolved_config_records_the_concrete_precision(monkeypatch, capsys):
    _cpu_bf16(monkeypatch, False)
    resolved = with_auto_resolved(Config(), "cpu", is_main=True)
    assert Config().train.precision == "auto" and resolved.train.precision == "fp32"
    assert "auto -> fp32" in capsys.readouterr().err
    explicit = Config(train=TrainConfig(precision="bf16"), optim=OptimConfig(muon_ns_method="gram"))
    assert with_auto_resolved(explicit, "cpu", is_main=True) is explicit
    assert "emulated" in capsys.readouterr().err


def test_auto_precision_that_meets_a_refused_combination_says_so(monkeypatch):
    _cpu_bf16(monkeypatch, False)
    muon_skip = Config(
        train=TrainConfig(precision="auto", zero_stage=0, on_nonfinite="skip"),
        optim=OptimConfig(name="muon"),
    )
    with pytest.raises(TrainError, match=r"train.precision=auto means fp32 on this cpu.*on_nonfinite=skip"):
        with_auto_resolved(muon_skip, "cpu", is_main=False)
