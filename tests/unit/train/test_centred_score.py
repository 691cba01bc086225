"""The one downstream score: each task's accuracy centred on its chance level, averaged over the tasks."""

from __future__ import annotations

import json

import pytest

from train.downstream.cli import centred_json, format_centred, looks_like_eval_output
from train.downstream.config import DownstreamConfig
from train.downstream.metrics import ExampleResult, centred_score, task_metrics
from train.downstream.tasks import CORE_TASKS, expand_task_names, get_task


def example(task: str, index: int, lls: list, gold: int, lengths: list | None = None) -> ExampleResult:
    return ExampleResult(task, index, lls, [False] * len(lls), lengths or [1] * len(lls), gold)


def test_centred_score_equals_a_hand_computation_with_different_numbers_of_choices():
    results = [
        # arc_easy (metric acc_norm): 3, 4 and 5 choices; lengths make acc and acc_norm differ on the 2nd example
        example("arc_easy", 0, [-1.0, -2.0, -3.0], 0),  # right
        example(
            "arc_easy", 1, [-4.0, -6.0, -9.0, -9.0], 1, [1, 3, 1, 1]
        ),  # acc wrong, acc_norm right (-2 > -4)
        example("arc_easy", 2, [-5.0, -1.0, -5.0, -5.0, -5.0], 0),  # wrong
        # winogrande (metric acc): 2 choices
        example("winogrande", 0, [-1.0, -2.0], 0),
        example("winogrande", 1, [-1.0, -2.0], 1),
        example("winogrande", 2, [-3.0, -2.0], 1),
        example("winogrande", 3, [-3.0, -2.0], 1),
        # LAMBADA (metric acc, open completion: chance 0)
        ExampleResult("lambada_openai", 0, [-2.0], [True], [5], 0),
        ExampleResult("lambada_openai", 1, [-3.0], [False], [5], 0),
    ]
    tasks = [get_task(name) for name in ("arc_easy", "winogrande", "lambada_openai")]
    metrics = {t.name: task_metrics(t.kind, [r for r in results if r.task == t.name]) for t in tasks}
    score = centred_score(tasks, results, metrics)

    arc_chance = (1 / 3 + 1 / 4 + 1 / 5) / 3
    arc = (2 / 3 - arc_chance) / (1 - arc_chance)  # acc_norm: 2 of 3
    wino = (3 / 4 - 1 / 2) / (1 - 1 / 2)  # acc: 3 of 4
    lambada = 1 / 2  # acc 1 of 2, chance 0
    assert metrics["arc_easy"]["acc"] == pytest.approx(1 / 3)  # acc is not what arc_easy's part uses
    assert [t.metric for t in score.tasks.values()] == ["acc_norm", "acc", "acc"]
    assert score.tasks["arc_easy"].chance == pytest.approx(arc_chance)
    assert score.tasks["arc_easy"].centred == pytest.approx(arc)
    assert score.tasks["winogrande"].centred == pytest.approx(wino)
    assert score.tasks["lambada_openai"].centred == pytest.approx(lambada)
    assert score.score == pytest.approx((arc + wino + lambada) / 3)

    line = format_centred(score)  # slm eval's table line and JSON carry the same numbers
    assert line.startswith(f"centred score {score.score:+.4f} = mean of (arc_easy acc_norm 0.6667 vs chance")
    payload = centred_json(score)
    assert payload["score"] == score.score
    assert payload["tasks"]["winogrande"] == {
        "metric": "acc",
        "accuracy": 0.75,
        "chance": 0.5,
        "centred": 0.5,
    }


def test_core_names_the_fixed_task_set(tmp_path):
    assert expand_task_names(["piqa", "core"]) == ["piqa"] + [t for t in CORE_TASKS if t != "piqa"]
    DownstreamConfig(tasks=["core"], every=10).validate()
    with pytest.raises(ValueError, match="eval.downstream.tasks: Unknown downstream task 'cor'"):
        DownstreamConfig(tasks=["cor"]).validate()
    older = tmp_path / "older.json"  # a result written before the score is still recognised as ours
    older.write_text(
        json.dumps(
            dict.fromkeys(["model", "settings", "tasks", "seconds", "examples_per_second", "examples"])
        )
    )
    assert looks_like_eval_output(older)
