"""Downstream evaluation of a live module: build the requests once, score them at any step, on any world size.

    requests = build_task_requests(["hellaswag", "piqa"], tokenizer, limit=500, seed=1234)   # once
    metrics = score_tasks(model, requests, device=device)                                    # every eval step

or both at once with `evaluate_tasks`. Each rank scores every world_size-th example of the fixed subset; the
per-example scores are gathered and every rank computes the metrics from all of them in example order, so a
score is the same for any number of processes. Ranks run equally many forward passes (ZeRO-3 gathers
parameters inside each one). The module is put in eval mode and given back in the mode it was in.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as torch_dist
from tokenizers import Tokenizer

from common.log import say
from data_pipeline.tokenizer import EOT
from train.downstream.data import TaskData, load_task_split
from train.downstream.metrics import CentredScore, ExampleResult, centred_score, task_metrics
from train.downstream.requests import ExampleRequests, build_requests, fewshot_prefix, solved_example
from train.downstream.scoring import Pair, count_forwards, encode_pairs, score_groups
from train.downstream.tasks import LOGLIKELIHOOD, Doc, Task, expand_task_names, get_task, prepare_doc
from train.errors import TrainError

Metrics = Dict[str, Dict[str, Optional[float]]]
"""Task name -> metric name -> value (acc, acc_norm, their _stderr, examples; perplexity for LAMBADA)."""


@dataclass
class TaskRequests:
    """One task's selected examples, their requests, and this rank's share tokenized."""

    task: Task
    """The task."""
    split: str
    """The split the examples come from."""
    source: str
    """Where its data was read."""
    total: int
    """Examples selected over all ranks."""
    requests: List[ExampleRequests]
    """This rank's examples."""
    tokens: List[List[Pair]]
    """Token ids of each of this rank's examples' pairs."""


@dataclass
class DownstreamResult:
    """What one evaluation produced, identical on every rank."""

    metrics: Metrics
    """Task name -> metric name -> value."""
    examples: List[ExampleResult]
    """Every example's scores, in (task, index) order."""
    seconds: float
    """Wall time of the scoring (this rank)."""
    centred: CentredScore
    """Each task's accuracy rescaled so chance is 0 and perfect is 1, and their mean (the one score)."""

    @property
    def examples_per_second(self) -> float:
        return len(self.examples) / self.seconds if self.seconds > 0 else float("inf")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def select_examples(n_docs: int, limit: Optional[int], seed: Optional[int], task: str) -> List[int]:
    """Row indices to evaluate: all, the first `limit` (seed None, like the harness's --limit), or a fixed
    random subset of `limit` drawn with (seed, task), in row order."""
    if limit is None or limit >= n_docs:
        return list(range(n_docs))
    if seed is None:
        return list(range(limit))
    return sorted(random.Random(f"{seed}:{task}").sample(range(n_docs), limit))


def fewshot_data(task: Task, eval_data: TaskData, data_dir: Optional[str], quiet: bool) -> TaskData:
    """The task's few-shot split; without one locally, the evaluated split itself (each example never its own
    demonstration), as the harness falls back to its validation docs."""
    if task.fewshot_split == eval_data.split:
        return eval_data
    try:
        return load_task_split(task, data_dir, task.fewshot_split, quiet=quiet)
    except TrainError:
        if data_dir is None:
            raise
        if not quiet:
            say(
                f"note: {task.name}: no '{task.fewshot_split}' split under {data_dir}; drawing few-shot examples "
                f"from '{eval_data.split}' (never an example's own row)"
            )
        return eval_data


def build_task_requests(
    task_names: Sequence[str],
    tokenizer: Tokenizer,
    limit: Optional[int] = None,
    seed: Optional[int] = None,
    shots: int = 0,
    data_dir: Optional[str] = None,
) -> List[TaskRequests]:
    """Load each task's split, choose its examples and make this rank's requests (done once, before training)."""
    rank, world_size = world()
    prefix_id = tokenizer.token_to_id(EOT)
    out = []
    for name in expand_task_names(task_names):
        try:
            task = get_task(name)
        except ValueError as err:
            raise TrainError(str(err)) from None
        data = load_task_split(task, data_dir, quiet=rank != 0)
        fewshot_docs, same_split = None, False
        if shots:
            if task.fewshot_split is None:
                raise TrainError(
                    f"{task.name} has no few-shot split (the harness evaluates it zero-shot); use shots=0."
                )
            shot_data = fewshot_data(task, data, data_dir, quiet=rank != 0)
            fewshot_docs = [
                checked_row(task, shot_data, i, demonstration) for i in range(len(shot_data.docs))
            ]
            same_split = shot_data is data
            pool = len(fewshot_docs) - (1 if same_split else 0)
            if pool < shots:
                raise TrainError(
                    f"--shots / shots is {shots} but {task.name}'s few-shot examples ({shot_data.source}, split "
                    f"'{shot_data.split}') number only {max(pool, 0)}; expected shots <= {max(pool, 0)}."
                )
        chosen = select_examples(len(data.docs), limit, seed, task.name)
        requests = [
            example_requests(task, data, index, shots, seed or 0, fewshot_docs, same_split)
            for index in chosen[rank::world_size]
        ]
        tokens = group_like(
            encode_pairs(tokenizer, [pair for r in requests for pair in r.pairs], prefix_id), requests
        )
        out.append(TaskRequests(task, data.split, data.source, len(chosen), requests, tokens))
    return out


def checked_row(task: Task, data: TaskData, index: int, build: Callable[[Task, Doc], Any]) -> Any:
    """`build(task, row)` for one row, with a row that lacks a field, has one of the wrong type or a gold label
    outside its choices refused naming the file and row (never scored, never a traceback)."""
    where = f"{task.name} data {data.source} (split '{data.split}'), row {index + 1}"
    try:
        out = build(task, data.docs[index])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, SyntaxError, RecursionError) as err:
        detail = f"{type(err).__name__}: {err}"
        row = data.docs[index]
        empty = [key for key, value in row.items() if value is None] if isinstance(row, dict) else []
        if empty:
            detail = f"no value in field(s) {', '.join(empty)}; {detail}"
        raise TrainError(
            f"{where} does not fit the {task.name} schema ({detail}); expected the fields of {task.dataset_path} "
            f"with their types (docs/evaluation.md)."
        ) from None
    if isinstance(out, ExampleRequests) and task.kind != LOGLIKELIHOOD and not 0 <= out.gold < len(out.pairs):
        raise TrainError(
            f"{where}: its gold label is {out.gold}, outside its {len(out.pairs)} choices; expected an index in "
            f"[0, {len(out.pairs)}). Fix or remove the row."
        )
    return out


def demonstration(task: Task, doc: Doc) -> Doc:
    """A few-shot row prepared for use, checked like an evaluated row (its gold answer among its choices)."""
    prepared = prepare_doc(task, doc)
    request = build_requests(task, prepared, 0)
    if task.kind != LOGLIKELIHOOD and not 0 <= request.gold < len(request.pairs):
        raise ValueError(f"its gold label {request.gold} is outside its {len(request.pairs)} choices")
    solved_example(task, prepared)
    return prepared


def example_requests(
    task: Task,
    data: TaskData,
    index: int,
    shots: int = 0,
    seed: int = 0,
    fewshot_docs: Optional[Sequence[Doc]] = None,
    same_split: bool = False,
) -> ExampleRequests:
    """The requests of row `index` of `data` (a row that does not fit the task is refused by checked_row)."""

    def build(task: Task, doc: Doc) -> ExampleRequests:
        prefix = fewshot_prefix(task, index, shots, seed, fewshot_docs, same_split)
        return build_requests(task, prepare_doc(task, doc), index, prefix)

    return checked_row(task, data, index, build)


def group_like(flat: List[Pair], requests: Sequence[ExampleRequests]) -> List[List[Pair]]:
    """Split a flat list of encoded pairs back into one list per example."""
    out, start = [], 0
    for r in requests:
        out.append(flat[start : start + len(r.pairs)])
        start += len(r.pairs)
    return out


def gather_results(results: List[ExampleResult]) -> List[ExampleResult]:
    """Every rank's results on every rank (in (task, index) order)."""
    _, world_size = world()
    if world_size > 1:
        boxes: List[List[ExampleResult]] = [[] for _ in range(world_size)]
        torch_dist.all_gather_object(boxes, results)
        results = [r for box in boxes for r in box]
    return sorted(results, key=lambda r: (r.task, r.index))


def max_over_ranks(values: List[int], device: torch.device) -> List[int]:
    """Element-wise maximum over all ranks."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.long, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def fit_problem(tr: TaskRequests, max_len: int) -> Optional[str]:
    """Why this rank's examples cannot be scored: a continuation longer than the window (the harness refuses too)."""
    for req, pairs in zip(tr.requests, tr.tokens):
        longest = max(len(continuation) for _, continuation in pairs)
        if longest > max_len:
            return (
                f"{tr.task.name}: row {req.index} of its {tr.split} split has a {longest}-token choice, longer "
                f"than the model's {max_len}-token window; evaluate a model with a longer max_seq_len or leave "
                "this task out."
            )
    return None


def score_tasks(
    model: torch.nn.Module,
    task_requests: Sequence[TaskRequests],
    batch_size: int = 32,
    device: Optional[torch.device] = None,
    max_len: Optional[int] = None,
) -> DownstreamResult:
    """Scores of `model` now; every rank of the process group must call it (the result is the same on all).

    `max_len` (the model's window) defaults to the module's cfg.max_seq_len.
    """
    device = device or next(model.parameters()).device
    max_len = max_len or model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        results = []
        for tr in task_requests:
            problem = fit_problem(tr, max_len)
            min_forwards, any_problem = max_over_ranks(
                [count_forwards(tr.tokens, batch_size, max_len), int(problem is not None)], device
            )
            if any_problem:  # every rank stops, none is left waiting in a collective
                raise TrainError(
                    problem
                    or f"{tr.task.name}: a choice is longer than the model's {max_len}-token "
                    "window (on another rank; see its message)."
                )
            scores = score_groups(model, tr.tokens, batch_size, max_len, device, min_forwards)
            for req, example_scores in zip(tr.requests, scores):
                results.append(
                    ExampleResult(
                        req.task,
                        req.index,
                        [s[0] for s in example_scores],
                        [s[1] for s in example_scores],
                        req.choice_lengths,
                        req.gold,
                    )
                )
        results = gather_results(results)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    metrics = {
        tr.task.name: task_metrics(tr.task.kind, [r for r in results if r.task == tr.task.name])
        for tr in task_requests
    }
    centred = centred_score([tr.task for tr in task_requests], results, metrics)
    return DownstreamResult(metrics, results, seconds, centred)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    limit: Optional[int] = None,
    seed: Optional[int] = None,
    device: Optional[torch.device] = None,
    shots: int = 0,
    batch_size: int = 32,
    data_dir: Optional[str] = None,
) -> Metrics:
    """build_task_requests then score_tasks: the metrics of `model` on `tasks` (split over torch.distributed's ranks)."""
    requests = build_task_requests(tasks, tokenizer, limit=limit, seed=seed, shots=shots, data_dir=data_dir)
    return score_tasks(model, requests, batch_size=batch_size, device=device).metrics
