"""train.plan / train.preflight: the batch arithmetic and the memory check before anything large is allocated."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from launch.config import load_config
from model.stats import training_memory_per_rank
from tests.helpers import TINY
from train.config import TrainConfig
from train.distributed import DistInfo
from train.errors import TrainError
from train.plan import plan_batches
from train.preflight import (
    check_memory,
    choose_activation_checkpointing,
    least_budget_over_ranks,
    memory_budget_per_rank,
    preflight,
)


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


def _budget_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # rank 1 says its node is crowded (4 ranks share the host's memory): its budget is the smaller one
    place = DistInfo(rank, 2, 0, 1 if rank == 0 else 4, torch.device("cpu"), "gloo")
    own, _ = memory_budget_per_rank(place)
    least, source = least_budget_over_ranks(place)
    Path(out_dir, f"{rank}.txt").write_text(f"{own}\n{least}\n{source}\n")
    torch.distributed.destroy_process_group()


def test_every_rank_checks_its_memory_and_the_least_budget_wins(tmp_path):
    """Two real gloo ranks: each reads its own budget, and both judge the run against the smaller one."""
    torch.multiprocessing.spawn(
        _budget_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    (own_0, least_0, source_0), (own_1, least_1, source_1) = (
        (tmp_path / f"{rank}.txt").read_text().splitlines() for rank in (0, 1)
    )
    assert least_0 == least_1 and int(least_0) <= min(int(own_0), int(own_1))
    assert int(least_0) < int(own_0) // 2  # rank 0's own budget (the whole host) lost to rank 1's quarter
    assert source_0.endswith("the least of 2 ranks") and source_1.endswith("the least of 2 ranks")


def test_auto_activation_checkpointing_is_on_only_when_the_estimate_does_not_fit():
    """1b at micro-batch 8 x 1024 on 8 ranks: about 7 GiB per rank with recomputation, far more without."""
    cfg = load_config(str(Path(TINY).parent / "1b.yaml"), [])
    assert cfg.train.activation_checkpointing is None  # the preset leaves it to the preflight
    plan = plan_batches(cfg.train, 8, cfg.model.max_seq_len)

    def total(checkpointing: bool) -> float:
        memory = training_memory_per_rank(
            cfg.model, cfg.train.zero_stage, 8, cfg.train.micro_batch_size, plan.seq_len, checkpointing
        )
        return memory["total"]

    with_it, without = total(True), total(False)
    assert with_it < without / 2
    choose = lambda train, budget: choose_activation_checkpointing(cfg.model, train, plan, 8, budget)  # noqa: E731
    assert choose(cfg.train, int(without) + 1) is False  # an 80 GB card: no recomputation
    assert choose(cfg.train, int((with_it + without) / 2)) is True  # fits only with it
    assert choose(cfg.train, None) is False  # unknown memory: off, as before
    forced = dataclasses.replace(cfg.train, activation_checkpointing=True)
    assert choose(forced, int(without) + 1) is True  # an explicit choice is kept
