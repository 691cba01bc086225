"""Peak memory and time of one training step's loss: full float32 logits against the chunked cross-entropy.

    python bench/loss_memory.py [--vocab 50304] [--batch 8] [--seq 1024] [--chunk 1024] [--out FILE]

A small model (2 layers, 256 wide) with a 50k vocabulary at 8 x 1024 tokens, where the logits dominate:
each variant runs forward + backward once in a fresh process (so one's allocations cannot hide the other's)
and reports its peak resident memory above the resident memory just before the step (model, batch and the
torch runtime excluded), from getrusage. The plain path's float32 logits alone are B*T*V*4 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_step(vocab: int, batch: int, seq: int, chunk: int) -> dict:
    """In this process: build the model, then time and measure one forward + backward."""
    import torch

    sys.path.insert(0, str(REPO))
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=2,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab,
        max_seq_len=seq,
        loss_chunk_tokens=chunk,
    )
    model = Transformer(cfg).train()
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    for p in model.parameters():  # gradient buffers exist before the step in a real loop too
        p.grad = torch.zeros_like(p)
    before = resident_bytes()
    started = time.perf_counter()
    _, loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"loss": loss.item(), "peak_above_start": peak - before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_step(args.vocab, args.batch, args.seq, args.child)))
        return
    results = {}
    for chunk in (0, args.chunk):
        cmd = [
            sys.executable,
            __file__,
            f"--vocab={args.vocab}",
            f"--batch={args.batch}",
            f"--seq={args.seq}",
            f"--child={chunk}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[chunk] = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_gb = args.batch * args.seq * args.vocab * 4 / 1e9
    lines = [
        f"Loss memory: 2 layers x 256 wide, vocabulary {args.vocab}, micro-batch {args.batch} x {args.seq} "
        f"(float32 logits alone: {logits_gb:.2f} GB), one forward + backward on CPU.",
        "",
        "| loss path | peak memory above start | step time | loss |",
        "|---|---:|---:|---:|",
    ]
    for chunk, r in results.items():
        name = (
            "full float32 logits (loss_chunk_tokens=0)"
            if chunk == 0
            else f"chunked (loss_chunk_tokens={chunk})"
        )
        lines.append(
            f"| {name} | {r['peak_above_start'] / 1e9:.2f} GB | {r['seconds']:.2f} s | {r['loss']:.4f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
