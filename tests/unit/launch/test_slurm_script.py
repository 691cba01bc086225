"""The batch script `slm slurm` writes, checked line by line without a Slurm (the real cluster runs are in
test_slurm_cluster.py): sbatch options, signal forwarding, requeue, rendezvous, CPU/GPU modes, bad input."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import List

import pytest

from launch.cli import build_parser, main
from launch.slurm import SlurmError, job_from_args, render_batch_script, slurm_time_seconds
from tests.helpers import REPO, TINY


def script_for(run_dir: Path, *args: str) -> str:
    """Parse `slm slurm ARGS` with the real CLI parser and render the script for run_dir."""
    parsed = build_parser().parse_args(["slurm", TINY, *args, f"run.dir={run_dir}"])
    return render_batch_script(job_from_args(parsed))


def sbatch_options(script: str) -> List[str]:
    return re.findall(r"^#SBATCH (\S+)$", script, flags=re.M)


def test_cpu_job_script(tmp_path):
    run_dir = tmp_path / "run"
    script = script_for(
        run_dir,
        "--nodes",
        "2",
        "--nproc-per-node",
        "2",
        "--time",
        "1:00:00",
        "--signal-seconds",
        "90",
        "--partition",
        "debug",
        "model.n_layers=2",
        "train.max_steps=70",
    )
    options = sbatch_options(script)
    assert options == [
        "--job-name=slm-run",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--partition=debug",
        "--time=1:00:00",
        "--signal=B:USR1@90",
        "--requeue",
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
        f"--output={run_dir}/slurm/%x-%j.out",
        f"--error={run_dir}/slurm/%x-%j.out",
    ]
    assert not any(o.startswith("--gpus") for o in options), "a CPU job must not request GPUs"
    body = script.split("set -euo pipefail", 1)
    assert len(body) == 2 and "#SBATCH" not in body[1], "every #SBATCH line must precede the first command"
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert 'BASE_PORT="${SLM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 2000 * 10))}"' in script
    assert "MASTER_PORT=$((BASE_PORT + ATTEMPT % 10))" in script
    # One task per node, torchrun with c10d rendezvous on the first node, the config and overrides verbatim.
    launch = script[script.index("srun --kill-on-bad-exit=1") : script.index("srun_pid=$!")]
    assert "--ntasks-per-node=1" in launch and 'trap "" USR1; exec "$@"' in launch
    assert '--nnodes "$SLURM_NNODES" --nproc_per_node 2' in launch
    assert (
        '--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"' in launch
    )
    assert (
        f"-m launch train {Path(TINY).resolve()} model.n_layers=2 train.max_steps=70 run.dir={run_dir}"
        in launch
    )
    assert launch.rstrip().endswith('>> "$LOG" 2>&1 &')
    assert 'LOG="$RUN_DIR/slurm/train-$SLURM_JOB_ID-attempt$ATTEMPT.log"' in script
    # USR1 and TERM are trapped and forwarded; a checkpointed stop requeues, DONE never does.
    assert "trap 'forward_signal USR1' USR1" in script and "trap 'forward_signal TERM' TERM" in script
    assert 'kill -USR1 "$srun_pid"' in script
    done_check = script.index('if [[ -f "$RUN_DIR/DONE" ]]', script.index("srun_pid=$!"))
    assert done_check < script.index('scontrol requeue "$SLURM_JOB_ID"')
    assert '"$status" == 3' in script
    assert "NCCL_SOCKET_IFNAME" in script and 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"' in script


def test_gpu_job_with_deepspeed_launcher(tmp_path):
    script = script_for(
        tmp_path / "big",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--cpus-per-task",
        "64",
        "--account",
        "proj",
        "--launcher",
        "deepspeed",
    )
    options = sbatch_options(script)
    assert "--gpus-per-node=8" in options and "--cpus-per-task=64" in options and "--account=proj" in options
    assert "--nodes=4" in options and not any(o.startswith("--time") for o in options)
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"' in script  # 64 CPUs shared by 8 processes
    assert 'sed "s/$/ slots=8/" > "$HOSTFILE"' in script
    launch = script[script.index("srun --kill-on-bad-exit=1") : script.index("srun_pid=$!")]
    for piece in (
        'deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID"',
        '--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank',
        '--module launch train "$@"\' deepspeed',
    ):
        assert piece in launch
    assert "torchrun" not in launch


def test_gpu_job_defaults_to_cpus_per_gpu_whole_node_memory_and_cuda(tmp_path):
    script = script_for(tmp_path / "gpu", "--nodes", "2", "--gpus-per-node", "4")
    options = sbatch_options(script)
    assert "--cpus-per-task=32" in options, "8 CPUs per GPU by default, not the site's one per task"
    assert "--mem=0" in options, "a GPU job asks for the whole node's memory"
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"' in script
    assert 'TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${SLURM_TMPDIR:-/tmp}/triton-$USER}"' in script
    launch = script[script.index("srun --kill-on-bad-exit=1") : script.index("srun_pid=$!")]
    assert f"-m launch train {Path(TINY).resolve()} train.device=cuda run.dir=" in launch
    script = script_for(tmp_path / "gpu", "--gpus-per-node", "4", "--cpus-per-gpu", "12", "--mem", "500G")
    assert "--cpus-per-task=48" in sbatch_options(script) and "--mem=500G" in sbatch_options(script)
    assert not any(
        o.startswith("--mem")
        for o in sbatch_options(script_for(tmp_path, "--gpus-per-node", "1", "--mem", "none"))
    )
    cpu = script_for(tmp_path / "cpu", "--nproc-per-node", "2")
    assert not any(o.startswith("--mem") for o in sbatch_options(cpu)) and "train.device=cuda" not in cpu
    with pytest.raises(SlurmError, match="--mem 'lots' is not a Slurm memory size"):
        script_for(tmp_path, "--gpus-per-node", "1", "--mem", "lots")


def test_scripts_are_valid_bash(tmp_path):
    for launcher in ("torchrun", "deepspeed"):
        path = tmp_path / f"{launcher}.sbatch"
        path.write_text(script_for(tmp_path / launcher, "--launcher", launcher, "data.dir=/data with space"))
        subprocess.run(["bash", "-n", str(path)], check=True)
    for name in ("torchrun.sh", "deepspeed.sh", "slurm_template.sh"):
        subprocess.run(["bash", "-n", str(REPO / "launch" / name)], check=True)


def test_overrides_are_shell_quoted(tmp_path):
    script = script_for(tmp_path / "q", "data.dir=/data with space/x", "run.seed=3")
    assert shlex.quote("data.dir=/data with space/x") in script and "run.seed=3" in script


def test_cli_writes_job_sbatch_and_prints_it(tmp_path, capsys):
    """The passing path, dry run included (20-35 s on 2 busy cores: the dry run starts DeepSpeed in a child)."""
    run_dir = tmp_path / "run"
    code = main(
        ["slurm", TINY, "--nodes", "1", f"run.dir={run_dir}", "--signal-seconds", "30", "train.max_steps=50"]
    )
    assert code == 0
    written = (run_dir / "slurm" / "job.sbatch").read_text()
    captured = capsys.readouterr()
    assert captured.out == written
    assert (
        "plan at world size 1" in captured.err and "no errors found" in captured.err
    )  # the dry run passed first
    assert "--signal=B:USR1@30" in written and "train.max_steps=50" in written
    assert not list((run_dir / "slurm").glob(".*tmp")), "the script is written atomically (no temp left)"


def test_submit_without_sbatch_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without Slurm's commands
    code = main(["slurm", TINY, "--submit", "--no-dry-run", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and "'sbatch' was not found" in err
        and str(tmp_path / "run" / "slurm" / "job.sbatch") in err
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--nodes", "0"], "--nodes must be at least 1, got 0"),
        (
            ["--gpus-per-node", "4", "--nproc-per-node", "8"],
            "--nproc-per-node 8 is more than --gpus-per-node 4",
        ),
        (["--time", "90 minutes"], "--time '90 minutes' is not a Slurm time limit"),
        (["--time", "2", "--signal-seconds", "120"], "--signal-seconds 120 is not shorter than --time 2"),
        (["--segments", "0"], "--segments must be at least 1"),
        (["model.n_layer=2"], "model.n_layers"),
    ],
)
def test_bad_arguments_are_refused_plainly(tmp_path, capsys, args, needle):
    code = main(["slurm", TINY, f"run.dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, seconds",
    [("30", 1800), ("30:15", 1815), ("2:00:00", 7200), ("1-0", 86400), ("1-2:30", 95400), ("0-0:0:45", 45)],
)
def test_slurm_time_formats(text, seconds):
    assert slurm_time_seconds(text) == seconds


def test_bad_time_is_a_slurm_error():
    with pytest.raises(SlurmError, match="not a Slurm time limit"):
        slurm_time_seconds("1:2:3:4")


def test_slurm_runs_the_dry_run_at_the_jobs_world_size(tmp_path, capsys):
    """`slm slurm` dry-runs nodes x processes per node before it writes the job; a failing dry run writes none, and
    --no-dry-run skips it (the real dry run in a child process: 20-40 s of DeepSpeed start-up on 2 busy cores)."""
    run_dir = tmp_path / "run"
    args = [
        "slurm",
        TINY,
        "--nodes",
        "2",
        "--nproc-per-node",
        "2",
        f"run.dir={run_dir}",
        "train.global_batch_size=12",
    ]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "plan at world size 4 (rank 0)" in err  # the dry run's report, on stderr
    assert (
        "train.global_batch_size is 12, but micro_batch_size 8 x grad_accum_steps 1 x data-parallel world size 4"
        in err
    )
    assert "the dry run at world size 4 (--nodes 2 x 2 processes per node) failed" in err
    assert not (run_dir / "slurm" / "job.sbatch").exists()
    assert main([*args, "--no-dry-run"]) == 0 and (run_dir / "slurm" / "job.sbatch").exists()
