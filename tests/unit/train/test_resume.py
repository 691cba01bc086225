"""train.resume: refusal of a checkpoint that does not fit (with its meta.json), the checkpoint.resume setting, and (with train.metrics) the metrics rewind on resume."""

from __future__ import annotations

import json

import pytest

from launch.config import ConfigError, load_config, to_dict
from tests.helpers import TINY
from tests.unit.train.test_checkpoint import fake_step
from train.checkpoint import (
    COMPLETE,
    META,
    CheckpointRecord,
    check_resumable,
    checkpoints_location,
    load_mode,
    read_record,
    resolve_resume,
)
from train.checkpoint.resume import differences
from train.errors import TrainError
from train.metrics import rewind_metrics, set_aside_history
from train.plan import effective_config


def record_of(meta):
    """The typed record of a meta.json dict (step and tokens seen filled in when a test leaves them out)."""
    return CheckpointRecord.from_meta({"step": 4, "tokens_seen": 10, **meta})


def test_resume_setting_and_metrics_rewind(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume("auto", run) is None and resolve_resume("false", run) is None
    newest = fake_step(run / "checkpoints", 3)
    assert (
        resolve_resume("auto", run) == newest
        and resolve_resume(str(newest), tmp_path / "elsewhere") == newest
    )
    with pytest.raises(TrainError, match="checkpoint.resume is false"):
        resolve_resume("False", run)
    with pytest.raises(TrainError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "nothing"), run)
    rows = [{"step": s, "loss": 1.0} for s in range(1, 6)] + [{"step": 4, "val_loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    rewind_metrics(run, 3)
    kept = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3]


def test_resuming_an_older_step_never_overwrites_newer_ones(tmp_path):
    run = tmp_path / "run"
    older = fake_step(run / "checkpoints", 2)
    newest = fake_step(run / "checkpoints", 4)
    with pytest.raises(
        TrainError, match="holds newer complete checkpoints \\(step_00000004\\) that this run would"
    ):
        resolve_resume(str(older), run)
    assert resolve_resume(str(older), tmp_path / "another_run") == older  # into another run.dir: fine
    assert resolve_resume(str(newest), run) == newest
    (newest / COMPLETE).unlink()  # an incomplete newer folder is no checkpoint: nothing to protect
    assert resolve_resume(str(older), run) == older


def test_a_fresh_start_sets_an_earlier_runs_records_aside(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 4))
    (run / "metrics.jsonl").write_text(rows)
    (run / "config.yaml").write_text("old: config\n")
    kept = set_aside_history(run)
    assert kept.parent == run / "history" and (kept / "metrics.jsonl").read_text() == rows
    assert (kept / "config.yaml").read_text() == "old: config\n" and not (run / "metrics.jsonl").exists()
    assert set_aside_history(run) is None  # nothing left to keep
    (run / "metrics.jsonl").write_text("")
    assert set_aside_history(run) is None and (run / "metrics.jsonl").exists()  # an empty file is no history


def test_meta_and_compatibility_report_what_differs(tmp_path):
    cfg = to_dict(load_config(TINY, []))
    meta = {
        "step": 4,
        "tokens_seen": 10,
        "config": cfg,
        "tokenizer_sha256": "a" * 64,
        "manifest_sha256": "b" * 64,
        "world_size": 2,
        "zero_stage": 2,
    }
    folder = fake_step(tmp_path / "checkpoints", 4)
    with pytest.raises(TrainError, match="no meta.json"):
        read_record(folder)
    (folder / META).write_text(json.dumps(meta))
    record = read_record(folder)
    assert record.step == 4
    assert differences(record, cfg, "a" * 64, "b" * 64, world_size=2) == []
    other = json.loads(json.dumps(cfg))
    other["model"]["d_model"] = 256
    other["train"]["precision"] = "fp32"
    found = differences(record, other, "c" * 64, "d" * 64, world_size=2)
    assert any("model.d_model is 128 in the checkpoint but 256" in f for f in found)
    assert any("tokenizer differs" in f for f in found) and any("manifest differs" in f for f in found)
    assert any("train.precision" in f for f in found)
    with pytest.raises(TrainError) as err:
        check_resumable(folder, record, other, "c" * 64, "d" * 64, 2)
    assert str(err.value).startswith(f"Refusing to resume from checkpoint '{folder}'")
    assert (
        load_mode(record, 2, 2) == "plain"
        and load_mode(record, 1, 2) == "universal"
        and load_mode(record, 4, 3) == "universal"
    )
    assert load_mode(CheckpointRecord.from_meta({**meta, "zero_stage": 0}), 1, 0) == "plain"
    assert load_mode(record, 2, 0) == "refuse"
    zero_switch = json.loads(json.dumps(cfg))
    zero_switch["train"]["zero_stage"] = 0
    assert any(
        "DeepSpeed cannot convert" in f for f in differences(record, zero_switch, "a" * 64, "b" * 64, 2)
    )


def test_a_muon_checkpoint_is_not_sent_through_the_universal_converter():
    cfg = to_dict(load_config(TINY, ["optim.name=muon", "optim.grad_clip=0"]))
    meta = {
        "step": 4,
        "tokens_seen": 10,
        "config": cfg,
        "tokenizer_sha256": "a" * 64,
        "manifest_sha256": "b" * 64,
        "world_size": 2,
        "zero_stage": 2,
    }
    record = CheckpointRecord.from_meta(meta)
    assert differences(record, cfg, "a" * 64, "b" * 64, world_size=2) == []  # same layout: a plain load
    found = differences(record, cfg, "a" * 64, "b" * 64, world_size=1)
    assert (
        len(found) == 1
        and "cannot convert Muon's optimizer state" in found[0]
        and "train.stage=cpt" in found[0]
    )


def test_an_optimizer_change_is_a_difference():
    cfg = to_dict(load_config(TINY, []))
    meta = {
        "step": 4,
        "tokens_seen": 10,
        "config": cfg,
        "tokenizer_sha256": "a" * 64,
        "manifest_sha256": "b" * 64,
        "world_size": 2,
        "zero_stage": 2,
    }
    muon = to_dict(load_config(TINY, ["optim.name=muon", "optim.grad_clip=0"]))
    assert differences(record_of(meta), muon, "a" * 64, "b" * 64, world_size=2) == [
        "optim.name is 'adamw' in the checkpoint but 'muon' in this run (their optimizer states differ)"
    ]
    older = json.loads(json.dumps(cfg))
    del older["optim"]["name"]  # a checkpoint written before the optimizer choice existed
    assert differences(record_of({**meta, "config": older}), cfg, "a" * 64, "b" * 64, world_size=2) == []
    # A checkpoint of the old one-section layout (train.optimizer, train.lr, ...) is read through upgrade_config.
    old_layout = json.loads(json.dumps(cfg))
    old_optim = old_layout.pop("optim")
    old_layout["train"].update(
        optimizer=old_optim["name"], lr=old_optim["lr"], grad_clip=old_optim["grad_clip"]
    )
    assert differences(record_of({**meta, "config": old_layout}), cfg, "a" * 64, "b" * 64, world_size=2) == []
    assert differences(record_of({**meta, "config": old_layout}), muon, "a" * 64, "b" * 64, world_size=2) == [
        "optim.name is 'adamw' in the checkpoint but 'muon' in this run (their optimizer states differ)"
    ]
    old_layout["train"]["optimizer"] = "muon"
    assert any(
        "cannot convert Muon's optimizer state" in f
        for f in differences(
            record_of({**meta, "config": old_layout}), muon, "a" * 64, "b" * 64, world_size=1
        )
    )


def test_the_vocab_size_compared_is_the_one_each_run_built_from_its_plan():
    cfg = to_dict(load_config(TINY, []))  # model.vocab_size 4096 as written
    meta = {
        "config": cfg,
        "plan": {"vocab_size": 320},  # the tokenizer gave 320: the checkpoint's model has 320 rows
        "tokenizer_sha256": "a" * 64,
        "manifest_sha256": "b" * 64,
        "world_size": 2,
        "zero_stage": 2,
    }
    here = effective_config(cfg, {"vocab_size": 320})
    assert (
        here["model"]["vocab_size"] == 320 and cfg["model"]["vocab_size"] == 4096
    )  # the config is not rewritten
    assert differences(record_of(meta), here, "a" * 64, "b" * 64, world_size=2) == []
    bigger = effective_config(cfg, {"vocab_size": 384})
    assert differences(record_of(meta), bigger, "a" * 64, "b" * 64, world_size=2) == [
        "model.vocab_size is 320 in the checkpoint but 384 in this run"
    ]


def test_checkpoint_dir_elsewhere_is_where_resume_looks(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "ckpts"
    assert checkpoints_location(None, run) == str(run / "checkpoints")
    assert checkpoints_location("s3://b/ckpt/", run) == "s3://b/ckpt"
    newest = fake_step(elsewhere, 5)
    assert resolve_resume("auto", run) is None  # run.dir/checkpoints is not the folder any more
    assert resolve_resume("auto", run, elsewhere) == newest
    with pytest.raises(TrainError, match="already holds .*ckpts"):
        resolve_resume("false", run, elsewhere)
    with pytest.raises(TrainError, match="holds newer complete checkpoints"):
        resolve_resume(str(fake_step(tmp_path / "old", 2)), run, elsewhere)
    with pytest.raises(ConfigError, match="checkpoint.dir is empty; expected a folder, an fsspec URL"):
        load_config(TINY, ["checkpoint.dir=' '"])
