"""Training time blocked per checkpoint save: synchronous against checkpoint.async_save, to a local folder and to a
real S3 server (SeaweedFS on loopback, tests/s3_localhost.py), at the tiny shape and a ~50M one.

Each cell is one `slm train` of a few steps saving every 2 steps; the blocked time of a save is what the run's
status line reports: "saved checkpoint ... (X s)" when synchronous, "states written in X s" when asynchronous
(the rest overlaps the next steps). Prints a markdown table (the line in docs/benchmarks-train.md comes from it).

    python bench/checkpoint_save.py [--steps 6] [--shapes tiny,50m] [--targets local,s3] [--modes sync,async]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.slm_runs import prepare_tiny_shakespeare, slm  # noqa: E402
from tests.helpers import TINY  # noqa: E402
from tests.s3_localhost import BUCKET, start_s3  # noqa: E402

SHAPES = {
    "tiny": [],
    "50m": [
        "model.n_layers=10",
        "model.d_model=640",
        "model.n_heads=10",
        "model.n_kv_heads=10",
        "model.ffn_hidden=1792",
        "model.max_seq_len=64",
        "train.micro_batch_size=2",
    ],
}
"""Overrides of configs/tiny.yaml; 50m: 51M parameters in the layers plus a 2.6M tied embedding (4096 tokens)."""
BLOCKED = re.compile(r"(?:saved checkpoint \S+ \((\d+\.\d+) s\)|states written in (\d+\.\d+) s)")
WAITED = re.compile(r"(\d+\.\d+) s of it waited for\)")


def blocked_seconds(stderr: str) -> list:
    """The blocked time of every save of a run, from its status lines: the whole save when synchronous; with
    async_save the writing of the states plus, spread evenly, every wait for a save in flight (at the next save
    and at the end of the run: "saved checkpoint ... (X s; Y s of it waited for)")."""
    saves = [float(a or b) for a, b in BLOCKED.findall(stderr)]
    waited = sum(float(w) for w in WAITED.findall(stderr))
    return [s + waited / len(saves) for s in saves] if saves else saves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--shapes", default="tiny,50m")
    parser.add_argument("--targets", default="local,s3")
    parser.add_argument("--modes", default="sync,async")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    data = prepare_tiny_shakespeare(scratch / "data")
    (scratch / "s3").mkdir()
    servers = start_s3(scratch / "s3")
    server = next(servers)
    env = {**os.environ, **server.env, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    rows = []
    try:
        for shape in args.shapes.split(","):
            for target in args.targets.split(","):
                for mode in args.modes.split(","):
                    run_dir = scratch / f"{shape}-{target}-{mode}"
                    remote = (
                        [f"checkpoint.dir=s3://{BUCKET}/bench-{uuid.uuid4().hex[:8]}"]
                        if target == "s3"
                        else []
                    )
                    proc = slm(
                        [
                            "train",
                            TINY,
                            f"run.dir={run_dir}",
                            f"data.dir={data}",
                            f"data.cache_dir={scratch / 'cache'}",
                            "train.precision=fp32",
                            f"train.max_steps={args.steps}",
                            "schedule.warmup_steps=1",
                            "checkpoint.every=2",
                            "checkpoint.keep=2",
                            f"checkpoint.async_save={mode == 'async'}",
                            f"eval.every={args.steps}",
                            *remote,
                            *SHAPES[shape],
                        ],
                        env=env,
                    )
                    saves = blocked_seconds(proc.stderr)
                    rows.append((shape, target, mode, len(saves), statistics.mean(saves), max(saves)))
                    print(f"{shape} {target} {mode}: {saves}", file=sys.stderr)
    finally:
        servers.close()
    print("| shape | checkpoint.dir | save | saves | blocked per save (mean) | max |")
    print("|---|---|---|---|---|---|")
    for shape, target, mode, count, mean, peak in rows:
        print(f"| {shape} | {target} | {mode} | {count} | {mean:.2f} s | {peak:.2f} s |")


if __name__ == "__main__":
    main()
