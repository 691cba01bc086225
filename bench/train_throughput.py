"""Throughput of `slm train` against a bare PyTorch loop over the same model and batches.

    python bench/train_throughput.py [--steps 120] [--repeats 3] [--precisions fp32,bf16] [--threads N]

For each precision, alternately (to share the machine's noise fairly):
  * `slm train configs/tiny.yaml` as one plain process (DeepSpeed ZeRO-2, our loader, LR schedule,
    non-finite checks, metrics), whose tokens/s is read back from metrics.jsonl, skipping the first
    logging window as warm-up (eval and checkpoint time are not in those windows);
  * a bare loop in this process without DeepSpeed: the same Transformer, the same loader batches,
    the same AdamW param groups and gradient clipping; for bf16 the model runs in bf16 with an fp32
    master copy for AdamW, which is what DeepSpeed's bf16 optimizer does.
Both are reported as tokens/s and achieved FLOP/s (model.stats.flops_per_token x tokens/s), and
against this machine's measured matmul peak (train.mfu.measure_matmul_peak) of the same dtype. The
framework's overhead is 1 - slm / bare (goal: under 5%). Medians over the repeats are printed as a
markdown table for docs/benchmarks-train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.loading.loader import build_loader  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, model_vocab_size  # noqa: E402
from launch.config import load_config  # noqa: E402
from model import Transformer  # noqa: E402
from model.stats import flops_per_token  # noqa: E402
from train.mfu import measure_matmul_peak  # noqa: E402
from train.optim import param_groups  # noqa: E402
from train.schedule import lr_at  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def slm_train_tokens_per_second(
    preset: str, data_dir: Path, precision: str, steps: int, log_every: int, threads: int, overrides: list
) -> float:
    """Mean tokens/s of the logged windows of a real `slm train` process, first window excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "launch",
            "train",
            preset,
            f"run.dir={run_dir}",
            f"data.dir={data_dir}",
            f"train.precision={precision}",
            f"train.max_steps={steps}",
            f"log.every={log_every}",
            f"eval.every={steps}",
            f"checkpoint.every={steps}",
            "eval.batches=1",
            "log.console=false",
            *overrides,
        ]
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(threads),
            WANDB_MODE="disabled",
            HF_DATASETS_OFFLINE="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=str(REPO),
        )
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"slm train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        windows = [r["tokens_per_second"] for r in rows if r.get("kind") == "train"][1:]
        # Windows are equally long, so the mean of their rates is the overall rate.
        return statistics.mean(windows)


def bare_loop_tokens_per_second(cfg, data_dir: Path, precision: str, steps: int, warmup: int) -> float:
    """tokens/s of a plain PyTorch training loop over the same model, batches, optimizer and clipping."""
    torch.manual_seed(cfg.run.seed)
    dtype = DTYPES[precision]
    model = Transformer(cfg.model)
    groups = param_groups(model, cfg.optim.weight_decay)
    model.to(dtype)
    params = [p for g in groups for p in g["params"]]
    if dtype == torch.float32:
        master_groups, masters = groups, params
    else:  # fp32 master weights, as DeepSpeed's bf16 optimizer keeps them
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        by_param = dict(zip(map(id, params), masters))
        master_groups = [{**g, "params": [by_param[id(p)] for p in g["params"]]} for g in groups]
    optimizer = torch.optim.AdamW(
        master_groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps
    )
    loader = iter(
        build_loader(data_dir, "train", cfg.model.max_seq_len, cfg.train.micro_batch_size, 0, 1, cfg.run.seed)
    )
    tokens_per_step = cfg.train.micro_batch_size * cfg.model.max_seq_len * cfg.train.grad_accum_steps
    elapsed = 0.0
    for step in range(steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.schedule, cfg.optim.lr, cfg.train.max_steps)
        for _ in range(cfg.train.grad_accum_steps):
            batch = next(loader)
            _, loss = model(batch["input_ids"], targets=batch["labels"])
            (loss / cfg.train.grad_accum_steps).backward()
        if masters is not params:
            for p, m in zip(params, masters):
                m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(masters, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masters is not params:
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
                    p.grad = None
        loss.item()  # the host learns the loss every step, as slm train does
        if step >= warmup:
            elapsed += time.perf_counter() - started
    return tokens_per_step * (steps - warmup) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--data-dir", default=str(REPO / "runs" / "data" / "tiny"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument(
        "overrides", nargs="*", help="extra key=value overrides for slm train, e.g. train.zero_stage=0"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    cfg = load_config(args.preset, [f"data.dir={args.data_dir}"])
    data_dir = Path(args.data_dir)
    if not (data_dir / "manifest.json").is_file():
        from data_pipeline.prepare.dispatch import prepare

        prepare(cfg.data, cfg.tokenizer)
    vocab = model_vocab_size(load_tokenizer(data_dir / "tokenizer.json"))
    cfg = load_config(args.preset, [f"data.dir={args.data_dir}", f"model.vocab_size={vocab}"])
    flops = flops_per_token(cfg.model, cfg.model.max_seq_len)

    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {args.threads} thread(s); preset {Path(args.preset).name}: "
        f"{cfg.train.micro_batch_size} x {cfg.model.max_seq_len} tokens per step, {flops / 1e6:.1f} MFLOP/token; "
        f"slm train overrides: {' '.join(args.overrides) or 'none'}",
        "",
        "| precision | matmul peak | slm train tok/s | bare loop tok/s | slm FLOP/s (% of peak) "
        "| bare FLOP/s (% of peak) | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for precision in args.precisions.split(","):
        peak = measure_matmul_peak(DTYPES[precision], size=1024, seconds=2.0, device="cpu")
        slm, bare = [], []
        for _ in range(args.repeats):
            slm.append(
                slm_train_tokens_per_second(
                    args.preset, data_dir, precision, args.steps, args.log_every, args.threads, args.overrides
                )
            )
            bare.append(bare_loop_tokens_per_second(cfg, data_dir, precision, args.steps, args.log_every))
        slm_tps, bare_tps = statistics.median(slm), statistics.median(bare)
        lines.append(
            f"| {precision} | {peak / 1e9:.1f} GFLOP/s | {slm_tps:,.0f} | {bare_tps:,.0f} "
            f"| {slm_tps * flops / 1e9:.2f} G ({100 * slm_tps * flops / peak:.1f}%) "
            f"| {bare_tps * flops / 1e9:.2f} G ({100 * bare_tps * flops / peak:.1f}%) "
            f"| {100 * (1 - slm_tps / bare_tps):+.1f}% |"
        )
        print(lines[-1], flush=True)
        print(f"  (runs: slm {[round(x) for x in slm]}, bare {[round(x) for x in bare]})", flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
