"""`slm slurm` against a real one-node Slurm (tests/integration/slurm_localhost.sh installs and starts it).

One job carries the whole story: it trains the tiny model with 2 torchrun processes, checkpointing to the real
S3 server (checkpoint.dir=s3://..., credentials and endpoint only in the AWS_* variables of the submitting shell),
gets USR1 as a preempted job would (`scancel --signal=USR1 --batch`), checkpoints to the store, requeues itself,
resumes from the store and finishes; then a chained pair of segments finds the run finished and exits at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

from tests.helpers import REPO, TINY, run, slm_cmd
from tests.helpers import test_env as make_env
from tests.s3_localhost import BUCKET
from train.checkpoint import RemoteCheckpoints, read_record

pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = REPO / "tests" / "integration" / "slurm_localhost.sh"
CLUSTER_LOCK = Path(tempfile.gettempdir()) / "slm-slurm-localhost.lock"
MAX_STEPS = 100
SMALL = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.max_seq_len=32",
    "train.micro_batch_size=4",
    f"train.max_steps={MAX_STEPS}",
    "log.every=1",
    "checkpoint.every=40",
    "eval.every=1000",
    "eval.batches=2",
]
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def slurm_is_up() -> bool:
    return (
        shutil.which("sinfo") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0
    )


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running local Slurm; started (and installed) here when needed, stopped afterwards if we started it."""
    if os.geteuid() != 0:
        pytest.skip(
            "a local Slurm needs root: slurm_localhost.sh installs slurm-wlm/munge and starts daemons"
        )
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and apt-get is not available to install it")
    # One module at a time owns the cluster: under `make test` the two Slurm modules may run on two pytest
    # workers at once, and the one that started the daemons stops them when it is done.
    with open(CLUSTER_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        was_up = slurm_is_up()
        proc = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"slurm_localhost.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        yield
        if not was_up:
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=60)


def job_info(job_id: str) -> Dict[str, str]:
    """`scontrol show job` as a dict (empty once Slurm forgot the job)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def train_steps(run_dir: Path) -> List[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if row.get("kind") == "train":
            steps.append(row["step"])
    return steps


def logs_of(run_dir: Path) -> str:
    """Every file under run.dir/slurm, for failure messages."""
    parts = [
        f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
        for p in sorted((run_dir / "slurm").glob("*"))
    ]
    return "\n".join(parts)


def submit(run_dir: Path, data_dir: Path, store: Dict, *extra: str) -> List[str]:
    """`slm slurm --submit` for the tiny run (CPU, 1 node, 2 torchrun processes) with its checkpoints on the S3
    server (`store`: the preempted run's url, node-local cache and AWS_* environment); the job ids it printed."""
    args = [
        "slurm",
        TINY,
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        "--cpus-per-task",
        "2",
        "--submit",
        "--no-dry-run",  # the dry run before submitting: tests/unit/launch/test_slurm_script.py
        *extra,
        f"run.dir={run_dir}",
        f"data.dir={data_dir}",
        f"checkpoint.dir={store['url']}",
        f"data.cache_dir={store['cache']}",
        *SMALL,
    ]
    out = run(slm_cmd(args), timeout=60, env=store["env"]).stdout  # sbatch --export=ALL carries AWS_*
    return re.findall(r"^submitted job (\d+) ", out, flags=re.M)


def wait_for(condition, timeout: float, what: str, run_dir: Path, job_id: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}; job {job_info(job_id)}\n"
                f"{logs_of(run_dir)}"
            )
        time.sleep(0.2)


@pytest.fixture(scope="module")
def preempted_run(slurm_cluster, s3_server, tiny_data_dir, tmp_path_factory) -> Dict:
    """Submit, let a few steps pass, send USR1 to the batch shell, and wait until the job is over for good.

    Slow (about 90 s on 2 busy cores): a real Slurm job runs two attempts of a 2-process torchrun training
    (start-up, checkpoint to S3 on USR1, requeue, resume from the store, finish): the story every test here checks,
    made once for the module."""
    run_dir = tmp_path_factory.mktemp("slurm_run")
    store = {
        "url": f"s3://{BUCKET}/slurm-{uuid.uuid4().hex[:8]}",
        "cache": tmp_path_factory.mktemp("slurm_cache"),
        "env": make_env(s3_server.env),
    }
    (job_id,) = submit(run_dir, tiny_data_dir, store)
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 2, 240, "the first training steps", run_dir, job_id)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        wait_for(
            lambda: job_info(job_id).get("JobState") in FINAL_STATES, 300, "the job to end", run_dir, job_id
        )
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    return {"job_id": job_id, "run_dir": run_dir, "info": job_info(job_id), "store": store}


def test_preempted_job_requeued_once_and_finished(preempted_run):
    run_dir, job_id, info = preempted_run["run_dir"], preempted_run["job_id"], preempted_run["info"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs_of(run_dir)
    assert info["Restarts"] == "1", "requeued exactly once: the finished attempt must not requeue again"
    assert (run_dir / "DONE").is_file()
    batch_log = (run_dir / "slurm" / f"slm-{run_dir.name}-{job_id}.out").read_text()
    assert batch_log.count("got SIGUSR1") == 1 and batch_log.count(f"requeueing job {job_id}") == 1
    assert f"job {job_id} attempt 0 " in batch_log and f"job {job_id} attempt 1 " in batch_log
    assert batch_log.rstrip().endswith("the run is finished.")
    attempts = sorted(p.name for p in (run_dir / "slurm").glob(f"train-{job_id}-attempt*.log"))
    assert attempts == [f"train-{job_id}-attempt0.log", f"train-{job_id}-attempt1.log"]


def test_resumed_from_the_preemption_checkpoint_on_the_store_with_an_exact_step_sequence(preempted_run):
    run_dir, job_id, url = preempted_run["run_dir"], preempted_run["job_id"], preempted_run["store"]["url"]
    first = (run_dir / "slurm" / f"train-{job_id}-attempt0.log").read_text()
    second = (run_dir / "slurm" / f"train-{job_id}-attempt1.log").read_text()
    assert "received SIGUSR1" in first
    stopped = re.search(r"stopped by signal after step (\d+); exit code 3", first)
    assert stopped, first[-3000:]
    step = int(stopped.group(1))
    assert 1 <= step < MAX_STEPS
    assert f"saved checkpoint {url}/step_{step:08d}" in first  # uploaded, COMPLETE last, before exit code 3
    # Nothing ran past the preemption checkpoint in the first attempt ...
    assert max(int(s) for s in re.findall(r"^train step (\d+) ", first, flags=re.M)) == step
    # ... and the second attempt picked up exactly there.
    # The store's newest complete step, read through this node's copy (its meta.json equal to the store's).
    copy = RemoteCheckpoints(url, None, str(preempted_run["store"]["cache"])).copy_dir(f"step_{step:08d}")
    assert f"resumed from {copy} at step {step} " in second
    assert not (run_dir / "checkpoints").exists()
    assert min(int(s) for s in re.findall(r"^train step (\d+) ", second, flags=re.M)) == step + 1
    assert train_steps(run_dir) == list(range(1, MAX_STEPS + 1)), (
        "a step repeated or missing in metrics.jsonl"
    )


def test_final_checkpoint_is_complete_on_the_store(preempted_run, s3_env, tmp_path):
    remote = RemoteCheckpoints(preempted_run["store"]["url"], None, str(tmp_path))  # a fresh machine's cache
    assert remote.complete_steps()[-1] == f"step_{MAX_STEPS:08d}"
    step_dir = remote.newest_intact(hashes=True)  # downloaded and every file's size and hash verified
    assert step_dir is not None and step_dir.name == f"step_{MAX_STEPS:08d}"
    record = read_record(step_dir)
    assert record.step == MAX_STEPS and record.world_size == 2
    assert record.tokens_seen == MAX_STEPS * 4 * 2 * 32


def test_segments_of_a_finished_run_exit_at_once(preempted_run, tiny_data_dir):
    run_dir = preempted_run["run_dir"]
    first, second = submit(run_dir, tiny_data_dir, preempted_run["store"], "--segments", "2")
    dependency = job_info(second).get("Dependency", "")
    for job_id in (first, second):
        wait_for(
            lambda j=job_id: job_info(j).get("JobState") in FINAL_STATES,
            120,
            f"job {job_id}",
            run_dir,
            job_id,
        )
    infos = {j: job_info(j) for j in (first, second)}
    if (
        f"afterany:{first}" not in dependency
    ):  # already satisfied when we looked: it must have waited for `first`
        assert infos[second]["StartTime"] >= infos[first]["EndTime"], (dependency, infos)
    for segment, job_id in enumerate((first, second), start=1):
        assert infos[job_id]["JobState"] == "COMPLETED" and infos[job_id]["Restarts"] == "0"
        out = (run_dir / "slurm" / f"slm-{run_dir.name}-{job_id}.out").read_text()
        assert f"job {job_id} segment {segment}/2: {run_dir}/DONE exists" in out
        assert not (run_dir / "slurm" / f"train-{job_id}-attempt0.log").exists(), (
            "a finished run trains no more"
        )
    assert train_steps(run_dir) == list(range(1, MAX_STEPS + 1))
