"""Throughput of the data pipeline on this machine, against what it has to keep up with.

1. prepare: `slm prepare`'s tokens/s (streaming read, worker processes, shard + manifest writing, with an
   existing tokenizer so BPE training is not timed) against the bare `Tokenizer.encode_batch` rate on the
   same documents and the same cores (Rust threads on every core). Goal: overhead under 10%.
2. loader: tokens/s the training loader delivers (tiny preset: micro-batch 8, seq 128) against the tokens/s
   the tiny model consumes in a plain torch training step (forward, backward, AdamW, bf16 autocast).
   Goal: at least 100 times.

    .venv/bin/python bench/data_pipeline.py [--copies 16] [--repeats 3] [--out results.md]

Timings take the median of --repeats interleaved runs, since the machine may be shared; CPU-seconds (this
process, its threads and its worker processes) are reported too, as they depend less on other load.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch  # noqa: E402

from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig  # noqa: E402
from data_pipeline.format.manifest import load_manifest  # noqa: E402
from data_pipeline.loading.loader import build_loader  # noqa: E402
from data_pipeline.prepare.common import resolve_num_proc  # noqa: E402
from data_pipeline.prepare.dispatch import prepare  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402
from launch.config import load_config  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


def machine() -> Dict[str, str]:
    model = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores (nproc)": str(resolve_num_proc(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "load average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its reaped children (prepare's worker pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def bench_prepare(work: Path, copies: int, repeats: int) -> Dict[str, float]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join([text.rstrip("\n")] * copies) + "\n", encoding="utf-8")
    tokenizer_path = work / "tokenizer.json"
    save_tokenizer(train_tokenizer([text], vocab_size=4096, threads=resolve_num_proc(0)), tokenizer_path)
    num_proc = resolve_num_proc(0)
    data_dir = work / "data"

    def run_prepare(processes: int) -> None:
        shutil.rmtree(data_dir, ignore_errors=True)
        cfg = DataConfig(
            dir=str(data_dir),
            sources=[SourceConfig(path=str(corpus), doc_boundary="blank_line")],
            shard_tokens=1 << 20,
            num_proc=processes,
        )
        prepare(cfg, TokenizerConfig(path=str(tokenizer_path)))

    documents = [d for d in corpus.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    tokenizer = load_tokenizer(tokenizer_path)

    def bare(method: str, threads: bool = True, ids: bool = False) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"  # Rust threads on every core
        try:
            encodings = getattr(tokenizer, method)(documents, add_special_tokens=False)
            if ids:
                [encoding.ids for encoding in encodings]
        finally:
            os.environ["TOKENIZERS_PARALLELISM"] = (
                "false"  # set before any fork: workers never use Rust threads
            )

    # Interleaved, so that pipeline and baseline see the same load from whatever else runs on the machine.
    runs = {
        "prepare": lambda: run_prepare(num_proc),
        "encode_batch": lambda: bare("encode_batch"),
        "encode_batch_fast": lambda: bare("encode_batch_fast"),
        "prepare_1": lambda: run_prepare(1),
        "encode_batch_1": lambda: bare("encode_batch", threads=False),
        "encode_batch_ids_1": lambda: bare("encode_batch", threads=False, ids=True),
    }
    times: Dict[str, List[tuple]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    tokens = load_manifest(data_dir).tokens("train") + load_manifest(data_dir).tokens("val")
    rates = {name: tokens / statistics.median(wall for wall, _ in runs_) for name, runs_ in times.items()}
    per_cpu = {
        f"{name}_cpu": tokens / statistics.median(cpu for _, cpu in runs_) for name, runs_ in times.items()
    }
    return {
        "text_mb": corpus.stat().st_size / 1e6,
        "tokens": tokens,
        "num_proc": num_proc,
        **rates,
        **per_cpu,
    }


def bench_loader(data_dir: Path, num_workers: int, seconds: float) -> float:
    loader = build_loader(data_dir, "train", 128, 8, 0, 1, seed=0, num_workers=num_workers)
    for _ in range(50):
        next(loader)
    batches, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            next(loader)
        batches += 100
    elapsed = time.perf_counter() - started
    loader.close()
    return batches * 8 * 128 / elapsed


def bench_model(steps: int) -> float:
    """Tokens/s the tiny model consumes: forward + backward + AdamW at micro-batch 8, seq 128, bf16 autocast."""
    from model import Transformer

    cfg = load_config(str(TINY)).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.vocab_size, (8, 129))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    seconds = best_time(lambda: [step() for _ in range(steps)], 3) / steps
    return 8 * 128 / seconds


def report(info: Dict[str, str], prep: Dict[str, float], loader: Dict[int, float], model: float) -> str:
    def overhead(baseline: str, ours: str = "prepare") -> str:
        return (
            f"{1 - prep[ours] / prep[baseline]:.1%} | {1 - prep[ours + '_cpu'] / prep[baseline + '_cpu']:.1%}"
        )

    def rates(name: str) -> str:
        return f"{prep[name]:,.0f} | {prep[name + '_cpu']:,.0f}"

    lines: List[str] = ["| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
    lines += [
        "",
        f"Prepare: tinyshakespeare x{prep['text_mb'] / 1.115:.0f} ({prep['text_mb']:.1f} MB, {prep['tokens']:,} tokens, "
        f"blank-line documents, vocab 4096), {prep['num_proc']} tokenizer processes.",
        "",
        "| | tokens/s (wall) | tokens per CPU-second | prepare's overhead (wall) | prepare's overhead (CPU) |",
        "|---|---:|---:|---:|---:|",
        f"| `slm prepare`, data.num_proc={prep['num_proc']} (read, tokenize, write shards + manifest) "
        f"| {rates('prepare')} | | |",
        f"| bare `Tokenizer.encode_batch`, Rust threads on all cores | {rates('encode_batch')} "
        f"| {overhead('encode_batch')} |",
        f"| bare `Tokenizer.encode_batch_fast`, Rust threads on all cores | {rates('encode_batch_fast')} "
        f"| {overhead('encode_batch_fast')} |",
        f"| `slm prepare`, data.num_proc=1 | {rates('prepare_1')} | | |",
        f"| bare `Tokenizer.encode_batch`, one thread | {rates('encode_batch_1')} "
        f"| {overhead('encode_batch_1', 'prepare_1')} |",
        f"| bare `Tokenizer.encode_batch` + reading `.ids` (the least any pipeline does), one thread "
        f"| {rates('encode_batch_ids_1')} | {overhead('encode_batch_ids_1', 'prepare_1')} |",
        "",
        "Loader: train split, micro-batch 8, seq 128 (input tokens counted).",
        "",
        "| | tokens/s | x tiny model's consumption |",
        "|---|---:|---:|",
    ]
    for workers, rate in loader.items():
        lines.append(f"| loader, num_workers={workers} | {rate:,.0f} | {rate / model:,.0f}x |")
    lines.append(
        f"| tiny model training step (fwd + bwd + AdamW, bf16 autocast, {torch.get_num_threads()} threads) "
        f"| {model:,.0f} | 1x |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=16, help="tinyshakespeare copies in the prepare corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-seconds", type=float, default=3.0)
    parser.add_argument("--model-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="slm-bench-") as tmp:
        work = Path(tmp)
        prep = bench_prepare(work, args.copies, args.repeats)
        loader = {w: bench_loader(work / "data", w, args.loader_seconds) for w in (0, 2)}
    model = bench_model(args.model_steps)
    text = report(info, prep, loader, model)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
