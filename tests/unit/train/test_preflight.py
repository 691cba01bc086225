"""train.plan / train.preflight: the batch arithmetic and the memory check before anything large is allocated."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from launch.config import load_config
from tests.helpers import TINY
from train.config import TrainConfig
from train.distributed import DistInfo
from train.errors import TrainError
from train.plan import plan_batches
from train.preflight import check_memory, preflight


def test_batch_arithmetic_and_global_batch_check():
    plan = plan_batches(
        TrainConfig(micro_batch_size=4, grad_accum_steps=2, max_steps=7), world_size=2, seq_len=32
    )
    assert (plan.global_batch_size, plan.tokens_per_step, plan.max_steps) == (16, 512, 7)
    budget = plan_batches(TrainConfig(micro_batch_size=4, grad_accum_steps=2, max_tokens=5000), 2, 32)
    assert budget.max_steps == math.ceil(5000 / 512)
    with pytest.raises(TrainError) as err:
        plan_batches(TrainConfig(micro_batch_size=4, grad_accum_steps=2, global_batch_size=64), 2, 32)
    message = str(err.value)
    assert "train.global_batch_size is 64" in message and "= 16" in message and "world size 2" in message


def _cpu_rank(world_size: int = 1) -> DistInfo:
    return DistInfo(
        rank=0,
        world_size=world_size,
        local_rank=0,
        local_world_size=world_size,
        device=torch.device("cpu"),
        backend="gloo",
    )


def test_preflight_refuses_what_cannot_fit_without_allocating():
    cfg = load_config(str(Path(TINY).parent / "1b.yaml"), ["train.micro_batch_size=64"])
    train = cfg.train
    plan = plan_batches(train, 1, cfg.model.max_seq_len)
    with pytest.raises(TrainError) as err:
        preflight(cfg.model, train, plan, _cpu_rank())
    message = str(err.value)
    assert "estimated training memory per rank" in message and "GiB" in message
    assert "train.zero_stage" in message and "train.micro_batch_size" in message
    tiny = load_config(TINY, [])
    lines = preflight(
        tiny.model, tiny.train, plan_batches(tiny.train, 1, tiny.model.max_seq_len), _cpu_rank()
    )
    assert any("global batch 8" in line and "tokens per step" in line for line in lines)
    assert any("memory per rank" in line for line in lines)
    check_memory(10.0, None, "unknown", train, 1)  # an unknown budget never refuses
    with pytest.raises(TrainError, match="1.0 GiB is available"):
        check_memory(2 * 1024**3, 1024**3, "test", train, 1)
