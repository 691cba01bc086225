"""A fault matrix: one tiny run killed with SIGKILL at seeded random points, restarted with the same command each
time, compared bitwise with the uninterrupted run. Used by tests/integration/test_fault_matrix.py (5 points) and
bench/fault_matrix.py (20 points).

A point is (step, where): "step" kills as soon as the run prints its train row for that step (so the kill lands
somewhere in the evaluation, the save or the next step), "save" kills inside the save of that step (between
DeepSpeed's files and COMPLETE, held open by SLM_SLEEP_IN_SAVE).
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from tests.helpers import REPO, TINY, run, slm_cmd
from tests.helpers import test_env as make_env
from train.checkpoint import find_checkpoint, load_module_weights

CKPT_EVERY = 2
SHRINK = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.max_seq_len=32",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "schedule.warmup_steps=2",
    "log.every=1",
    "eval.batches=2",
    "eval.every=4",
    f"checkpoint.every={CKPT_EVERY}",
    "data.num_workers=0",
    "checkpoint.keep=2",
    "model.dropout=0.1",  # its masks come from the RNG state each checkpoint saves: they must resume too
]


def command(run_dir: Path, data_dir: Path, steps: int) -> List[str]:
    return slm_cmd(
        ["train", TINY, f"run.dir={run_dir}", f"data.dir={data_dir}", *SHRINK, f"train.max_steps={steps}"]
    )


def kill_points(seed: int, count: int, steps: int) -> List[Tuple[int, str]]:
    """`count` distinct points in increasing step order, at least one inside a save."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(1, steps), count))
    points = [(s, "save" if s % CKPT_EVERY == 0 and rng.random() < 0.5 else "step") for s in chosen]
    if not any(where == "save" for _, where in points):
        saves = [i for i, (s, _) in enumerate(points) if s % CKPT_EVERY == 0] or [0]
        i = saves[0]
        points[i] = (max(CKPT_EVERY, points[i][0] // CKPT_EVERY * CKPT_EVERY), "save")
    return sorted(set(points))


def train_rows(run_dir: Path) -> List[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def final_params(run_dir: Path) -> Dict[str, torch.Tensor]:
    return load_module_weights(find_checkpoint(run_dir))


def kill_at(cmd: List[str], step: int, where: str, timeout: float) -> str:
    """Start the run, SIGKILL it at the point; the output seen ("" markers missed if it finished first)."""
    env = make_env({"SLM_SLEEP_IN_SAVE": f"{step}:600"} if where == "save" else None)
    marker = f"inside the save of step_{step:08d}" if where == "save" else f"train step {step} "
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO)
    )
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
    return "".join(seen)


def run_matrix(
    work_dir: Path, data_dir: Path, seed: int, count: int, steps: int, timeout: float = 1200
) -> dict:
    """The reference run, then the killed run; the comparison, as a dict."""
    reference, faulted = work_dir / "reference", work_dir / "faulted"
    run(command(reference, data_dir, steps), timeout=timeout)
    cmd = command(faulted, data_dir, steps)
    points = kill_points(seed, count, steps)
    for step, where in points:
        kill_at(cmd, step, where, timeout)
    run(cmd, timeout=timeout)  # the last restart finishes the run
    ref_rows, got_rows = train_rows(reference), train_rows(faulted)
    ref_params, got_params = final_params(reference), final_params(faulted)
    return {
        "seed": seed,
        "points": points,
        "steps": steps,
        "losses_equal": [(r["step"], r["loss"]) for r in ref_rows]
        == [(r["step"], r["loss"]) for r in got_rows],
        "steps_once": [r["step"] for r in got_rows] == list(range(1, steps + 1)),
        "params_equal": ref_params.keys() == got_params.keys()
        and all(torch.equal(ref_params[k], got_params[k]) for k in ref_params),
        "done": (faulted / "DONE").is_file(),
    }
