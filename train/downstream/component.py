"""The in-loop downstream evaluation: a `train.components.Component` scoring eval.downstream.tasks on the live
module every eval.downstream.every steps and when the loop ends (finished or train.max_time spent).

The requests (prompts, tokens, this rank's share of the fixed example subset) are built once in on_start, so
every evaluation scores the same examples. Scoring is collective: every rank scores its share with
`run.engine.module` (under ZeRO-3 the module's own hooks gather each layer's parameters) and every rank runs
the same number of forward passes. Each task's metrics become one metrics.jsonl row:

    {"kind": "downstream", "step": 100, "tokens": ..., "task": "hellaswag", "acc": ..., "acc_stderr": ...,
     "acc_norm": ..., "acc_norm_stderr": ..., "examples": 500, "chance": 0.25, "centred": 0.02}

and the tasks' centred score one more (`train.downstream.metrics.CentredScore`):

    {"kind": "downstream_score", "step": 100, "tokens": ..., "centred_score": 0.013, "tasks": "hellaswag,..."}
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from train.components import Component, LoopRun, StepEvent, every
from train.config import Config
from train.downstream.config import DownstreamConfig
from train.downstream.evaluate import (
    TaskRequests,
    build_task_requests,
    fit_problem,
    max_over_ranks,
    score_tasks,
)
from train.errors import TrainError

KIND = "downstream"
"""The `kind` of the per-task rows this component logs (read by `slm report` and the model card)."""
SCORE_KIND = "downstream_score"
"""The `kind` of the row holding the centred score over the evaluated tasks."""


class DownstreamEval(Component):
    """eval.downstream: task accuracies on a fixed example subset, every N steps and at the end."""

    name = "downstream"

    def __init__(self, config: DownstreamConfig) -> None:
        self.config = config
        self.requests: List[TaskRequests] = []

    @classmethod
    def from_config(cls, cfg: Config) -> Optional[DownstreamEval]:
        downstream = cfg.eval.downstream
        return cls(downstream) if downstream.tasks and downstream.every > 0 else None

    def on_start(self, run: LoopRun) -> None:
        from data_pipeline.tokenizer import load_tokenizer

        c = self.config
        tokenizer = load_tokenizer(
            Path(run.cfg.data.dir) / "tokenizer.json"
        )  # the tokenizer the run trains with
        error = None
        try:
            self.requests = build_task_requests(
                c.tasks, tokenizer, limit=c.limit, seed=c.seed, shots=c.shots, data_dir=c.data_dir
            )
        except TrainError as err:  # every rank stops, none waits for the failed one in a collective
            error = str(err)
        if max_over_ranks([int(error is not None)], run.dist_info.device)[0]:
            raise TrainError(
                error or "eval.downstream: another rank could not load the task data (see its message)."
            )
        self.check_fits(run)
        total = sum(tr.total for tr in self.requests)
        run.say(f"downstream: {', '.join(c.tasks)} ({total} examples) every {c.every} steps and at the end")

    def check_fits(self, run: LoopRun) -> None:
        """Refuse, before the first step and on every rank, a choice longer than the model's window."""
        max_len = run.cfg.model.max_seq_len
        problems = [fit_problem(tr, max_len) for tr in self.requests]
        flags = max_over_ranks([int(p is not None) for p in problems], run.dist_info.device)
        for tr, problem, flag in zip(self.requests, problems, flags):
            if flag:
                elsewhere = (
                    f"{tr.task.name}: a choice is longer than the model.max_seq_len={max_len} window "
                    "(on another rank; see its message)."
                )
                raise TrainError(f"eval.downstream.tasks: {problem or elsewhere}")

    def after_step(self, run: LoopRun, event: StepEvent) -> None:
        due = event.finished or event.timed_out or every(self.config.every, event.number)
        if not due or event.stop_requested:  # a signal leaves little time: save, skip the evaluation
            return
        result = score_tasks(
            run.engine.module, self.requests, batch_size=self.config.batch_size, device=run.dist_info.device
        )
        where = {"step": run.progress.step, "tokens": run.progress.tokens_seen}
        for tr in self.requests:
            part = result.centred.tasks[tr.task.name]
            run.logger.log(
                {
                    "kind": KIND,
                    **where,
                    "task": tr.task.name,
                    **result.metrics[tr.task.name],
                    "chance": part.chance,
                    "centred": part.centred,
                }
            )
        tasks = ",".join(tr.task.name for tr in self.requests)
        run.logger.log({"kind": SCORE_KIND, **where, "centred_score": result.centred.score, "tasks": tasks})
        run.say(
            f"downstream at step {run.progress.step}: {result.seconds:.1f} s, "
            f"{result.examples_per_second:.1f} examples/s"
        )
