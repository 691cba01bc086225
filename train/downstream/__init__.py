"""Downstream evaluation (HellaSwag, ARC, PIQA, WinoGrande, ... LAMBADA) scored the way lm-evaluation-harness
scores them, on a live module (the training loop) or on any checkpoint or export (`slm eval`)."""

from train.downstream.config import DownstreamConfig, EvalConfig
from train.downstream.evaluate import DownstreamResult, build_task_requests, evaluate_tasks, score_tasks
from train.downstream.tasks import TASKS, get_task

__all__ = [
    "DownstreamConfig",
    "EvalConfig",
    "DownstreamResult",
    "build_task_requests",
    "evaluate_tasks",
    "score_tasks",
    "TASKS",
    "get_task",
]
