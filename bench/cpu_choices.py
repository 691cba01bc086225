"""What wins on this CPU: bf16 against fp32, torch.compile against eager, Muon against AdamW, per step.

    python bench/cpu_choices.py [--config configs/shakespeare-cpu.yaml] [--steps 30] [--out FILE.md]

Each variant is a real `slm train CONFIG` process (one process, the recipe's model, batch and ZeRO stage) run
for --steps steps at a constant learning rate, with a fresh, empty inductor cache (TORCHINDUCTOR_CACHE_DIR),
so compilation is paid as a first run pays it. From its metrics.jsonl: the first step's time (where
compilation happens), the median time of the steps after the first five, and the process's wall-clock. The
last column is what a 100 s budget buys: the steps that fit after start-up and the first step. Whether a
faster step also learns enough per step is the quality benchmark's question (bench/quality.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.slm_runs import metrics, slm  # noqa: E402
from common.atomic import atomic_write_text  # noqa: E402

BUDGET_S = 100.0
VARIANTS = [
    ("fp32, AdamW, eager", ["train.precision=fp32", "optim.name=adamw"]),
    ("bf16, AdamW, eager", ["optim.name=adamw"]),
    ("bf16, AdamW, torch.compile", ["optim.name=adamw", "train.compile=true"]),
    ("bf16, Muon (standard Newton-Schulz), eager", ["optim.name=muon", "optim.muon_ns_method=standard"]),
    ("bf16, Muon (gram Newton-Schulz), eager", ["optim.name=muon", "optim.muon_ns_method=gram"]),
    (
        "bf16, Muon (standard), torch.compile (model and Muon kernels)",
        ["optim.name=muon", "optim.muon_ns_method=standard", "train.compile=true"],
    ),
]


def measure(config: str, overrides: list, steps: int, work: Path) -> dict:
    """One fresh `slm train` process; first-step seconds, steady step ms and wall-clock from its metrics."""
    run_dir = work / "run"
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"),
        WANDB_MODE="disabled",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
    )
    started = time.perf_counter()
    slm(
        [
            "train",
            config,
            f"run.dir={run_dir}",
            f"data.dir={work.parent / 'data'}",
            f"train.max_steps={steps}",
            "train.max_time=null",
            "schedule.name=constant",
            "schedule.warmup_steps=1",
            "log.every=1",
            f"eval.every={steps}",
            "eval.batches=1",
            f"checkpoint.every={steps}",
            "log.console=false",
            *overrides,
        ],
        env,
    )
    wall = time.perf_counter() - started
    step_ms = [r["step_ms"] for r in metrics(run_dir, "train")]
    if len(step_ms) != steps:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has {len(step_ms)} train rows; expected {steps}.")
    steady = statistics.median(step_ms[5:])
    first = step_ms[0] / 1000
    startup = wall - sum(step_ms) / 1000  # process start, engine, eval and the final checkpoint
    return {
        "first_s": first,
        "steady_ms": steady,
        "wall_s": wall,
        "budget_steps": max(0, int((BUDGET_S - startup - first) / (steady / 1000)) + 1),
    }


def table(results: list, tokens_per_step: int) -> str:
    base = next(r for name, r in results if name == "bf16, AdamW, eager")
    lines = [
        "| variant | first step | later steps | tokens/s | vs bf16 AdamW eager | steps in 100 s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results:
        lines.append(
            f"| {name} | {r['first_s']:.1f} s | {r['steady_ms']:.0f} ms | "
            f"{tokens_per_step / (r['steady_ms'] / 1000):,.0f} | {base['steady_ms'] / r['steady_ms']:.2f}x | "
            f"{r['budget_steps']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shakespeare-cpu.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from launch.config import load_config

    cfg = load_config(args.config, args.overrides)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.model.max_seq_len
    results = []
    with tempfile.TemporaryDirectory(prefix="slm-bench-choices-") as tmp:
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        slm(["prepare", args.config, f"data.dir={Path(tmp) / 'data'}", *args.overrides], env)
        for index, (name, overrides) in enumerate(VARIANTS):
            work = Path(tmp) / f"variant{index}"
            work.mkdir()
            results.append((name, measure(args.config, [*args.overrides, *overrides], args.steps, work)))
            print(f"[cpu_choices] {name}: {results[-1]}", flush=True)
    text = table(results, tokens_per_step)
    text += (
        "\n\nFirst step: the step where torch.compile compiles (cold cache). On CPU, slm train runs "
        "DeepSpeed's Muon kernels eagerly unless train.compile=true (train.optim.set_compile_stance)."
    )
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
