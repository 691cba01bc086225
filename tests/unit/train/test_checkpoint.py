"""train.checkpoint: which folders count as checkpoints, pruning, meta.json, and the `latest` pointer."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.checkpoint import COMPLETE, find_checkpoint, prune_checkpoints, read_latest
from train.errors import TrainError


def fake_step(ckpt_dir: Path, step: int, complete: bool = True) -> Path:
    folder = ckpt_dir / f"step_{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / COMPLETE).write_text("x")
    return folder


def test_find_checkpoint_ignores_incomplete_and_temporary_folders(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    assert find_checkpoint(run) is None and find_checkpoint(tmp_path / "missing") is None
    fake_step(ckpt, 2)
    newest = fake_step(ckpt, 4)
    fake_step(ckpt, 6, complete=False)
    (ckpt / "tmp.step_00000008").mkdir()
    assert find_checkpoint(run) == newest
    assert find_checkpoint(ckpt) == newest
    assert find_checkpoint(newest) == newest
    assert find_checkpoint(ckpt / "step_00000006") is None
    removed = prune_checkpoints(ckpt, keep=1)
    assert not (ckpt / "step_00000002").exists() and not (ckpt / "tmp.step_00000008").exists()
    assert newest.exists() and len(removed) == 2


def test_latest_is_read_back_and_a_stale_one_is_reported(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints"
    older, newest = fake_step(ckpt, 2), fake_step(ckpt, 4)
    (ckpt / "latest").write_text("step_00000004\n")
    assert read_latest(ckpt) == newest and find_checkpoint(ckpt.parent) == newest
    assert "note" not in capsys.readouterr().err
    # A save killed between its rename and the pointer update: the highest complete step still wins, said aloud.
    (ckpt / "latest").write_text("step_00000002\n")
    assert read_latest(ckpt) == older and find_checkpoint(ckpt.parent) == newest
    assert (
        "names step_00000002 but the newest complete checkpoint is step_00000004" in capsys.readouterr().err
    )
    (ckpt / "latest").write_text("step_00000009\n")  # names no complete folder
    assert read_latest(ckpt) is None


def test_convert_ahead_names_a_path_without_a_checkpoint(tmp_path):
    from train.checkpoint.universal import convert_ahead

    (tmp_path / "checkpoints" / "tmp.step_00000004").mkdir(
        parents=True
    )  # an interrupted save is no checkpoint
    with pytest.raises(TrainError, match=rf"No complete checkpoint at '{tmp_path}'"):
        convert_ahead(str(tmp_path))
