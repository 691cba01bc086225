"""One `slm train` per run.dir: run.dir/LOCK names its holder; a live holder refuses a second run, a holder
that is certainly gone (dead pid on this host, an earlier attempt of the same Slurm job) is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, run, slm_cmd
from tests.helpers import test_env as make_env
from train.errors import TrainError
from train.run_lock import LOCK, acquire_run_lock, release_run_lock

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from train.run_lock import acquire_run_lock
acquire_run_lock(__import__("pathlib").Path({run_dir!r}))
print("held", flush=True)
{after}
"""


def holder_process(run_dir, after: str) -> subprocess.Popen:
    code = HOLD.format(repo=str(REPO), run_dir=str(run_dir), after=after)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=make_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_a_second_run_and_release_frees_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    proc = holder_process(tmp_path / "run", "time.sleep(60)")
    try:
        with pytest.raises(
            TrainError, match=f"in use by another slm train \\(host {socket.gethostname()}, pid {proc.pid}"
        ):
            acquire_run_lock(tmp_path / "run")
    finally:
        proc.kill()
        proc.wait()
    path = acquire_run_lock(tmp_path / "run")  # its pid is gone now: taken over
    assert json.loads(path.read_text())["pid"] != proc.pid
    release_run_lock(path)
    assert not path.exists()


def test_a_dead_holder_on_this_host_is_taken_over_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    proc = holder_process(tmp_path / "run", "import os; os._exit(0)")  # dies holding it (as kill -9 would)
    proc.wait()
    path = acquire_run_lock(tmp_path / "run")
    assert f"its process {proc.pid} on this host has ended" in capsys.readouterr().err
    release_run_lock(path)


def test_an_earlier_attempt_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_text(json.dumps({"host": "node-7", "pid": 1, "slurm_job_id": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(TrainError, match="host node-7, pid 1, Slurm job 4242"):
        acquire_run_lock(run_dir)  # another job on another host: it may be alive
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    release_run_lock(acquire_run_lock(run_dir))
    assert not (run_dir / LOCK).exists()


@pytest.mark.slow
def test_two_trainings_on_one_run_dir(tmp_path, tiny_data_dir):
    """The second `slm train` on a busy run.dir fails at once; the first finishes with its records intact.

    About 20 s: the first run is held inside its step-6 save until the second has been refused (at most 240 s),
    then finishes its 12 steps."""
    from tests.runs import losses, read_until, start, train_args

    run_dir = tmp_path / "run"
    release = tmp_path / "release"
    held = make_env({"SLM_SLEEP_IN_SAVE": "6:240", "SLM_SAVE_RELEASE_FILE": str(release)})
    first = start(slm_cmd(train_args(run_dir, tiny_data_dir)), env=held)
    seen = []
    read_until(first, "fault injection", seen)  # inside its step-6 save, holding the lock
    second = run(slm_cmd(train_args(run_dir, tiny_data_dir)), check=False, timeout=120)
    release.touch()
    assert second.returncode == 2 and f"run.dir {run_dir} is in use by another slm train" in second.stderr
    first.stdout.read()
    assert first.wait(timeout=240) == 0
    assert sorted(losses(run_dir)) == list(range(1, 13)) and not (run_dir / LOCK).exists()
