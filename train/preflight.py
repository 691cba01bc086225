"""Checks and a summary before the first step, while nothing large has been allocated yet.

The batch arithmetic (global batch, tokens per step, token budget -> max_steps) is the run's plan
(train.plan.RunPlan), summarized here, and the per-rank memory estimate of
`model.stats.training_memory_per_rank` is compared with what one rank can have: the GPU's memory, or on
CPU the host's available RAM shared by the node's ranks. A run that cannot fit stops with the numbers and the knobs that help, instead of an out-of-memory
crash minutes later (or a swapping machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from common.files import GIB
from model.stats import training_memory_per_rank
from train.config import TrainConfig
from train.distributed import DistInfo
from train.errors import TrainError
from train.plan import RunPlan


def meminfo_available_bytes(path: str = "/proc/meminfo") -> Optional[int]:
    """MemAvailable of the host in bytes (None where /proc/meminfo does not exist)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


UNKNOWN = 2**62
"""Stands for an unknown budget in the all-reduce (it never wins a minimum against a known one)."""


def memory_budget_per_rank(dist_info: DistInfo) -> tuple[Optional[int], str]:
    """Bytes this rank may use and where that number comes from: a GPU's free memory now (another process or a
    previous job may hold some), or the host's MemAvailable shared by the node's ranks."""
    if dist_info.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dist_info.device)
        return free, f"free memory of {torch.cuda.get_device_name(dist_info.device)}"
    available = meminfo_available_bytes()
    if available is None:
        return None, "unknown host memory"
    share = max(1, dist_info.local_world_size)
    return available // share, f"host MemAvailable / {share} rank(s) on this node"


def least_budget_over_ranks(dist_info: DistInfo) -> tuple[Optional[int], str]:
    """memory_budget_per_rank on every rank, the smallest one kept (a collective: every rank calls it), so that
    one crowded GPU or host fails the preflight instead of running out of memory mid-step."""
    budget, source = memory_budget_per_rank(dist_info)
    if dist_info.world_size == 1 or not torch.distributed.is_initialized():
        return budget, source
    least = torch.tensor([UNKNOWN if budget is None else budget], dtype=torch.int64, device=dist_info.device)
    torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
    value = int(least.item())
    if value == UNKNOWN:
        return None, source
    return value, f"{source}, the least of {dist_info.world_size} ranks"


def check_memory(
    estimate_bytes: float, budget_bytes: Optional[int], source: str, train: TrainConfig, world_size: int
) -> None:
    if budget_bytes is None or estimate_bytes <= budget_bytes:
        return
    hints = []
    if train.zero_stage < 3:
        hints.append(f"a higher train.zero_stage (now {train.zero_stage})")
    if not train.activation_checkpointing:
        hints.append("train.activation_checkpointing=true")
    if train.micro_batch_size > 1:
        hints.append(
            f"a smaller train.micro_batch_size (now {train.micro_batch_size}) with more train.grad_accum_steps"
        )
    hints.append(f"more ranks (now {world_size})")
    raise TrainError(
        f"Preflight: the estimated training memory per rank is {estimate_bytes / GIB:.1f} GiB but only "
        f"{budget_bytes / GIB:.1f} GiB is available ({source}); the run would not fit. Try "
        + ", ".join(hints)
        + "."
    )


def summary_lines(
    plan: RunPlan,
    dist_info: DistInfo,
    train: TrainConfig,
    memory: dict,
    budget_bytes: Optional[int],
    source: str,
) -> List[str]:
    budget = f"{budget_bytes / GIB:.1f} GiB ({source})" if budget_bytes is not None else source
    return [
        f"world size {dist_info.world_size} on {dist_info.n_nodes} node(s), {dist_info.device.type}/{dist_info.backend}, "
        f"ZeRO stage {train.zero_stage}, precision {train.precision}",
        f"global batch {plan.global_batch_size} = micro {plan.micro_batch_size} x accum {plan.grad_accum_steps} x "
        f"world {plan.world_size}; {plan.tokens_per_step:,} tokens per step; {plan.max_steps} steps = "
        f"{plan.tokens_per_step * plan.max_steps:,} tokens",
        f"memory per rank (estimate): model states {memory['model_states'] / GIB:.2f} GiB + activations "
        f"{memory['activations'] / GIB:.2f} GiB = {memory['total'] / GIB:.2f} GiB of {budget}",
    ]


def choose_activation_checkpointing(
    model_cfg, train: TrainConfig, plan: RunPlan, world_size: int, budget_bytes: Optional[int]
) -> bool:
    """train.activation_checkpointing, or for null (auto) on only when the estimate without it exceeds the budget
    (the least over ranks, so every rank decides the same). An unknown budget keeps it off."""
    if train.activation_checkpointing is not None:
        return train.activation_checkpointing
    if budget_bytes is None:
        return False
    without = training_memory_per_rank(
        model_cfg,
        train.zero_stage,
        world_size,
        train.micro_batch_size,
        plan.seq_len,
        activation_checkpointing=False,
    )
    return without["total"] > budget_bytes


def preflight(
    model_cfg,
    train: TrainConfig,
    plan: RunPlan,
    dist_info: DistInfo,
    budget: Optional[tuple[Optional[int], str]] = None,
) -> List[str]:
    """Summary lines for the log; raises TrainError when the estimated memory does not fit `budget` (bytes and
    where they come from: least_budget_over_ranks, else this rank's own)."""
    memory = training_memory_per_rank(
        model_cfg,
        train.zero_stage,
        dist_info.world_size,
        train.micro_batch_size,
        plan.seq_len,
        activation_checkpointing=train.activation_checkpointing,
    )
    budget, source = budget or memory_budget_per_rank(dist_info)
    lines = summary_lines(plan, dist_info, train, memory, budget, source)
    check_memory(memory["total"], budget, source, train, dist_info.world_size)
    return lines
