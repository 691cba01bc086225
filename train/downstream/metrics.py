"""acc, acc_norm and LAMBADA's perplexity, defined exactly as lm-evaluation-harness defines them.

- acc: the choice with the highest summed log-likelihood is the gold one (ties: the first, as np.argmax).
- acc_norm: the same after dividing each choice's log-likelihood by its length in characters (the choice
  string without the target delimiter).
- LAMBADA acc: the last word is the greedy continuation (every token the argmax); perplexity exp(-mean ll).
- stderr of a mean: the sample standard deviation (ddof=1) over sqrt(n). The harness bootstraps perplexity's;
  we report none for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from train.downstream.tasks import LOGLIKELIHOOD


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
