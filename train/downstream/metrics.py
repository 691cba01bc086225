"""acc, acc_norm and LAMBADA's perplexity, defined exactly as lm-evaluation-harness defines them.

- acc: the choice with the highest summed log-likelihood is the gold one (ties: the first, as np.argmax).
- acc_norm: the same after dividing each choice's log-likelihood by its length in characters (the choice
  string without the target delimiter).
- LAMBADA acc: the last word is the greedy continuation (every token the argmax); perplexity exp(-mean ll).
- stderr of a mean: the sample standard deviation (ddof=1) over sqrt(n). The harness bootstraps perplexity's;
  we report none for it.
- centred score (in the spirit of DCLM's CORE; not DCLM's CORE, whose task set differs): each task's
  `Task.centred_metric` rescaled as (acc - chance) / (1 - chance), chance being the mean over the scored
  examples of 1 / their number of choices (0 for LAMBADA's open completion), then averaged over the tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from train.downstream.tasks import LOGLIKELIHOOD, Task


@dataclass(frozen=True)
class ExampleResult:
    """The scores of one example (what ranks exchange; small and picklable)."""

    task: str
    """Task name."""
    index: int
    """Row in the evaluated split."""
    loglikelihoods: List[float]
    """Summed log-likelihood of each choice's continuation."""
    greedy: List[bool]
    """Whether each continuation is the greedy one."""
    choice_lengths: List[int]
    """Characters per choice (acc_norm)."""
    gold: int
    """Index of the right choice."""

    def predicted(self, normalized: bool = False) -> int:
        lls = np.array(self.loglikelihoods)
        if normalized:
            lls = lls / np.array([float(n) for n in self.choice_lengths])
        return int(np.argmax(lls))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and the harness's mean_stderr (None for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def task_metrics(kind: str, results: Sequence[ExampleResult]) -> Dict[str, Optional[float]]:
    """Metric name -> value, with `<name>_stderr` beside each and `examples`, for one task's results."""
    if not results:
        raise ValueError("No examples were scored.")
    out: Dict[str, Optional[float]] = {}
    if kind == LOGLIKELIHOOD:
        lls = [r.loglikelihoods[0] for r in results]
        out["perplexity"], out["perplexity_stderr"] = math.exp(-sum(lls) / len(lls)), None
        out["acc"], out["acc_stderr"] = mean_and_stderr([float(r.greedy[0]) for r in results])
    else:
        out["acc"], out["acc_stderr"] = mean_and_stderr([float(r.predicted() == r.gold) for r in results])
        out["acc_norm"], out["acc_norm_stderr"] = mean_and_stderr(
            [float(r.predicted(normalized=True) == r.gold) for r in results]
        )
    out["examples"] = len(results)
    return out


def chance_level(kind: str, results: Sequence[ExampleResult]) -> float:
    """The accuracy of guessing: the mean of 1 / choices over the examples (0 for an open completion)."""
    if kind == LOGLIKELIHOOD:
        return 0.0
    return sum(1.0 / len(r.loglikelihoods) for r in results) / len(results)


@dataclass(frozen=True)
class TaskCentred:
    """One task's part of the centred score."""

    metric: str
    """The accuracy used (acc_norm where the harness reports it, else acc)."""
    accuracy: float
    """Its value."""
    chance: float
    """The accuracy of guessing on the same examples."""

    @property
    def centred(self) -> float:
        """0 at chance, 1 when every answer is right (negative below chance)."""
        return (self.accuracy - self.chance) / (1.0 - self.chance)


@dataclass(frozen=True)
class CentredScore:
    """The tasks' centred accuracies and their mean."""

    tasks: Dict[str, TaskCentred]
    """Task name -> its centred part, in evaluation order."""

    @property
    def score(self) -> float:
        """The mean of the tasks' centred accuracies."""
        return sum(t.centred for t in self.tasks.values()) / len(self.tasks)


def centred_score(
    tasks: Sequence[Task], results: Sequence[ExampleResult], metrics: Dict[str, Dict[str, Optional[float]]]
) -> CentredScore:
    """The centred score of scored tasks from their metrics (task_metrics) and their examples (for chance)."""
    parts = {}
    for task in tasks:
        accuracy = metrics[task.name][task.centred_metric]
        assert accuracy is not None  # task_metrics always computes acc / acc_norm
        chance = chance_level(task.kind, [r for r in results if r.task == task.name])
        parts[task.name] = TaskCentred(task.centred_metric, accuracy, chance)
    return CentredScore(parts)
