"""Scaling, peak memory per rank and data wait of real `slm train` runs on CPU (gloo), one table each.

    python bench/distributed.py [--steps N] [--config configs/tiny.yaml] [--out FILE.md] [KEY=VALUE ...]

- Scaling: 2 processes with ZeRO-2 (1 thread each) against 1 process with 2 threads and 2 accumulated
  micro-batches, so both take the same global batch per step; tokens/s over the steps after the first
  (warm-up) row, from each run's own metrics.jsonl.
- Peak memory per rank, ZeRO 0-3 on 2 processes: each rank's peak RSS (getrusage) less its RSS just before
  the run was set up (after importing torch and DeepSpeed), against the model's own estimate per rank
  (`model.stats.training_memory_per_rank`, what the preflight check uses: model states + activations).
- Data wait: the mean `data_wait` of those runs' train rows (time in next() on the loader / step time).

Each run is a fresh process tree started here: `torchrun ... bench/distributed.py --worker` runs
`train.trainer.run_training` with one extra component that writes the rank's memory to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import atomic_write_text  # noqa: E402

MIB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(config: str, overrides: List[str], memory_out: Path) -> None:
    """One rank of a run (under torchrun or alone): train, then write this rank's memory figures."""
    import deepspeed  # noqa: F401  (imported before the baseline so the baseline holds it)
    import torch  # noqa: F401

    from launch.config import load_config
    from launch.prepare_missing import prepare_missing_data
    from model.stats import training_memory_per_rank
    from train.components import Component, LoopRun
    from train.trainer import run_training

    baseline = rss_bytes()

    class PeakMemory(Component):
        name = "peak_memory"

        def on_end(self, run: LoopRun, reason: str) -> None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
            train = run.cfg.train
            estimate = training_memory_per_rank(
                run.cfg.model,
                train.zero_stage,
                run.dist_info.world_size,
                train.micro_batch_size,
                run.plan.seq_len,
            )
            record = {"rank": run.dist_info.rank, "baseline": baseline, "peak": peak, "estimate": estimate}
            atomic_write_text(
                memory_out.parent / f"{memory_out.name}.rank{run.dist_info.rank}.json", json.dumps(record)
            )

    cfg = load_config(config, overrides)
    prepare_missing_data(cfg)
    code = run_training(cfg, extra_components=[PeakMemory()])
    sys.exit(code)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, threads: int, config: str, overrides: List[str], work: Path, name: str) -> Dict:
    """Run one configuration; its train rows and each rank's memory record."""
    run_dir, memory_out = work / name, work / f"{name}.memory"
    args = [
        str(Path(__file__).resolve()),
        "--worker",
        "--config",
        config,
        "--memory-out",
        str(memory_out),
        "--",
        f"run.dir={run_dir}",
        *overrides,
    ]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [
            torchrun,
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    memory = [json.loads(p.read_text()) for p in sorted(work.glob(f"{name}.memory.rank*.json"))]
    return {"rows": [r for r in rows if r["kind"] == "train"], "memory": memory}


def throughput(rows: List[Dict]) -> float:
    """Tokens/s over the train rows after the first (which carries start-up effects)."""
    later = rows[1:] or rows
    return statistics.median(r["tokens_per_second"] for r in later)


def data_wait(rows: List[Dict]) -> float:
    return statistics.mean(r["data_wait"] for r in rows)


def tables(results: Dict[str, Dict], micro: int) -> str:
    one, two = results["1 process x 2 threads"], results["2 processes x 1 thread (ZeRO-2)"]
    lines = [
        f"Scaling at the same global batch (2 x micro-batch {micro} sequences per step):",
        "",
        "| layout | tokens/s | vs 1 process | data wait |",
        "|---|---:|---:|---:|",
    ]
    base = throughput(one["rows"])
    for name in ("1 process x 2 threads", "2 processes x 1 thread (ZeRO-2)"):
        rate = throughput(results[name]["rows"])
        lines.append(
            f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {100 * data_wait(results[name]['rows']):.1f}% |"
        )
    lines += [
        "",
        f"Both layouts use the same 2 cores; 2 processes run at {throughput(two['rows']) / base:.2f}x the "
        "tokens/s of 1 process with 2 threads (intra-op threading of small matrices scales worse than data "
        "parallelism).",
        "",
        "Peak memory per rank, 2 processes (RSS growth over the set-up baseline, MiB):",
        "",
        "| ZeRO | rank | baseline | peak | growth | estimate (states + activations) | growth / estimate |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in range(4):
        for record in results[f"ZeRO-{stage} x 2"]["memory"]:
            growth, estimate = record["peak"] - record["baseline"], record["estimate"]
            lines.append(
                f"| {stage} | {record['rank']} | {record['baseline'] / MIB:.0f} | {record['peak'] / MIB:.0f} "
                f"| {growth / MIB:.0f} | {estimate['total'] / MIB:.1f} ({estimate['model_states'] / MIB:.1f} "
                f"+ {estimate['activations'] / MIB:.1f}) | {growth / max(estimate['total'], 1):.1f} |"
            )
    lines += [
        "",
        "Growth includes what the estimate leaves out: DeepSpeed's flat buffers and gloo's bucket copies, "
        "the allocator's cache, the loader's shard maps and the evaluation batches.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.overrides, args.memory_out)
        return
    with tempfile.TemporaryDirectory(prefix="slm-bench-dist-") as tmp:
        work = Path(tmp)
        common = [
            f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.micro_batch}",
            f"log.every={max(1, args.steps // 5)}",
            f"eval.every={args.steps}",
            "eval.batches=2",
            f"checkpoint.every={10 * args.steps}",
            "export.every=0",
            f"data.dir={work / 'data'}",
            "data.num_workers=0",
            *args.overrides,
        ]
        # The first run prepares the data; the others reuse it.
        results = {
            "1 process x 2 threads": launch(
                1, 2, args.config, [*common, "train.zero_stage=2", "train.grad_accum_steps=2"], work, "one"
            )
        }
        for stage in range(4):
            name = "2 processes x 1 thread (ZeRO-2)" if stage == 2 else f"ZeRO-{stage} x 2"
            results[name] = launch(
                2, 1, args.config, [*common, f"train.zero_stage={stage}"], work, f"zero{stage}"
            )
        results["ZeRO-2 x 2"] = results["2 processes x 1 thread (ZeRO-2)"]
        text = tables(results, args.micro_batch)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
