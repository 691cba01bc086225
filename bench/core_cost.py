"""What the downstream core score costs inside a training run: seconds per evaluation at a model shape, per task.

    python bench/core_cost.py [--preset configs/125m.yaml] [--limit 100] [--tasks core|all|a,b] [--batch-size 32]
                              [--data-dir DIR] [--train-microbatches 1]

A freshly initialised model of the preset's shape (the speed of a forward pass does not depend on the weights'
values) scores each task's fixed --limit examples in fp32 with `score_tasks`, as the DownstreamEval component
does, after one untimed warm-up pass on a few examples. The tokenizer is the tiny preset's 4,096-token BPE
trained on tinyshakespeare: it splits text into more tokens than the presets' 50k vocabulary, so the figures
err on the costly side. With --train-microbatches K it also times K forward-backward passes of one
micro-batch of the preset (fp32, activation checkpointing as configured) to put the evaluation beside a step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.tokenizer import train_tokenizer  # noqa: E402
from launch.config import load_config  # noqa: E402
from model import Transformer  # noqa: E402
from train.downstream.evaluate import build_task_requests, score_tasks  # noqa: E402
from train.downstream.fetch import default_cache_dir  # noqa: E402
from train.downstream.tasks import TASKS, expand_task_names  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default=str(REPO / "configs" / "125m.yaml"))
    parser.add_argument("--tasks", default="core")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-microbatches", type=int, default=0)
    args = parser.parse_args()
    cfg = load_config(args.preset, [])
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    params = sum(p.numel() for p in model.parameters())
    text = (REPO / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
    tokenizer = train_tokenizer(iter(text), 4096)
    names = (
        [t for t in TASKS if t != "lambada_openai"]
        if args.tasks == "all"
        else expand_task_names(args.tasks.split(","))
    )
    data_dir = args.data_dir or str(default_cache_dir())
    print(
        f"{args.preset}: {params / 1e6:.1f} M parameters, {torch.get_num_threads()} threads, limit {args.limit}"
    )
    warm = build_task_requests(names[:1], tokenizer, limit=4, seed=1234, data_dir=data_dir)
    score_tasks(model, warm, batch_size=args.batch_size)
    total = 0.0
    for name in names:
        requests = build_task_requests([name], tokenizer, limit=args.limit, seed=1234, data_dir=data_dir)
        started = time.perf_counter()
        score_tasks(model, requests, batch_size=args.batch_size)
        seconds = time.perf_counter() - started
        total += seconds
        rows = sum(len(pairs) for pairs in requests[0].tokens)
        print(f"{name:<16}{requests[0].total:>6} examples {rows:>6} rows {seconds:>9.1f} s", flush=True)
    print(f"{'total':<16}{'':>30}{total:>9.1f} s")
    if args.train_microbatches:
        model.train()
        micro, seq = cfg.train.micro_batch_size, cfg.model.max_seq_len
        ids = torch.randint(0, cfg.model.vocab_size, (micro, seq + 1))
        started = time.perf_counter()
        for _ in range(args.train_microbatches):
            _, loss = model(ids[:, :-1], targets=ids[:, 1:])
            loss.backward()
        seconds = (time.perf_counter() - started) / args.train_microbatches
        per_step = seconds * cfg.train.grad_accum_steps
        print(
            f"train: {seconds:.1f} s per micro-batch of {micro} x {seq}; a step of {cfg.train.grad_accum_steps} "
            f"micro-batches {per_step:.1f} s on this world size of 1"
        )


if __name__ == "__main__":
    main()
