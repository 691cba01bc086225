"""The component interface with the real loop: a component defined here (one class and its one config field)
joins a real in-process `slm train` run (DeepSpeed ZeRO 0, fp32, gloo on CPU) without any edit to the loop."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Tuple

import pytest
import torch

from launch.config import load_config
from tests.helpers import TINY
from train.components import END_REASONS, Component, LoopRun, StepEvent, every
from train.standard_components import COMPONENTS, standard_components
from train.trainer import run_training

pytestmark = pytest.mark.slow

STEPS = 6
SHRINK = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.max_seq_len=32",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "train.zero_stage=0",
    "schedule.warmup_steps=2",
    "log.every=1",
    "eval.batches=2",
    f"train.max_steps={STEPS}",
    "eval.every=3",
    "checkpoint.every=3",
    "data.num_workers=0",
]


@dataclass
class GradNormConfig:
    every: int = 2
    """Record the global gradient norm every this many steps."""


class GradNormLogger(Component):
    """The global gradient norm before the optimizer step, every `every` steps."""

    name = "grad_norm_logger"

    def __init__(self, cfg: GradNormConfig) -> None:
        self.every = cfg.every
        self.norms: List[Tuple[int, float]] = []
        self.calls: List[str] = []

    def on_start(self, run: LoopRun) -> None:
        self.calls.append(f"start@{run.progress.step}")

    def before_optimizer_step(self, run: LoopRun, event: StepEvent) -> None:
        assert run.progress.step == event.number - 1  # the step is not counted yet
        if every(self.every, event.number):
            grads = [p.grad for p in run.engine.module.parameters() if p.grad is not None]
            self.norms.append((event.number, float(torch.nn.utils.get_total_norm(grads))))

    def after_step(self, run: LoopRun, event: StepEvent) -> None:
        assert run.progress.step == event.number and event.seconds > 0
        self.calls.append(f"after@{event.number}{'(last)' if event.last else ''}")

    def on_end(self, run: LoopRun, reason: str) -> None:
        assert reason in END_REASONS
        self.calls.append(f"end:{reason}")


@pytest.fixture
def restore_environ():
    """An in-process run sets RANK/WORLD_SIZE/MASTER_* like a launcher would; put the environment back."""
    saved = dict(os.environ)
    yield  # (DeepSpeed keeps process-group state per process: one in-process run per test session)
    os.environ.clear()
    os.environ.update(saved)


def test_a_component_defined_here_runs_at_its_points_without_a_loop_edit(
    tiny_data_dir, tmp_path, restore_environ
):
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, [f"run.dir={run_dir}", f"data.dir={tiny_data_dir}", *SHRINK])
    logger = GradNormLogger(GradNormConfig(every=2))
    assert run_training(cfg, extra_components=[logger]) == 0

    assert logger.calls == [
        "start@0",
        *[f"after@{n}" for n in range(1, STEPS)],
        f"after@{STEPS}(last)",
        "end:finished",
    ]
    assert [n for n, _ in logger.norms] == [2, 4, 6]
    # The norm it saw before the optimizer step is the one the standard train rows report for that step
    # (ZeRO 0 in fp32 computes it the same way, at the same point), so the hook saw the live gradients.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["grad_norm"] for r in rows if r["kind"] == "train"}
    for number, norm in logger.norms:
        assert norm == pytest.approx(logged[number], rel=1e-6) and norm > 0
    # The standard components did their work on their own cadences.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000003",
        "step_00000006",
    ]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]
    assert (run_dir / "DONE").is_file()
    # Train rows say where the run stands: of how many steps, time spent, and none left at the end.
    train = [r for r in rows if r["kind"] == "train"]
    assert {r["max_steps"] for r in train} == {STEPS}
    assert [r["elapsed_s"] for r in train] == sorted(r["elapsed_s"] for r in train) and train[0][
        "elapsed_s"
    ] > 0
    assert train[-1]["eta_s"] == 0 and all(r["eta_s"] > 0 for r in train[1:-1])
    assert "time_left_s" not in train[-1]  # no train.max_time


def test_standard_components_follow_their_config_fields():
    cfg = load_config(TINY, ["export.every=0"])
    assert [c.name for c in standard_components(cfg)] == [
        "train_metrics",
        "evaluator",
        "checkpointer",
        "done_marker",
    ]
    cfg = load_config(
        TINY, ["export.every=5", "eval.every=7", "checkpoint.every=9", "log.every=3", "profile.steps=[2,4]"]
    )
    components = {c.name: c for c in standard_components(cfg)}
    assert list(components) == [
        "train_metrics",
        "evaluator",
        "checkpointer",
        "exporter",
        "done_marker",
        "profiler",
    ]
    assert (components["profiler"].first, components["profiler"].last) == (2, 4)
    assert (
        components["train_metrics"].log_every,
        components["evaluator"].eval_every,
        components["checkpointer"].ckpt_every,
        components["exporter"].export_every,
    ) == (3, 7, 9, 5)
    assert len(COMPONENTS) == 7  # and DownstreamEval (eval.downstream), off here
    assert every(3, 6) and not every(3, 7) and not every(0, 6)
