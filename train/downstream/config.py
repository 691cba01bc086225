"""The `eval` section of the root config: the validation cadence (`eval.every`, `eval.batches`) and downstream
evaluation (`eval.downstream`), read by the training loop's evaluators and by `slm eval`'s defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from common.checks import check_positive
from train.downstream.tasks import expand_task_names, get_task


@dataclass(frozen=True)
class DownstreamConfig:
    tasks: List[str] = field(default_factory=list)
    """Task names (hellaswag, arc_easy, arc_challenge, piqa, winogrande, sciq, openbookqa, boolq, copa, commonsense_qa, social_iqa, lambada_openai; core: the centred score's fixed set); empty disables."""
    every: int = 0
    """Evaluate the downstream tasks every this many steps (and at the end); 0 disables."""
    limit: Optional[int] = 500
    """Examples per task: a fixed subset chosen by `seed` (null: the whole split)."""
    seed: int = 1234
    """Seed of the example subset and of the few-shot draws (the same subset at every step and in every run)."""
    shots: int = 0
    """Solved examples before each question (0: zero-shot, as the harness's defaults)."""
    data_dir: Optional[str] = None
    """Local task data laid out <dataset name>/<config or none>/<split>/ (~ expands; null: the Hugging Face hub)."""
    batch_size: int = 32
    """Sequences (context + choice) per forward pass."""

    def validate(self) -> None:
        for name in expand_task_names(self.tasks):
            try:
                get_task(name)
            except ValueError as err:
                raise ValueError(f"eval.downstream.tasks: {err}") from None
        for key in ("every", "shots"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.downstream.{key}={getattr(self, key)} must be >= 0.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(
                f"eval.downstream.limit={self.limit} must be a positive number of examples or null."
            )
        if self.batch_size < 1:
            raise ValueError(f"eval.downstream.batch_size={self.batch_size} must be >= 1.")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 50
    """Evaluate the validation loss every this many steps (and at the end)."""
    batches: int = 8
    """Fixed validation micro-batches per evaluation, over all ranks (the same samples for any world size)."""
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    """Multiple-choice and LAMBADA benchmarks scored like lm-evaluation-harness."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        for key in ("every", "batches"):
            check_positive(f"eval.{key}", getattr(self, key))
        self.downstream.validate()
