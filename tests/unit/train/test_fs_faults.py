"""Filesystem faults (issue 21), each a one-paragraph error naming the path, never a traceback: a disk that fills
during a checkpoint save (the previous checkpoint stays the resume point), read-only run/data/export folders, a
file where a folder belongs, a symlink loop, `slm export RUN .`. Mounts come from tests/fs_faults.py (skipped
where mounting is refused)."""

from __future__ import annotations

import errno
import os

import pytest

from common.os_errors import describe_os_error, disk_is_full
from tests.fs_faults import read_only, small_disk
from tests.helpers import SHAKESPEARE, TINY, run, slm_cmd, slm_in_process
from tests.runs import SHRINK
from train.checkpoint import read_record
from train.checkpoint.files import verify_checkpoint


def cli_error(capsys, argv) -> str:
    """Run `slm ARGV` in this process (slm_in_process); it must fail with code 2 and one `error:` paragraph."""
    code, _, err = slm_in_process(capsys, *argv)
    assert code == 2
    err = err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_os_errors_are_described_in_words(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    cases = [
        (lambda: a_file.mkdir(parents=True, exist_ok=True), "it is a file where a folder is needed"),
        (lambda: (a_file / "out").mkdir(parents=True), "a part of the path is a file, not a folder"),
        (lambda: os.listdir(tmp_path / "loop_a"), "it is a loop of symbolic links"),
        (
            lambda: (tmp_path / "loop_a").mkdir(parents=True, exist_ok=True),
            "a symbolic link that leads nowhere",
        ),
        (lambda: open(tmp_path, "w"), "it is a folder, not a file"),
    ]
    for action, needle in cases:
        with pytest.raises(OSError) as err:
            action()
        message = describe_os_error(err.value)
        assert needle in message and str(tmp_path) in message
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/step/model.pt")
    assert describe_os_error(full).startswith("/x/step/model.pt: the disk is full")
    assert disk_is_full(full, tmp_path) and not disk_is_full(RuntimeError("unexpected pos"), tmp_path)


def test_cli_names_a_file_or_loop_where_a_folder_belongs(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    source = f"data.sources=[{{path: {SHAKESPEARE}}}]"
    err = cli_error(capsys, ["prepare", TINY, f"data.dir={a_file}", source])
    assert f"{a_file}: it is a file where a folder is needed" in err
    err = cli_error(capsys, ["prepare", TINY, f"data.dir={tmp_path / 'loop'}", source])
    assert f"{tmp_path / 'loop'}: it is a symbolic link that leads nowhere" in err
    err = cli_error(capsys, ["export", str(tmp_path / "run"), str(a_file / "out")])
    assert f"Cannot export to {a_file / 'out'}: {a_file} is a file, not a folder" in err
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    err = cli_error(capsys, ["export", str(tmp_path / "run"), "."])
    assert "Refusing to export to .: it is the current folder" in err


def test_read_only_folders_are_named(tmp_path, capsys, tiny_data_dir):
    """prepare into, export into and train in a read-only folder (the run needs a subprocess; it trains on the
    shared prepared data, tiny_data_dir, instead of preparing its own)."""
    with read_only(tmp_path / "src", tmp_path / "ro") as ro:
        source = f"data.sources=[{{path: {SHAKESPEARE}}}]"
        err = cli_error(capsys, ["prepare", TINY, f"data.dir={ro / 'data'}", source])
        assert f"{ro / 'data'}: it is on a read-only file system" in err
        err = cli_error(capsys, ["export", str(tmp_path / "run"), str(ro / "out")])
        assert f"{ro} is not writable (a read-only file system)" in err
        proc = run(
            slm_cmd(["train", TINY, f"run.dir={ro / 'run'}", f"data.dir={tiny_data_dir}"]), check=False
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"{ro / 'run'}: it is on a read-only file system" in proc.stderr


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny_data_dir, tmp_path):
    """A 9 MB disk holds one checkpoint of this model (5.7 MB) but not two: the save of step 2 fails, says the disk
    is full, removes its partial folder, and step 1 stays complete and the resume point. ~30 s (one run)."""
    with small_disk(tmp_path / "disk", "9m") as disk:
        run_dir = disk / "run"
        args = [a for a in SHRINK if not a.startswith(("train.max_steps", "checkpoint.every", "eval.every"))]
        cmd = ["train", TINY, f"run.dir={run_dir}", f"data.dir={tiny_data_dir}", *args]
        proc = run(slm_cmd([*cmd, "train.max_steps=3", "checkpoint.every=1", "eval.every=100"]), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        ckpts = run_dir / "checkpoints"
        assert "error: Saving checkpoint step_00000002" in proc.stderr and "the disk is full" in proc.stderr
        assert f"the previous checkpoint {ckpts / 'step_00000001'} stays the resume point" in proc.stderr
        assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000001"]
        assert (ckpts / "latest").read_text().strip() == "step_00000001"
        verify_checkpoint(ckpts / "step_00000001", read_record(ckpts / "step_00000001"))


def test_rank_zero_work_failing_on_the_filesystem_is_said_in_words(tmp_path):
    """run.dir naming a file: the lock (rank 0's work, shared with every rank) says so instead of FileExistsError."""
    import torch

    from train.distributed import DistInfo, on_main_then_share
    from train.errors import TrainError
    from train.run_lock import acquire_run_lock

    a_file = tmp_path / "run"
    a_file.write_text("x")
    single = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(
        TrainError, match=rf"^Locking run.dir failed: {a_file}: it is a file where a folder is needed"
    ):
        on_main_then_share(single, lambda: acquire_run_lock(a_file), "Locking run.dir")
