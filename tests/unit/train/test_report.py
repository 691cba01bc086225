"""`slm report`: summary numbers from a realistic (resumed) metrics.jsonl, a valid PNG, clear errors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from launch.cli import main
from train.errors import TrainError
from train.report import report

TOKENS_PER_STEP = 2048


def train_row(step: int, loss: float, tokens_per_second: float, time: float) -> dict:
    return dict(
        step=step,
        loss=loss,
        lr=3e-3 * min(1.0, step / 20),
        tokens=step * TOKENS_PER_STEP,
        grad_norm=0.8,
        tokens_per_second=tokens_per_second,
        mfu=None,
        step_ms=40.0,
        time=time,
        kind="train",
    )


def eval_row(step: int, val_loss: float, val_bpb: float, time: float) -> dict:
    return dict(
        step=step, val_loss=val_loss, val_ppl=math.exp(val_loss), val_bpb=val_bpb, time=time, kind="eval"
    )


def write_resumed_run(run_dir: Path) -> None:
    """Steps 10..60 logged, a crash after step 60, then a resume from the step-40 checkpoint to step 80.

    Steps 50 and 60 are logged twice; the second (resumed) values must win. The first row of each
    segment (steps 10 and 50 of the resumed run) has start-up throughput and is left out of the mean.
    """
    rows = [
        train_row(10, 6.0, 1000.0, 1),
        train_row(20, 5.0, 5000.0, 2),
        eval_row(20, 5.2, 2.50, 2),
        train_row(30, 4.0, 5200.0, 3),
        train_row(40, 3.5, 5400.0, 4),
        eval_row(40, 3.9, 1.90, 4),
        train_row(50, 3.3, 5600.0, 5),
        train_row(60, 3.2, 5800.0, 6),
        eval_row(60, 3.6, 1.80, 6),
        # resumed from the step-40 checkpoint:
        train_row(50, 3.31, 900.0, 10),
        train_row(60, 3.21, 6000.0, 11),
        eval_row(60, 3.55, 1.75, 11),
        train_row(70, 3.0, 6100.0, 12),
        train_row(80, 2.9, 6200.0, 13),
        eval_row(80, 3.58, 1.74, 13),
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_report_resumed_run_through_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "tiny-run"
    write_resumed_run(run_dir)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    width, height = png_size(run_dir / "report.png")
    assert (width, height) == (1200, 800)
    assert (run_dir / "report.png").stat().st_size > 20_000  # four drawn panels, not a blank canvas
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp file left behind

    lines = {
        line.split("  ")[0].strip(): line.split("  ", 1)[1].strip()
        for line in out.splitlines()
        if "  " in line
    }
    assert lines["steps"] == "80"
    assert lines["tokens seen"] == f"{80 * TOKENS_PER_STEP:,}"
    assert lines["best val loss"] == "3.5500 (step 60)"  # the resumed value of step 60, not 3.6
    assert lines["best val bits/byte"] == "1.7400 (step 80)"
    # Mean over 20, 30, 40, 60 (resumed), 70, 80: steps 10 and the resumed 50 are segment starts.
    assert lines["mean tokens/s"] == f"{(5000 + 5200 + 5400 + 6000 + 6100 + 6200) / 6:,.0f}"
    assert lines["final train loss"] == "2.9000"

    summary = report(run_dir)  # the same numbers, as returned
    assert summary["best_val_loss"] == 3.55 and summary["best_val_loss_step"] == 60
    assert summary["tokens_seen"] == 80 * TOKENS_PER_STEP and summary["final_train_loss"] == 2.9


def test_train_rows_only(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps(train_row(10, 5.0, 100.0, 1)) + "\n")
    summary = report(run_dir)
    assert summary["best_val_loss"] is None and summary["mean_tokens_per_second"] == 100.0  # only row: kept
    assert "best val loss       n/a" in capsys.readouterr().out
    png_size(run_dir / "report.png")


def test_centred_score_and_per_source_validation_lines(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    last_eval = {
        **eval_row(20, 3.5, 1.6, 3),
        "val/books/loss": 3.25,
        "val/books/bpb": 1.5,
        "val/web/loss": 3.75,
    }
    score = {"kind": "downstream_score", "step": 20, "centred_score": 0.0125, "tasks": "piqa,copa"}
    rows = [train_row(10, 5.0, 100.0, 1), eval_row(10, 4.0, 1.9, 2), train_row(20, 4.0, 100.0, 3), last_eval]
    rows += [{**score, "step": 10, "centred_score": -0.02}, score]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = report(run_dir)
    out = capsys.readouterr().out
    assert summary["centred_score"] == {"step": 20, "centred_score": 0.0125, "tasks": "piqa,copa"}
    assert "centred score       +0.0125 over piqa,copa (step 20)" in out
    assert "val books           loss 3.2500, bpb 1.5000 (step 20)" in out
    assert "val web             loss 3.7500 (step 20)" in out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "No metrics file at"),
        ("", "holds no metrics rows"),
        (
            '{"step": 10, "loss": 3.0}\n{"step": 20, "loss": \n{"step": 30, "loss": 2.0}\n',
            "line 2 is not valid JSON",
        ),
        ('{"step": 10, "loss": 3.0}\n[1, 2]\n', "line 2 is not a metrics row"),
    ],
)
def test_bad_metrics_files(tmp_path, capsys, content, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / "metrics.jsonl").write_text(content)
    with pytest.raises(TrainError, match=message) as err:
        report(run_dir)
    assert str(run_dir / "metrics.jsonl") in str(err.value)
    assert not (run_dir / "report.png").exists()
    # Through the CLI: one clear line on stderr, exit code 2, no traceback.
    assert main(["report", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err and "Traceback" not in captured.err
