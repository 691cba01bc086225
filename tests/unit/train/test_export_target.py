"""`slm export` replaces only its own previous export (with --force); run dirs, checkpoints and SRC are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.atomic import replace_dir
from train.errors import TrainError
from train.handoff.export_target import check_export_target, write_marker


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("x")
    (step / "meta.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    (run / "config.yaml").write_text("")
    return run


@pytest.mark.parametrize(
    "out, match",
    [
        ("run", "is or holds the source"),
        ("run/checkpoints", "inside the source"),
        ("run/checkpoints/step_00000004", "inside the source"),
        ("run/checkpoints/step_00000004/hf", "inside the source"),
        ("run/somewhere", "inside the source"),
    ],
)
def test_export_into_its_own_run_or_checkpoint_is_refused(tmp_path, run_dir, out, match):
    with pytest.raises(TrainError, match=match):
        check_export_target(tmp_path / out, run_dir)


def test_export_into_the_folder_holding_a_checkpoint_source_is_refused(run_dir):
    step = run_dir / "checkpoints" / "step_00000004"
    for out in (run_dir, run_dir / "checkpoints", step):
        with pytest.raises(TrainError, match="is or holds the source"):
            check_export_target(out, step)


def test_export_into_another_run_or_checkpoint_is_refused(tmp_path, run_dir):
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    with pytest.raises(TrainError, match="inside the run dir"):
        check_export_target(other, run_dir)
    for out in (run_dir, run_dir / "notes", run_dir / "exports"):
        with pytest.raises(TrainError, match="inside the run dir"):
            check_export_target(out, tmp_path / "an_export")
    check_export_target(run_dir / "exports" / "mine", tmp_path / "an_export")
    with pytest.raises(TrainError, match="inside the checkpoint"):
        check_export_target(run_dir / "checkpoints" / "step_00000004" / "x", tmp_path / "elsewhere")


def test_user_folder_is_never_replaced_even_with_force(tmp_path, run_dir):
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(TrainError, match="not an slm export .*notes.txt"):
            check_export_target(user, run_dir, force=force)
    (user / "notes.txt").unlink()
    with pytest.raises(TrainError, match="sub-folders"):  # an empty sub-folder is still someone's
        check_export_target(user, run_dir, force=True)
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(TrainError, match="not a folder"):
        check_export_target(target, run_dir, force=True)


def test_previous_export_is_replaced_only_with_force_and_only_if_untouched(tmp_path, run_dir):
    check_export_target(tmp_path / "new", run_dir)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", run_dir)  # empty: fine
    check_export_target(run_dir / "exports" / "step_00000004", run_dir)  # the trainer's own place
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    write_marker(export, {"step": 4})
    with pytest.raises(TrainError, match="pass --force"):
        check_export_target(export, run_dir)
    check_export_target(export, run_dir, force=True)
    (export / "README.md").write_text("my notes")
    with pytest.raises(TrainError, match="README.md, which the export did not write"):
        check_export_target(export, run_dir, force=True)


def test_a_link_the_user_added_to_an_export_keeps_it(tmp_path, run_dir):
    """A link inside an export (to a folder or a file) is a file the export did not write: --force refuses."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    write_marker(export, {"step": 4})
    data = tmp_path / "my_data"
    data.mkdir()
    (export / "data").symlink_to(data)
    with pytest.raises(TrainError, match="also holds data, which the export did not write"):
        check_export_target(export, run_dir, force=True)
    (export / "data").unlink()
    (export / "notes").symlink_to(tmp_path / "nowhere")  # a dangling link too
    with pytest.raises(TrainError, match="also holds notes"):
        check_export_target(export, run_dir, force=True)


def test_replacing_a_folder_never_removes_a_folder_named_like_its_aside_copy(tmp_path):
    """replace_dir moves the old folder aside into a name it created itself: a user's `.OUT.old` survives."""
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "old.txt").write_text("old")
    users = tmp_path / ".OUT.old"
    users.mkdir()
    (users / "mine.txt").write_text("keep me")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "new.txt").write_text("new")
    replace_dir(finished, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert (users / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".OUT.old", "OUT"], "nothing left behind"


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/model.safetensors", "sub/x.safetensors", "w.bin"]
)
def test_a_weight_index_never_points_outside_its_export(tmp_path, name):
    import json

    from train.handoff.hf_format import safetensors_files

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(TrainError, match=f"names the weight file '{re.escape(name)}'; expected a"):
        safetensors_files(export)
    (export / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-1.safetensors"}})
    )
    assert safetensors_files(export) == [export / "model-1.safetensors"]
