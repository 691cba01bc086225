"""Per-step cost of `slm train`'s loop against the bare loop, in one process, interleaved (for profiling overhead).

    python bench/train_step_profile.py [--preset configs/tiny.yaml] [--rounds 6] [--steps 20] [--cprofile OUT]
        [KEY=VALUE ...]

Builds the real run (`train.startup.set_up_run`, the standard components, `train.loop.TrainingLoop`) and the bare
loop of bench/train_throughput.py over the same config, then alternates blocks of `--steps` steps of each so both
share the machine's noise. Reports the median per-step wall and CPU time (this process's CPU seconds: on a shared
machine the CPU time moves far less with the load than the wall time). `--cprofile` writes a cProfile of the slm
steps only (set-up excluded), to read with pstats.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_throughput import BareLoop  # noqa: E402
from launch.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cprofile", type=Path, default=None)
    parser.add_argument(
        "--cprofile-label", default="slm", help="the run --cprofile profiles (slm, a variant, bare)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="another slm run, 'LABEL|key=value ...' over the overrides",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from train.distributed import setup_distributed, with_auto_resolved
    from train.loop import TrainingLoop
    from train.signals import StopRequest
    from train.standard_components import standard_components
    from train.startup import set_up_run
    from train.trainer import loop_run

    total = args.rounds * args.steps + args.steps
    variants = [("slm", [])] + [(v.split("|")[0], v.split("|", 1)[1].split()) for v in args.variant]
    tmp = tempfile.mkdtemp(prefix="step-profile-")
    base = [
        f"train.precision={args.precision}",
        f"train.max_steps={total + 10}",
        "train.max_time=1000000",
        f"checkpoint.every={10 * total}",
        f"eval.every={10 * total}",
        "log.console=false",
        *args.overrides,
    ]
    cfg = load_config(args.preset, base)
    dist_info = setup_distributed(cfg.train)
    runs = []
    for index, (label, extra) in enumerate(variants):
        cfg = load_config(args.preset, [f"run.dir={tmp}/run{index}", *base, *extra])
        cfg = with_auto_resolved(cfg, dist_info.device.type, dist_info.is_main)
        setup = set_up_run(cfg, dist_info)
        cfg = setup.cfg
        run = loop_run(setup, dist_info)
        loop = TrainingLoop(run, setup.train_loader, standard_components(cfg))
        for component in loop.components:
            component.on_start(run)
        run.engine.train()
        runs.append((label, loop, iter(setup.train_loader)))
    stop = StopRequest()
    bare = BareLoop(cfg, Path(cfg.data.dir), cfg.train.precision)
    profiler = cProfile.Profile() if args.cprofile else None

    def block(label, take_step, times) -> None:
        for _ in range(args.steps):
            wall, cpu = time.perf_counter(), time.process_time()
            if profiler and label == args.cprofile_label:
                profiler.enable()
            take_step()
            if profiler and label == args.cprofile_label:
                profiler.disable()
            times.setdefault(label, []).append((time.perf_counter() - wall, time.process_time() - cpu))

    steppers = [(label, lambda loop=loop, it=it: loop.step(it, stop)) for label, loop, it in runs]
    steppers.append(("bare", bare.step))
    warm: dict = {}
    for label, take_step in steppers:
        block(label, take_step, warm)
    times: dict = {}
    for _ in range(args.rounds):
        for label, take_step in steppers:
            block(label, take_step, times)
    for _, loop, _ in runs:
        loop.run.logger.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if profiler:
        profiler.dump_stats(str(args.cprofile))
    med = {
        label: (1e3 * statistics.median(w for w, _ in t), 1e3 * statistics.median(c for _, c in t))
        for label, t in times.items()
    }
    bare_wall, bare_cpu = med["bare"]
    print(
        f"{Path(args.preset).name} {cfg.train.precision} {' '.join(args.overrides)}; "
        f"{args.rounds} rounds x {args.steps} steps; load {os.getloadavg()[0]:.1f}"
    )
    for label, (wall, cpu) in med.items():
        print(
            f"  {label:<40} {wall:7.1f} ms wall ({100 * (wall / bare_wall - 1):+5.1f}%)  "
            f"{cpu:7.1f} ms CPU ({100 * (cpu / bare_cpu - 1):+5.1f}%)"
        )


if __name__ == "__main__":
    main()
