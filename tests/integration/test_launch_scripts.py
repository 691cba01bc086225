"""launch/torchrun.sh and launch/deepspeed.sh in their multi-node form, as far as one machine allows: two
"nodes" (two launcher invocations on localhost, one process each) meet and train the tiny model to the end."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from tests.helpers import BIN, REPO, TINY, free_port, test_env
from train.checkpoint import find_checkpoint, read_record

pytestmark = pytest.mark.slow

MAX_STEPS = 12
SMALL = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.max_seq_len=32",
    "train.micro_batch_size=4",
    f"train.max_steps={MAX_STEPS}",
    "schedule.warmup_steps=2",
    "log.every=1",
    "checkpoint.every=6",
    "eval.every=1000",
    "eval.batches=2",
]


def run_nodes(script: str, node_envs: List[Dict[str, str]], run_dir: Path, data_dir: Path) -> str:
    """Start `script` once per node env at the same time, wait for all, fail with every log if one fails."""
    args = [str(REPO / "launch" / script), TINY, f"run.dir={run_dir}", f"data.dir={data_dir}", *SMALL]
    procs = []
    for i, extra in enumerate(node_envs):
        env = test_env({"PATH": f"{BIN}:{test_env()['PATH']}", **extra})
        log = open(run_dir.parent / f"{run_dir.name}-node{i}.log", "w+")
        procs.append(
            (subprocess.Popen(args, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT), log)
        )
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=300))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = []
    for _, log in procs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    joined = "\n".join(
        f"--- node {i} (exit {c}) ---\n{out[-5000:]}" for i, (c, out) in enumerate(zip(codes, outputs))
    )
    assert codes == [0] * len(node_envs), joined
    return joined


def check_finished(run_dir: Path) -> None:
    assert (run_dir / "DONE").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("kind") == "train"] == list(range(1, MAX_STEPS + 1))
    step_dir = find_checkpoint(run_dir)
    assert step_dir is not None and step_dir.name == f"step_{MAX_STEPS:08d}"
    assert read_record(step_dir).world_size == 2


def test_torchrun_two_nodes_with_c10d_rendezvous(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "torchrun_run"
    node = {
        "NNODES": "2",
        "NPROC": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": f"test-{tmp_path.name}",
    }
    out = run_nodes("torchrun.sh", [node, dict(node)], run_dir, tiny_data_dir)
    assert "world size 2 on 2 node(s)" in out
    check_finished(run_dir)


def test_deepspeed_two_nodes_without_ssh(tiny_data_dir, tmp_path):
    """Slow (about 40 s on 2 busy cores): launch/deepspeed.sh started twice, as two "nodes" of one process each,
    through the DeepSpeed launcher (its own Python start-up before each rank's) for a short real run."""
    run_dir = tmp_path / "deepspeed_run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names for this machine: two "nodes"
    node = {"HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    out = run_nodes(
        "deepspeed.sh", [{**node, "NODE_RANK": "0"}, {**node, "NODE_RANK": "1"}], run_dir, tiny_data_dir
    )
    assert "nnodes=2, num_local_procs=1, node_rank=1" in out
    check_finished(run_dir)


def test_torch_floor_is_true_and_the_advice_meets_it():
    """pyproject's torch floor admits only a torch with the APIs we call, and the README/Makefile pins meet it."""
    floor = re.search(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert tuple(int(x) for x in floor.split(".")) >= (2, 6), (
        "train/optim.py calls torch.compiler.set_stance (2.6)"
    )
    pins = re.findall(r'TORCH_SPEC \??= ?"?torch==([\d.]+)', (REPO / "Makefile").read_text())
    assert pins and all(tuple(map(int, p.split(".")[:2])) >= (2, 6) for p in pins)
    assert "torch==2.5" not in (REPO / "README.md").read_text()


def test_deepspeed_over_ssh_forwards_the_run_environment(tmp_path):
    """The real DeepSpeed runner, multi-node over ssh: the remote command it hands to pdsh exports the run's
    credentials and settings, which the runner alone would drop. There is no sshd or pdsh here, so two stand-ins on
    PATH play the remote shell: `ssh HOST hostname -I` answers the address, and `pdsh` records what it was given."""
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "ssh").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (shims / "pdsh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/pdsh-argv\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("USER_CHOSEN=kept\n")
    env = test_env(
        {
            "PATH": f"{shims}:{BIN}:{test_env()['PATH']}",
            "HOME": str(home),
            "HOSTFILE": str(hostfile),
            "MASTER_PORT": str(free_port()),
            "AWS_ACCESS_KEY_ID": "key-for-the-other-nodes",
            "HF_HOME": "/scratch/hf home",
            "WANDB_PROJECT": "p",
            "NOT_FORWARDED": "x",
            "TMPDIR": str(tmp_path),
        }
    )
    env.pop("NODE_RANK", None)
    done = subprocess.run(
        [str(REPO / "launch" / "deepspeed.sh"), TINY],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    remote = (tmp_path / "pdsh-argv").read_text()
    assert "export AWS_ACCESS_KEY_ID=key-for-the-other-nodes;" in remote
    assert 'export HF_HOME="/scratch/hf home";' in remote
    assert "export WANDB_PROJECT=p;" in remote and "export USER_CHOSEN=kept;" in remote
    assert "NOT_FORWARDED" not in remote
    assert not list(tmp_path.glob("slm-deepspeed-env.*")), "the file with credentials outlives the launcher"
