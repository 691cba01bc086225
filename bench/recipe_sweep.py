"""The sweep behind configs/shakespeare-cpu.yaml: each variant's val bits per byte at the steps a budget buys it.

    python bench/recipe_sweep.py [--budget 100] [--only NAME,...] [--out docs/benchmarks-recipe.md]

A time-budgeted run's result moves with the machine's noise (a busier second means fewer steps), which
hides differences of a few hundredths of a bit. So each variant is measured in two parts: a short timed
probe gives its seconds per step on this machine; then a deterministic run trains it for the steps that fit
the budget (less a fixed start-up allowance) with the step-counted wsd schedule, and its final val_bpb is
the figure. Two runs of one variant at the same step count give the same number, so the table ranks the
variants by what they learn, and bench/quality.py then checks the winner against the real clock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.slm_runs import metrics, slm  # noqa: E402
from common.atomic import atomic_write_text  # noqa: E402

CONFIG = "configs/shakespeare-cpu.yaml"
STARTUP_S = 6.0
"""Seconds of the budget taken by start-up, the final evaluation and checkpoint (measured: 4-7 s)."""
PROBE_STEPS = 20
VARIANTS = [
    ("recipe", []),
    ("vocabulary 384", ["tokenizer.vocab_size=384", "model.vocab_size=384"]),
    ("vocabulary 1024", ["tokenizer.vocab_size=1024", "model.vocab_size=1024"]),
    ("vocabulary 4096", ["tokenizer.vocab_size=4096", "model.vocab_size=4096"]),
    ("dropout 0.1", ["model.dropout=0.1"]),
    ("3 layers", ["model.n_layers=3"]),
    ("width 320", ["model.d_model=320", "model.n_heads=5", "model.n_kv_heads=5", "model.ffn_hidden=960"]),
    ("MLP 1024", ["model.ffn_hidden=1024"]),
    ("batch 24", ["train.micro_batch_size=24"]),
    ("sequence 512, batch 8", ["model.max_seq_len=512", "train.micro_batch_size=8"]),
    ("muon_lr 0.02", ["optim.muon_lr=0.02"]),
    ("decay over 40%", ["schedule.decay_fraction=0.4"]),
    ("AdamW instead of Muon", ["optim.name=adamw"]),
]
"""Variants of the recipe, one change each (a variant that repeats the recipe's own value is the recipe again)."""


def train(work: Path, name: str, data_dir: Path, steps: int, overrides: list) -> Path:
    run_dir = work / name
    slm(
        [
            "train",
            CONFIG,
            f"run.dir={run_dir}",
            f"data.dir={data_dir}",
            "train.max_time=null",
            "schedule.name=wsd",
            f"train.max_steps={steps}",
            "eval.every=100000",
            "log.every=1",
            "log.console=false",
            *overrides,
        ]
    )
    return run_dir


def measure(work: Path, name: str, overrides: list, budget: float) -> dict:
    tokenizer_keys = [o for o in overrides if o.startswith("tokenizer.")]
    data_dir = work / "-".join(["data", *tokenizer_keys])
    if not (data_dir / "manifest.json").is_file():
        slm(["prepare", CONFIG, f"data.dir={data_dir}", *overrides])
    probe = train(work, f"{name}-probe", data_dir, PROBE_STEPS, [*overrides, "schedule.warmup_steps=2"])
    seconds_per_step = statistics.median(r["step_ms"] for r in metrics(probe, "train")[4:]) / 1000
    steps = int((budget - STARTUP_S) / seconds_per_step)
    run_dir = train(work, name, data_dir, steps, overrides)
    final = metrics(run_dir, "eval")[-1]
    return {
        "seconds_per_step": seconds_per_step,
        "steps": steps,
        "tokens": final["tokens"],
        "val_bpb": final["val_bpb"],
    }


def table(results: list, budget: float) -> str:
    best = min(r["val_bpb"] for _, _, r in results)
    lines = [
        f"| variant (over the recipe) | s per step | steps in {budget:g} s | tokens | val bits/byte |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, overrides, r in results:
        shown = f"{name} (`{' '.join(overrides)}`)" if overrides else name
        bpb = f"**{r['val_bpb']:.3f}**" if r["val_bpb"] == best else f"{r['val_bpb']:.3f}"
        lines.append(f"| {shown} | {r['seconds_per_step']:.3f} | {r['steps']} | {r['tokens']:,} | {bpb} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=100.0)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chosen = [v for v in VARIANTS if args.only is None or v[0] in args.only.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="slm-bench-sweep-") as tmp:
        for index, (name, overrides) in enumerate(chosen):
            results.append((name, overrides, measure(Path(tmp), f"variant{index}", overrides, args.budget)))
            print(f"[sweep] {name}: {results[-1][2]}", flush=True)
    text = table(results, args.budget)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
