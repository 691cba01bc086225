"""`slm eval --output` replaces only an earlier slm eval result outside any run or export, unless --force."""

from __future__ import annotations

import json

import pytest

from launch.cli import main as slm_main
from train.checkpoint.layout import COMPLETE
from train.downstream.cli import EVAL_OUTPUT_KEYS, check_output
from train.errors import TrainError


def test_output_refuses_what_eval_did_not_write(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    with pytest.raises(TrainError, match="is not an earlier slm eval result; refusing to overwrite"):
        check_output(str(notes), force=False)
    check_output(str(notes), force=True)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({key: None for key in EVAL_OUTPUT_KEYS}))
    check_output(str(earlier), force=False)  # our own result may be replaced
    check_output(str(tmp_path / "new.json"), force=False)


def test_output_never_replaces_a_file_inside_a_run_or_an_export(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"kind": "train"}\n')
    for victim in (run_dir / "metrics.jsonl", run_dir / "checkpoints" / "step_00000010" / "x.json"):
        victim.write_text(json.dumps({key: None for key in EVAL_OUTPUT_KEYS}))
        with pytest.raises(TrainError, match=f"inside {run_dir} \\(a run or an export\\)"):
            check_output(str(victim), force=False)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    with pytest.raises(TrainError, match="a run or an export"):
        check_output(str(export / "config.json"), force=False)
    check_output(str(run_dir / "eval.json"), force=False)  # a new file beside them is fine
    step = tmp_path / "copied_step"
    step.mkdir()
    (step / COMPLETE).write_text("")
    (step / "notes.json").write_text(json.dumps({key: None for key in EVAL_OUTPUT_KEYS}))
    with pytest.raises(TrainError, match="a run or an export"):  # a checkpoint outside any run dir
        check_output(str(step / "notes.json"), force=False)


def test_output_naming_a_folder_or_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(TrainError, match="is a directory"):
        check_output(str(tmp_path), force=False)
    with pytest.raises(TrainError, match="does not exist; create it first"):
        check_output(str(tmp_path / "no" / "x.json"), force=False)
    # The command line refuses before loading any model.
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert (
        slm_main(["eval", str(tmp_path), "--tasks", "piqa", "--output", str(tmp_path / "metrics.jsonl")]) == 2
    )
    assert "a run or an export" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
