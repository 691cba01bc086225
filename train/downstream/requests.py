"""Examples -> (context, continuation) pairs, the way lm-evaluation-harness builds its loglikelihood requests.

Zero-shot, the context is the task's `doc_to_text` (for partial scoring, each choice is a context and the
continuation is the rest of the sentence). With k shots, k solved examples from the few-shot split come first,
each `text + target_delimiter + answer + fewshot_delimiter`. They are drawn per example with a Random seeded by
(seed, task, example index), so an example's prompt does not depend on which other examples are scored or on
how they are split across ranks (the harness draws from one stream in document order instead).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from train.downstream.tasks import LOGLIKELIHOOD, PARTIAL, Doc, Task, gold_index


@dataclass(frozen=True)
class ExampleRequests:
    """Everything needed to score one example: one (context, continuation) per choice, and how to judge them."""

    task: str
    """Task name."""
    index: int
    """Row of the example in the evaluated split."""
    pairs: List[Tuple[str, str]]
    """(context, continuation) per choice; exactly one for LOGLIKELIHOOD tasks."""
    choice_lengths: List[int]
    """Characters of each choice string (acc_norm divides the log-likelihood by these)."""
    gold: int
    """Index of the right choice (0 for LOGLIKELIHOOD)."""


def solved_example(task: Task, doc: Doc) -> str:
    """One few-shot demonstration: its prompt, the delimiter and its gold answer."""
    text = task.doc_to_text(doc)
    if task.kind == PARTIAL:
        text, answer = task.doc_to_choice(doc)[int(text)], task.doc_to_target(doc)
    elif task.kind == LOGLIKELIHOOD:
        answer = task.doc_to_target(doc)
    else:
        target = task.doc_to_target(doc)
        answer = task.doc_to_choice(doc)[target] if isinstance(target, int) else target
    return f"{text}{task.target_delimiter}{answer}{task.fewshot_delimiter}"


def fewshot_prefix(
    task: Task, index: int, shots: int, seed: int, fewshot_docs: Optional[Sequence[Doc]], same_split: bool
) -> str:
    """The k demonstrations before example `index` ('' for zero-shot)."""
    if shots == 0:
        return ""
    if not fewshot_docs:
        raise ValueError(
            f"{task.name}: {shots}-shot evaluation needs few-shot examples, but its few-shot split is empty."
        )
    pool = [i for i in range(len(fewshot_docs)) if not (same_split and i == index)]
    if len(pool) < shots:
        raise ValueError(
            f"{task.name}: {shots} shots requested but the few-shot split has only {len(pool)} examples."
        )
    chosen = random.Random(f"{seed}:{task.name}:{index}").sample(pool, shots)
    return "".join(solved_example(task, fewshot_docs[i]) for i in chosen)


def build_requests(task: Task, doc: Doc, index: int, prefix: str = "") -> ExampleRequests:
    """The harness's requests for one (prepared) row, after an optional few-shot prefix."""
    text = task.doc_to_text(doc)
    if task.kind == LOGLIKELIHOOD:
        target = task.doc_to_target(doc)
        return ExampleRequests(task.name, index, [(prefix + text, target)], [len(target)], 0)
    choices = task.doc_to_choice(doc)
    if task.kind == PARTIAL:
        continuation = task.target_delimiter + task.doc_to_target(doc)
        pairs = [(prefix + choice, continuation) for choice in choices]
    else:
        pairs = [(prefix + text, task.target_delimiter + choice) for choice in choices]
    return ExampleRequests(
        task.name, index, pairs, [len(choice) for choice in choices], gold_index(task, doc)
    )
