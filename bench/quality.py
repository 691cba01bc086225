"""Quality per compute: validation bits per byte reached by a recipe within a wall-clock budget.

    python bench/quality.py [--config configs/shakespeare-cpu.yaml] [--max-time 100] [--out FILE.md] [KEY=VALUE ...]

The data is prepared first (tokenizer and shards, timed on its own line); then `slm train CONFIG
train.max_time=T` runs as one plain process, and its wall-clock, start-up included, is timed from outside.
The figure is the last evaluation's val_bpb from the run's metrics.jsonl (the run evaluates when the budget
is spent). The references are nanoGPT's on the same split (the last 10% of tinyshakespeare): its README CPU
recipe, 1.886 nats per character (2.72 bits per byte, about 100-150 s on 2 cores), and its GPU recipe, about
1.47 nats per character (2.12 bits per byte).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.slm_runs import metrics, slm  # noqa: E402
from common.atomic import atomic_write_text  # noqa: E402

TARGET_BPB = 2.10
REFERENCES = [
    ("nanoGPT CPU recipe (README: 4 x 128, 2000 iters, 100-150 s)", 2.72),
    ("nanoGPT GPU recipe (6 x 384, 5000 iters on a GPU)", 2.12),
]


def measure(config: str, max_time: float, overrides: list, work: Path) -> dict:
    data = [f"data.dir={work / 'data'}", *overrides]
    started = time.perf_counter()
    slm(["prepare", config, *data])
    prepare_seconds = time.perf_counter() - started
    run_dir = work / "run"
    started = time.perf_counter()
    slm(["train", config, f"run.dir={run_dir}", f"train.max_time={max_time}", *data])
    wall = time.perf_counter() - started
    evals, train = metrics(run_dir, "eval"), metrics(run_dir, "train")
    if not evals or not train:
        raise SystemExit(
            f"{run_dir / 'metrics.jsonl'} has {len(train)} train and {len(evals)} eval rows; expected both."
        )
    return {
        "prepare_s": prepare_seconds,
        "wall_s": wall,
        "val_bpb": evals[-1]["val_bpb"],
        "val_loss": evals[-1]["val_loss"],
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "final_lr": train[-1]["lr"],
        "data_wait": sum(r["data_wait"] for r in train) / len(train),
    }


def table(config: str, max_time: float, overrides: list, result: dict) -> str:
    shown = " ".join([config, *overrides])
    verdict = (
        "meets" if result["val_bpb"] <= TARGET_BPB else f"misses by {result['val_bpb'] - TARGET_BPB:.3f}"
    ) + f" the target of {TARGET_BPB} bits per byte"
    lines = [
        "| run | val bits/byte | wall-clock | steps | tokens |",
        "|---|---:|---:|---:|---:|",
        f"| `{shown}`, train.max_time={max_time:g} | **{result['val_bpb']:.3f}** | {result['wall_s']:.0f} s "
        f"(prepare {result['prepare_s']:.0f} s more) | {result['steps']} | {result['tokens']:,} |",
    ]
    lines += [f"| {name} | {bpb:.2f} | | | |" for name, bpb in REFERENCES]
    lines += [
        "",
        f"It {verdict}; val loss {result['val_loss']:.4f} nats per token, last lr {result['final_lr']:.2e}, "
        f"mean data wait {100 * result['data_wait']:.1f}% of step time.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shakespeare-cpu.yaml")
    parser.add_argument("--max-time", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slm-bench-quality-") as tmp:
        result = measure(args.config, args.max_time, args.overrides, Path(tmp))
    text = table(args.config, args.max_time, args.overrides, result)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
