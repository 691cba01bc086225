"""train.report_card without training: the chain found through train.init_from (a run dir, its checkpoints/, a step
folder, an export inside a run or one whose marker names its source), and a bad config.yaml named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.errors import TrainError
from train.report_card import find_chain, write_report_card


def fake_run(path: Path, stage: str, init_from=None) -> Path:
    """A run dir as far as the report reads it without checkpoints: config.yaml and a metrics row."""
    path.mkdir(parents=True)
    init = f"\n  init_from: {init_from}" if init_from else ""
    (path / "config.yaml").write_text(f"train:\n  stage: {stage}{init}\n")
    row = {"step": 2, "loss": 3.0, "tokens": 64, "time": 1.0, "kind": "train"}
    aggregate = {"step": 2, "kind": "downstream_score", "centred_score": 0.25, "tasks": "arc_easy"}
    (path / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(aggregate) + "\n")
    return path


def test_the_chain_is_found_through_init_from_in_every_form(tmp_path):
    pre = fake_run(tmp_path / "pre", "pretrain")
    export = tmp_path / "export"  # a standalone export: its marker names the checkpoint it came from
    export.mkdir()
    source = pre / "checkpoints" / "step_00000002"
    (export / "slm_export.json").write_text(json.dumps({"provenance": {"source": str(source)}}))
    cpt = fake_run(tmp_path / "cpt", "cpt", init_from=export)
    ift = fake_run(tmp_path / "ift", "ift", init_from=cpt / "checkpoints")
    assert [s.name for s in find_chain([ift])] == ["pre", "cpt", "ift"]
    assert [s.name for s in find_chain([cpt, ift])] == ["pre", "cpt", "ift"]  # each once
    other = fake_run(tmp_path / "other", "ift", init_from=tmp_path / "gone")
    assert [s.name for s in find_chain([other])] == ["other"]  # an ancestor that is gone ends the chain
    card = write_report_card([ift], with_samples=False).read_text()
    assert card.startswith("# Report card: pretrain `pre` -> cpt `cpt` -> ift `ift`")
    assert "Aggregate `centred_score` at step 2: **0.2500**" in card and "No complete checkpoint." in card


def test_a_bad_config_yaml_is_named(tmp_path):
    run = fake_run(tmp_path / "run", "pretrain")
    (run / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(TrainError, match=f"'{run / 'config.yaml'}' is not valid YAML"):
        find_chain([run])
