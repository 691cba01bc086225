"""`slm slurm`: write a Slurm batch script for a run, and optionally submit it.

The script runs one srun task per node; each task starts torchrun (c10d rendezvous on the first node) or the
deepspeed launcher (hostfile, no ssh), which run `python -m launch train CONFIG overrides...`. It forwards
USR1 (sent before the time limit, or by hand) to the training processes, which checkpoint and exit 3, and then
requeues the job; `slm train` resumes from the latest checkpoint. The body is launch/slurm_template.sh.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from common.atomic import atomic_write_text
from launch.config import ConfigError, load_config

TEMPLATE = Path(__file__).with_name("slurm_template.sh")
LAUNCHERS = ("torchrun", "deepspeed")
CPUS_PER_GPU = 8
"""A GPU job's default CPUs per GPU: each rank builds its fp32 model and runs its data workers on the host,
and a site's default of one CPU per task would put every rank of a node on one core."""
WHOLE_NODE_MEMORY = "0"
"""A GPU job's default --mem: Slurm's 0 means all of each node's memory (the fp32 model is built on the host
by every rank at once; a site default of a few GB per task is OOM-killed there)."""
# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
TIME_FORMAT = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+))?(?::(\d+))?|(\d+)(?::(\d+))?(?::(\d+))?)$")


class SlurmError(ConfigError):
    """A problem with `slm slurm`'s arguments or with submitting (a ConfigError, so `slm` prints it plainly)."""


@dataclass(frozen=True)
class SlurmJob:
    """Everything the batch script depends on, validated; paths are absolute."""

    config_path: Path
    """The YAML preset the job trains."""
    overrides: Tuple[str, ...]
    """key=value overrides passed to `slm train` after the preset."""
    run_dir: Path
    """The run's folder (run.dir): checkpoints, DONE, and the slurm/ folder with scripts and logs."""
    workdir: Path
    """Where `slm train` runs, so relative paths in the config mean what they meant at submission."""
    bin_dir: Path
    """The Python environment's bin folder (torchrun, deepspeed) put first on PATH."""
    nodes: int
    """Nodes, one srun task each."""
    gpus_per_node: int
    """GPUs requested per node; 0 is a CPU job (gloo)."""
    nproc_per_node: int
    """Training processes per node."""
    cpus_per_task: Optional[int]
    """CPUs per node task (shared by its processes); None leaves it to the site default."""
    mem: Optional[str]
    """--mem per node in Slurm's units ("0": the whole node's memory); None leaves it to the site default."""
    partition: Optional[str]
    """Slurm partition, or the default one."""
    account: Optional[str]
    """Slurm account, or the user's default."""
    time: Optional[str]
    """Time limit in a Slurm format, or the partition's default."""
    launcher: str
    """torchrun or deepspeed."""
    signal_seconds: int
    """Seconds before the time limit at which Slurm sends USR1 to the batch shell."""
    segments: int
    """Jobs chained with --dependency=afterany, each resuming the run."""

    @property
    def job_name(self) -> str:
        return f"slm-{self.run_dir.name}"

    @property
    def script_path(self) -> Path:
        return self.run_dir / "slurm" / "job.sbatch"


def allow_intermixed_args(parser: argparse.ArgumentParser) -> None:
    """Let options sit between CONFIG and the overrides (`slm slurm CONFIG --nodes 2 key=value`).

    Plain argparse takes CONFIG and an empty override list together and then rejects the later key=value
    words; parse_known_intermixed_args collects them. It calls parse_known_args itself (Python <= 3.12),
    so the plain method is put back while it runs.
    """
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        parser.parse_known_args = plain  # type: ignore[method-assign]
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = parse_known_args  # type: ignore[method-assign]

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def slurm_time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`)."""
    match = TIME_FORMAT.match(text.strip())
    if not match:
        raise SlurmError(
            f"slm slurm: --time {text!r} is not a Slurm time limit; expected minutes, MM:SS, HH:MM:SS, "
            "D-HH, D-HH:MM or D-HH:MM:SS (for example 24:00:00)."
        )
    d, dh, dm, ds, m, ms, hs = (int(g) if g else None for g in match.groups())
    if d is not None:
        return ((d * 24 + dh) * 60 + (dm or 0)) * 60 + (ds or 0)
    if hs is not None:  # H:M:S
        return (m * 60 + ms) * 60 + hs
    return m * 60 + (ms or 0)


def _at_least(name: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise SlurmError(f"slm slurm: {name} must be at least {minimum}, got {value}.")
    return value


def job_from_args(args: argparse.Namespace, workdir: Optional[Path] = None) -> SlurmJob:
    """Validate `slm slurm`'s arguments and resolve the run's paths (the config is loaded to find run.dir)."""
    workdir = (workdir or Path.cwd()).resolve()
    overrides = tuple(args.overrides or ())
    cfg = load_config(args.config, list(overrides))
    nodes = _at_least("--nodes", args.nodes, 1)
    gpus = _at_least("--gpus-per-node", args.gpus_per_node, 0)
    nproc = _at_least("--nproc-per-node", args.nproc_per_node or gpus or 1, 1)
    if gpus and nproc > gpus:
        raise SlurmError(
            f"slm slurm: --nproc-per-node {nproc} is more than --gpus-per-node {gpus}; each training process "
            "needs its own GPU (use --gpus-per-node 0 for a CPU job)."
        )
    cpus_per_gpu = _at_least("--cpus-per-gpu", getattr(args, "cpus_per_gpu", CPUS_PER_GPU), 1)
    cpus = args.cpus_per_task if args.cpus_per_task is not None else (gpus * cpus_per_gpu if gpus else nproc)
    _at_least("--cpus-per-task", cpus, 1)
    mem = job_memory(getattr(args, "mem", None), gpus)
    if args.launcher not in LAUNCHERS:
        raise SlurmError(f"slm slurm: --launcher {args.launcher!r} is not one of {', '.join(LAUNCHERS)}.")
    signal_seconds = _at_least("--signal-seconds", args.signal_seconds, 0)
    unlimited = args.time is None or args.time.strip().upper() in ("UNLIMITED", "INFINITE")
    if not unlimited and slurm_time_seconds(args.time) <= signal_seconds:
        raise SlurmError(
            f"slm slurm: --signal-seconds {signal_seconds} is not shorter than --time {args.time}; the job "
            "would be told to stop as soon as it starts."
        )
    run_dir = Path(cfg.run.dir)
    return SlurmJob(
        config_path=(workdir / args.config).resolve(),
        overrides=overrides,
        run_dir=run_dir if run_dir.is_absolute() else workdir / run_dir,
        workdir=workdir,
        bin_dir=Path(sys.executable).parent,
        nodes=nodes,
        gpus_per_node=gpus,
        nproc_per_node=nproc,
        cpus_per_task=cpus,
        mem=mem,
        partition=args.partition,
        account=args.account,
        time=args.time,
        launcher=args.launcher,
        signal_seconds=signal_seconds,
        segments=_at_least("--segments", args.segments, 1),
    )


def job_memory(mem: Optional[str], gpus: int) -> Optional[str]:
    """--mem for the job: what the user gave ("none" drops the line), else the whole node for a GPU job."""
    if mem is None:
        return WHOLE_NODE_MEMORY if gpus else None
    if mem.strip().lower() == "none":
        return None
    if not re.fullmatch(r"\d+[KMGT]?", mem.strip(), flags=re.I):
        raise SlurmError(
            f"slm slurm: --mem {mem!r} is not a Slurm memory size; expected a number with an optional K, M, G or "
            "T suffix (0: all of each node's memory), or none to leave it to the site default."
        )
    return mem.strip()


def queue_flags(partition: Optional[str], account: Optional[str], time: Optional[str]) -> List[str]:
    """The #SBATCH lines for where and how long a job may run: only those that are set."""
    return [
        f"--{flag}={value}"
        for flag, value in (("partition", partition), ("account", account), ("time", time))
        if value
    ]


def _sbatch_lines(job: SlurmJob) -> List[str]:
    log = job.run_dir / "slurm" / "%x-%j.out"
    lines = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
    ]
    if job.cpus_per_task is not None:
        lines.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.mem is not None:
        lines.append(f"--mem={job.mem}")
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    lines += queue_flags(job.partition, job.account, job.time)
    lines += [
        f"--signal=B:USR1@{job.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--chdir={job.workdir}",
        f"--output={log}",
        f"--error={log}",
    ]
    return [f"#SBATCH {line}" for line in lines]


def _train_args(job: SlurmJob) -> str:
    """The preset and overrides of `slm train`. A GPU job asks for train.device=cuda (before the user's
    overrides, which may replace it): a CUDA build that cannot see its GPU then fails at once instead of
    training on the CPU for the whole allocation."""
    device = ("train.device=cuda",) if job.gpus_per_node else ()
    return " ".join(shlex.quote(a) for a in (str(job.config_path), *device, *job.overrides))


def _launch_lines(job: SlurmJob) -> Tuple[str, str]:
    """(setup lines, the backgrounded srun command) for the chosen launcher."""
    srun = (
        'srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 '
        '${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \\\n'
    )
    if job.launcher == "torchrun":
        setup = ""
        launch = (
            srun
            + '    bash -c \'trap "" USR1; exec "$@"\' ignore-usr1 \\\n'
            + f'    torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {job.nproc_per_node} \\\n'
            + '        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \\\n'
            + f"        -m launch train {_train_args(job)} \\\n"
            + '    >> "$LOG" 2>&1 &'
        )
        return setup, launch
    setup = (
        "# deepspeed's hostfile: every node of the allocation with its process slots (no ssh: one launcher per node).\n"
        'export HOSTFILE="$RUN_DIR/slurm/hostfile-$SLURM_JOB_ID"\n'
        f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots={job.nproc_per_node}/" > "$HOSTFILE"\n'
    )
    launch = (
        srun
        + '    bash -c \'trap "" USR1; exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" \\\n'
        + '        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank \\\n'
        + f'        --module launch train "$@"\' deepspeed {_train_args(job)} \\\n'
        + '    >> "$LOG" 2>&1 &'
    )
    return setup, launch


def render_batch_script(job: SlurmJob) -> str:
    """The batch script's text (launch/slurm_template.sh with this job's values)."""
    setup, launch = _launch_lines(job)
    threads = max(1, job.cpus_per_task // job.nproc_per_node) if job.cpus_per_task else 1
    values = {
        "@SBATCH_LINES@": "\n".join(_sbatch_lines(job)),
        "@RUN_DIR@": shlex.quote(str(job.run_dir)),
        "@SCRIPT@": shlex.quote(str(job.script_path)),
        "@SEGMENTS@": str(job.segments),
        "@SIGNAL_SECONDS@": str(job.signal_seconds),
        "@SHUTDOWN_SECONDS@": str(max(30, job.signal_seconds)),
        "@BIN_DIR@": shlex.quote(str(job.bin_dir)),
        "@OMP_THREADS@": str(threads),
        "@LAUNCHER_SETUP@": setup,
        "@LAUNCH@": launch,
    }
    text = TEMPLATE.read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(key, value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise RuntimeError(f"{TEMPLATE} has placeholders slurm.py does not fill: {sorted(set(left))}")
    return text


def write_batch_script(job: SlurmJob) -> Path:
    """Write run.dir/slurm/job.sbatch atomically (the folder also receives the job's logs)."""
    atomic_write_text(job.script_path, render_batch_script(job))
    return job.script_path


def submit(job: SlurmJob) -> List[str]:
    """sbatch the written script `job.segments` times, each segment after the previous one ends; job ids."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError(
            f"slm slurm --submit: 'sbatch' was not found on PATH, so this is not a Slurm login node. The script is "
            f"written to {job.script_path}; submit it with `sbatch` on a machine of the cluster."
        )
    job_ids: List[str] = []
    for segment in range(1, job.segments + 1):
        cmd = [sbatch, "--parsable", f"--export=ALL,SLM_SEGMENT={segment}"]
        if job_ids:
            cmd.append(f"--dependency=afterany:{job_ids[-1]}")
        cmd.append(str(job.script_path))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            submitted = f" (already submitted: {', '.join(job_ids)})" if job_ids else ""
            raise SlurmError(
                f"slm slurm --submit: sbatch refused {job.script_path} (segment {segment} of {job.segments})"
                f"{submitted}: {proc.stderr.strip() or proc.stdout.strip()}"
            )
        job_ids.append(proc.stdout.strip().split(";")[0])
    return job_ids


def slurm_command(args: argparse.Namespace) -> int:
    """`slm slurm`: dry-run the job's world size (unless --no-dry-run), write run.dir/slurm/job.sbatch, print it,
    and with --submit submit it and print the job ids."""
    job = job_from_args(args)
    if not getattr(args, "no_dry_run", True):
        from launch.dry_run import dry_run_before_submit

        code = dry_run_before_submit(
            args.config, job.overrides, job.nodes, job.nproc_per_node, getattr(args, "gpu", None)
        )
        if code != 0:
            raise SlurmError(
                f"slm slurm: the dry run at world size {job.nodes * job.nproc_per_node} (--nodes {job.nodes} x "
                f"{job.nproc_per_node} processes per node) failed (its report is above); no job was written. Fix "
                "what it names, or pass --no-dry-run to skip it."
            )
    path = write_batch_script(job)
    print(path.read_text(encoding="utf-8"), end="")
    print(f"# written to {path}", file=sys.stderr)
    if args.submit:
        for segment, job_id in enumerate(submit(job), start=1):
            print(f"submitted job {job_id} (segment {segment} of {job.segments})")
    return 0
