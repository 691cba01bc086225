"""`make bench`: run every CPU benchmark in bench/ and write docs/benchmarks.md (machine, date, commands, tables).

    python bench/suite.py [--quick] [--only NAME,...] [--out docs/benchmarks.md]

Each benchmark is a script in bench/ that compares within one run and writes its markdown table to the file
given by --out; the suite runs them one after another in fresh processes (so none inherits another's threads
or allocations), each with the command line recorded in the report. --quick runs them at tiny sizes, to
check that the harness works (its figures mean nothing). bench/gpu.py keeps its own section: everything from
GPU_MARKER on in the existing file is carried over unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import atomic_write_text  # noqa: E402

GPU_MARKER = "<!-- GPU results: bench/gpu.py appends below this line -->"
NO_GPU_YET = "GPU figures: unmeasured (no CUDA machine has run `make bench-gpu` for this file yet)."
GPU_INTRO = "`make bench-gpu` (bench/gpu.py; its steps are budgeted for about 10 minutes on one H100/H200, not yet timed on one) runs the GPU-only checks, a bare training loop over the 125m/350m/1b models, then `slm train` itself at 125m and 350m for ZeRO 0-3 (each 125m run resumed from its middle checkpoint and compared with the uninterrupted run), with document masks (flex attention), `train.compile` and Muon: tokens/s, MFU and peak memory of each against the bare loop."
"""The GPU section's first paragraph (above the marker, so `make bench` rewrites it with the CPU part)."""


@dataclass
class Bench:
    name: str
    """Short name (for --only)."""
    title: str
    """Section heading in docs/benchmarks.md."""
    args: List[str]
    """Script and arguments, relative to the repository root."""
    quick_args: List[str]
    """The same at tiny sizes (--quick)."""


BENCHES = [
    Bench(
        "quality",
        "Quality per compute: configs/shakespeare-cpu.yaml within train.max_time=100",
        ["bench/quality.py", "--max-time", "100"],
        [
            "bench/quality.py",
            "--max-time",
            "15",
            "model.n_layers=1",
            "model.d_model=64",
            "schedule.warmup_steps=2",
        ],
    ),
    Bench(
        "quality_adamw",
        "Quality per compute: the same recipe with AdamW instead of Muon",
        ["bench/quality.py", "--max-time", "100", "optim.name=adamw"],
        [
            "bench/quality.py",
            "--max-time",
            "15",
            "model.n_layers=1",
            "model.d_model=64",
            "schedule.warmup_steps=2",
            "optim.name=adamw",
        ],
    ),
    Bench(
        "cpu_choices",
        "Per step on this CPU: bf16 against fp32, torch.compile against eager, Muon against AdamW",
        ["bench/cpu_choices.py", "--steps", "30"],
        ["bench/cpu_choices.py", "--steps", "8", "model.n_layers=1", "model.d_model=64"],
    ),
    Bench(
        "train_throughput",
        "Training throughput: `slm train` against a bare PyTorch loop",
        ["bench/train_throughput.py", "--steps", "60", "--log-every", "10", "--repeats", "3"],
        [
            "bench/train_throughput.py",
            "--steps",
            "6",
            "--log-every",
            "2",
            "--repeats",
            "1",
            "--precisions",
            "fp32",
            "--shapes",
            "tiny",
            "--stages",
            "2",
        ],
    ),
    Bench(
        "distributed",
        "Scaling, peak memory per rank (ZeRO 0-3) and data wait, 2 processes",
        ["bench/distributed.py", "--steps", "40"],
        ["bench/distributed.py", "--steps", "4", "--micro-batch", "2"],
    ),
    Bench(
        "data_pipeline",
        "Data pipeline: prepare and loader throughput",
        ["bench/data_pipeline.py", "--copies", "12", "--repeats", "3"],
        [
            "bench/data_pipeline.py",
            "--copies",
            "1",
            "--repeats",
            "1",
            "--loader-seconds",
            "0.3",
            "--model-steps",
            "2",
        ],
    ),
    Bench(
        "data_scale",
        "The loader at corpus scale: 1B, 200B and 1T tokens of sparse shards, against a 125M and a 25M model's appetite",
        ["bench/data_scale.py", "--skip", "verify,s3,parts", "--sizes", "1e9,200e9,1e12", "--seconds", "3"],
        ["bench/data_scale.py", "--skip", "verify,s3,parts", "--sizes", "1e8,1e9", "--seconds", "0.5"],
    ),
    Bench(
        "loss_memory",
        "Loss memory: full logits against the chunked cross-entropy",
        ["bench/loss_memory.py"],
        ["bench/loss_memory.py", "--batch", "2", "--seq", "128", "--vocab", "8192", "--chunk", "64"],
    ),
]


def machine() -> Dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "logical CPUs": str(os.cpu_count()),
        "affinity": str(len(os.sched_getaffinity(0))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
    }


def run_bench(bench: Bench, quick: bool, work: Path) -> tuple:
    """(command line, markdown table or failure note, seconds) of one benchmark."""
    out = work / f"{bench.name}.md"
    cmd = [sys.executable, *(bench.quick_args if quick else bench.args), "--out", str(out)]
    shown = "python " + " ".join(cmd[1:-2])
    print(f"[bench] {shown}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr)[-1500:]
        return shown, f"FAILED (exit {proc.returncode}):\n\n```\n{tail}\n```", seconds
    return shown, out.read_text(encoding="utf-8").strip(), seconds


def gpu_section(existing: Optional[str]) -> str:
    """What bench/gpu.py wrote into the previous report, or the line saying GPU figures are unmeasured."""
    if existing and GPU_MARKER in existing:
        return GPU_MARKER + existing.split(GPU_MARKER, 1)[1]
    return f"{GPU_MARKER}\n\n{NO_GPU_YET}\n"


def render(
    info: Dict[str, str],
    results: List[tuple],
    quick: bool,
    total: float,
    gpu: str,
    invocation: str = "bench/suite.py",
) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python {invocation}` (`make bench` runs them all) on {date}, "
        f"{total:.0f} s in all."
        + (" Quick mode: tiny sizes, the figures only show the harness works." if quick else ""),
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
    ]
    for bench, (cmd, table, seconds) in results:
        lines += [f"## {bench.title}", "", f"`{cmd}` ({seconds:.0f} s)", "", table, ""]
    lines += ["## GPU", "", GPU_INTRO, "", gpu.rstrip(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the harness, not the machine")
    parser.add_argument(
        "--only", default=None, help="comma-separated names: " + ", ".join(b.name for b in BENCHES)
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    chosen = BENCHES
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {b.name for b in BENCHES})
        if unknown:
            sys.exit(
                f"--only names unknown benchmarks {unknown}; expected some of {[b.name for b in BENCHES]}."
            )
        chosen = [b for b in BENCHES if b.name in names]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slm-bench-") as tmp:
        results = [(bench, run_bench(bench, args.quick, Path(tmp))) for bench in chosen]
    existing = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
    invocation = " ".join(["bench/suite.py", *sys.argv[1:]])
    text = render(
        machine(), results, args.quick, time.perf_counter() - started, gpu_section(existing), invocation
    )
    atomic_write_text(args.out, text)
    print(text)
    if any(table.startswith("FAILED") for _, (_, table, _) in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
