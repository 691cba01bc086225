"""MetricsLogger: metrics.jsonl rows (rank 0 only, appended on resume, torn lines repaired), the console
line, and a real offline wandb run whose history we read back from its .wandb file."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from launch.config import Config
from train.config import LogConfig, RunConfig, WandbConfig
from train.metrics import MetricsLogger, format_duration, format_row


def make_cfg(run_dir: Path, wandb_mode: str = "disabled", console: bool = True) -> Config:
    return Config(
        run=RunConfig(dir=str(run_dir)),
        log=LogConfig(
            console=console,
            wandb=WandbConfig(mode=wandb_mode, project="slm-forge-tests", tags=["test", "tiny"]),
        ),
    )


TRAIN_ROW = dict(
    step=10,
    loss=torch.tensor(2.5),
    lr=3e-4,
    tokens=20480,
    grad_norm=0.75,
    tokens_per_second=12345.0,
    mfu=0.412,
    step_ms=83.2,
    data_wait=0.034,
)
EVAL_ROW = dict(step=10, val_loss=2.25, val_ppl=math.exp(2.25), val_bpb=1.3)


def read_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_console_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    console = io.StringIO()
    logger = MetricsLogger(run_dir, make_cfg(run_dir), rank=0, stream=console)
    logger.log(TRAIN_ROW)
    logger.log(EVAL_ROW)
    # Flushed row by row: readable while the logger is still open (a crash would lose nothing).
    rows = read_rows(run_dir / "metrics.jsonl")
    assert len(rows) == 2
    train, evals = rows
    assert train["kind"] == "train" and evals["kind"] == "eval"
    assert train["loss"] == 2.5 and isinstance(train["loss"], float)  # tensor unwrapped
    assert {"step", "loss", "lr", "tokens", "time"} <= train.keys()
    assert {"step", "val_loss", "val_ppl", "val_bpb", "time"} <= evals.keys()
    assert abs(train["time"] - evals["time"]) < 60 and train["time"] > 1.7e9
    logger.log(dict(step=20, loss=float("nan"), lr=2e-4, tokens=40960, kind="train"))
    logger.close()
    lines = console.getvalue().splitlines()
    assert lines[0] == (
        "train step 10 | loss 2.5000 | lr 3.00e-04 | gnorm 0.7500 | tok/s 12.35k | tokens 20.48k"
        " | mfu 41.2% | step_ms 83 | data 3.4%"
    )
    assert lines[1] == "eval step 10 | val_loss 2.2500 | val_ppl 9.4877 | val_bpb 1.3000"
    assert lines[2] == "train step 20 | loss nan | lr 2.00e-04 | tokens 40.96k"

    # A crash mid-write leaves a torn last line; the resumed logger drops it and appends after the good rows.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "lo')
    resumed = MetricsLogger(run_dir, make_cfg(run_dir, console=False), rank=0, stream=console)
    resumed.log(dict(step=20, loss=2.4, lr=2e-4, tokens=40960))
    resumed.close()
    rows = read_rows(run_dir / "metrics.jsonl")  # strict JSON per line (NaN written as null)
    assert [r["step"] for r in rows] == [10, 10, 20, 20]
    assert rows[2]["loss"] is None and rows[3]["loss"] == 2.4
    assert len(console.getvalue().splitlines()) == 3  # log.console=false prints nothing


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, make_cfg(run_dir, wandb_mode="offline"), rank=1)
    logger.log(TRAIN_ROW)
    logger.close()
    assert not run_dir.exists()


def test_format_row_shows_only_present_keys_and_extras():
    assert format_row(dict(step=5, loss=3.0)) == "train step 5 | loss 3.0000"
    assert (
        format_row(dict(step=5, loss=3.0, skipped_steps=2, kind="train"))
        == "train step 5 | loss 3.0000 | skipped_steps 2"
    )
    assert (
        format_row(dict(step=7, tokens=3_200_000_000, tokens_per_second=950.0))
        == "train step 7 | tok/s 950 | tokens 3.20B"
    )


def test_train_rows_say_step_of_max_steps_elapsed_and_eta():
    row = dict(step=150, loss=3.0, max_steps=600, elapsed_s=125.4, eta_s=3 * 3600 + 7 * 60 + 5)
    assert format_row(row) == "train step 150 of 600 (25.0%) | loss 3.0000 | elapsed 2m05s | eta 3h07m"
    budget = dict(step=7, max_steps=10**9, elapsed_s=59.6, eta_s=90_000, time_left_s=90_000)
    assert (
        format_row(budget)
        == "train step 7 of 1000000000 (0.0%) | elapsed 1m00s | eta 1d01h | time left 1d01h"
    )
    assert [format_duration(s) for s in (0, 42.4, 3600, 86399.6)] == ["0s", "42s", "1h00m", "1d00h"]


def test_progress_fields_of_a_time_budget_run():
    """ETA from this invocation's pace (steps since it started), capped by what train.max_time leaves."""
    import time

    from launch.config import load_config
    from tests.helpers import TINY
    from train.checkpoint import Progress
    from train.components import LoopRun
    from train.plan import plan_run
    from train.standard_components import TrainMetrics

    def fields(overrides: list, resumed_at: int, step: int, seconds_in: float) -> dict:
        cfg = load_config(TINY, ["train.max_steps=100", *overrides])
        now = time.time()
        run = LoopRun(
            cfg, None, plan_run(cfg, 1), None, Progress(step=step), None, None, [], None, now - seconds_in
        )
        metrics = TrainMetrics(1)
        metrics.pace_since = (now - seconds_in, resumed_at)
        return metrics.progress_fields(run, step)

    steps = fields([], resumed_at=40, step=50, seconds_in=20.0)  # 10 steps in 20 s: 50 steps left take 100 s
    assert steps["max_steps"] == 100 and steps["eta_s"] == pytest.approx(100, rel=0.01)
    assert steps["elapsed_s"] == pytest.approx(20, abs=1) and "time_left_s" not in steps
    budget = fields(["train.max_time=50"], resumed_at=40, step=50, seconds_in=20.0)
    assert budget["time_left_s"] == pytest.approx(30, abs=1) and budget["eta_s"] == budget["time_left_s"]


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte ':W&B' header, then LevelDB-log framed records
    (32 KiB blocks; each record a 7-byte header of crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, parts, pos, block = [], [], 7, 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts.append(payload)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def items(update) -> dict:
    """A history row or config update as a dict (newer wandb puts the key in nested_key)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def offline_history(run_folder: Path) -> list:
    (wandb_file,) = run_folder.glob("run-*.wandb")
    return [
        items(r.history.item) for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_run_and_resume(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "pretrain-tiny"
    cfg = make_cfg(run_dir, wandb_mode="offline", console=False)
    with MetricsLogger(run_dir, cfg, rank=0) as logger:
        logger.log(TRAIN_ROW)
        logger.log(EVAL_ROW)
        logger.log(dict(TRAIN_ROW, step=20, loss=2.0))
    wandb.teardown()  # wandb-core writes the .wandb file in its own process: wait until it has closed it
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}*")
    history = offline_history(folder)
    assert [h["_step"] for h in history] == [10, 20]  # the train and eval rows of step 10 merge into one
    assert (
        history[0]["loss"] == 2.5
        and history[0]["val_bpb"] == 1.3
        and history[0]["mfu"] == pytest.approx(0.412)
    )
    assert history[1]["loss"] == 2.0
    run_records = [
        r.run for r in wandb_records(next(folder.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"
    ]
    assert run_records[0].display_name == "pretrain-tiny"  # default name: the run dir's basename
    assert list(run_records[0].tags) == ["test", "tiny"] and run_records[0].project == "slm-forge-tests"
    config = items(run_records[0].config.update)
    assert config["optim"]["lr"] == cfg.optim.lr and config["log"]["wandb"]["mode"] == "offline"

    # A resumed run continues the same wandb run id (a second offline folder with the same id, synced into one).
    with MetricsLogger(run_dir, cfg, rank=0) as logger:
        logger.log(dict(TRAIN_ROW, step=30, loss=1.5))
    wandb.teardown()
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f"-{run_id}" in f.name for f in folders)  # "-1" added within one second
    resumed = next(f for f in folders if f != folder)
    assert [h["loss"] for h in offline_history(resumed)] == [1.5]
    assert [r["step"] for r in read_rows(run_dir / "metrics.jsonl")] == [10, 10, 20, 30]
