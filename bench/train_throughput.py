"""Throughput of `slm train` against a bare PyTorch loop over the same model and batches.

    python bench/train_throughput.py [--shapes tiny,recipe] [--precisions fp32,bf16] [--stages 0,1,2,3]
        [--steps 60] [--log-every 10] [--repeats 3] [--threads 1] [--out FILE.md]

One row per shape (tiny: configs/tiny.yaml; recipe: configs/shakespeare-cpu.yaml with its time budget lifted) and
precision, one process; then one row per ZeRO stage on 2 processes (torchrun, gloo, 1 thread each) at the tiny shape
in fp32. Each row alternates, `--repeats` times (to share the machine's noise fairly):
  * `slm train` (DeepSpeed, our loader, LR schedule, non-finite checks, metrics), whose tokens/s is read back from
    metrics.jsonl, skipping the first logging window as warm-up (eval and checkpoint time are not in those windows);
  * the bare loop (`BareLoop`) without DeepSpeed: the same Transformer, loader batches, optimizer (AdamW, or the
    recipe's MuonWithAuxAdam), LR schedule and gradient clipping; for bf16 the model runs in bf16 with an fp32
    master copy, which is what DeepSpeed's bf16 optimizer does; on 2 processes under torchrun with torch's
    DistributedDataParallel, each rank reading its share of the batches as slm train does.
Both are reported as tokens/s and achieved FLOP/s (model.stats.flops_per_token x tokens/s). The framework's
overhead is 1 - slm / bare (goal: under 5%). Medians over the repeats; the table is printed as markdown for
docs/benchmarks-train.md, headed by the CPU, torch.backends.cpu.get_cpu_capability() and the load average.
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
from train.optim import group_lr, param_groups  # noqa: E402
from train.schedule import lr_at  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def slm_train_tokens_per_second(
    preset: str,
    data_dir: Path,
    precision: str,
    steps: int,
    log_every: int,
    threads: int,
    overrides: list,
    nproc: int = 1,
    repo: Path = REPO,
) -> float:
    """Mean tokens/s of the logged windows of a real `slm train` process, first window excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            *([sys.executable] if nproc == 1 else torchrun(nproc)),
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
            PYTHONPATH=str(repo),
        )
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"slm train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        windows = [r["tokens_per_second"] for r in rows if r.get("kind") == "train"][1:]
        # Windows are equally long, so the mean of their rates is the overall rate.
        return statistics.mean(windows)


class BareLoop:
    """A plain PyTorch training loop over the same model, batches, optimizer, LR schedule and clipping as `slm train`.

    AdamW, or (optim.name=muon) the same MuonWithAuxAdam DeepSpeed builds, over the same param groups; for bf16
    the model runs in bf16 with an fp32 master copy for the optimizer, which is what DeepSpeed's bf16 optimizer
    does. Under torchrun (world > 1) the model is wrapped in torch's DistributedDataParallel over gloo and each
    rank reads its own share of the batches, as `slm train` does."""

    def __init__(self, cfg, data_dir: Path, precision: str, rank: int = 0, world: int = 1) -> None:
        from train.optim import set_compile_stance

        # Muon's kernels run eagerly on CPU, as in slm train
        set_compile_stance(torch.device("cpu"), False, muon=cfg.optim.name == "muon")
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.step_number = cfg, 0
        self.dtype = DTYPES[precision]
        model = Transformer(cfg.model)
        groups = param_groups(model, cfg.optim.weight_decay)
        model.to(self.dtype)
        self.params = [p for g in groups for p in g["params"]]
        if self.dtype == torch.float32:
            self.masters, master_groups = self.params, groups
        else:  # fp32 master weights, as DeepSpeed's bf16 optimizer keeps them
            self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
            by_param = dict(zip(map(id, self.params), self.masters))
            master_groups = [{**g, "params": [by_param[id(p)] for p in g["params"]]} for g in groups]
        self.optimizer = self._optimizer(model, master_groups)
        self.model = model
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
        self.loader = iter(
            build_loader(
                data_dir,
                "train",
                cfg.model.max_seq_len,
                cfg.train.micro_batch_size,
                rank,
                world,
                cfg.run.seed,
            )
        )

    def _optimizer(self, model, groups):
        optim = self.cfg.optim
        if optim.name != "muon":
            return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        from train.optim import deepspeed_optimizer_block

        by_id = {id(p): name for name, p in model.named_parameters()}
        for group in groups:  # DeepSpeed's own tagging: every matrix but the embeddings and the head
            for p in group["params"]:
                name = by_id.get(id(p), "")
                p.use_muon = p.ndim >= 2 and "embed" not in name and "lm_head" not in name
        settings = dict(deepspeed_optimizer_block(optim, "cpu")["params"])
        settings.pop("torch_adam")
        muon_groups = DeepSpeedEngine._muon_param_groups(groups, settings)
        return MuonWithAuxAdam(
            muon_groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={"foreach": None}
        )

    def step(self) -> None:
        """One optimizer step of grad_accum_steps micro-batches; the host learns the loss, as slm train does."""
        cfg = self.cfg
        lr = lr_at(self.step_number, cfg.schedule, cfg.optim.lr, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group_lr(group, lr, cfg.optim)
        for _ in range(cfg.train.grad_accum_steps):
            batch = next(self.loader)
            _, loss = self.model(batch["input_ids"], targets=batch["labels"])
            (loss / cfg.train.grad_accum_steps).backward()
        if self.masters is not self.params:
            for p, m in zip(self.params, self.masters):
                m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(self.masters, cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not self.params:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
                    p.grad = None
        loss.item()
        self.step_number += 1


def bare_loop_tokens_per_second(cfg, data_dir: Path, precision: str, steps: int, warmup: int) -> float:
    """tokens/s of the bare loop (BareLoop) over `steps` steps, the first `warmup` not timed."""
    loop = BareLoop(cfg, data_dir, precision)
    tokens_per_step = cfg.train.micro_batch_size * cfg.model.max_seq_len * cfg.train.grad_accum_steps
    elapsed = 0.0
    for step in range(steps):
        started = time.perf_counter()
        loop.step()
        if step >= warmup:
            elapsed += time.perf_counter() - started
    return tokens_per_step * (steps - warmup) / elapsed


SHAPES = {
    "tiny": (REPO / "configs" / "tiny.yaml", []),
    # The recipe trains for train.max_time under wsd_time; a budget that never ends keeps its schedule's cost.
    "recipe": (REPO / "configs" / "shakespeare-cpu.yaml", ["train.max_time=1000000"]),
}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int) -> list:
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def bare_worker(args) -> None:
    """One rank of the bare loop under torchrun: DDP over gloo; rank 0 writes the global tokens/s to args.out."""
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = load_config(args.preset, [f"data.dir={args.data_dir}", *args.overrides])
    loop = BareLoop(cfg, Path(args.data_dir), args.precision, rank, world)
    tokens_per_step = cfg.train.micro_batch_size * cfg.model.max_seq_len * cfg.train.grad_accum_steps * world
    for _ in range(args.log_every):
        loop.step()
    torch.distributed.barrier()
    started = time.perf_counter()
    for _ in range(args.steps - args.log_every):
        loop.step()
    torch.distributed.barrier()
    if rank == 0:
        args.out.write_text(
            str(tokens_per_step * (args.steps - args.log_every) / (time.perf_counter() - started))
        )
    torch.distributed.destroy_process_group()


def bare_two_processes(
    preset: Path, data_dir: Path, precision: str, steps: int, log_every: int, overrides
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tokens_per_second"
        cmd = [
            *torchrun(2),
            str(Path(__file__).resolve()),
            "--bare-worker",
            "--preset",
            str(preset),
            "--data-dir",
            str(data_dir),
            "--precisions",
            precision,
            "--steps",
            str(steps),
            "--log-every",
            str(log_every),
            "--out",
            str(out),
            "--",
            *overrides,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(
                f"bare loop under torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        return float(out.read_text())


def shape_config(shape: str, data_root: Path, steps: int):
    """The shape's preset, data folder (prepared when missing) and config with the tokenizer's vocab_size (and a
    warmup shorter than `steps`, which the config requires)."""
    preset, overrides = SHAPES[shape]
    data_dir = data_root / shape
    cfg = load_config(str(preset), [f"data.dir={data_dir}", *overrides])
    if cfg.schedule.warmup_steps >= steps:
        overrides = [*overrides, f"schedule.warmup_steps={max(1, steps // 4)}"]
    if not (data_dir / "manifest.json").is_file():
        from data_pipeline.prepare.dispatch import prepare

        prepare(cfg.data, cfg.tokenizer)
    vocab = model_vocab_size(load_tokenizer(data_dir / "tokenizer.json"))
    overrides = [*overrides, f"model.vocab_size={vocab}"]
    return preset, data_dir, overrides, load_config(str(preset), [f"data.dir={data_dir}", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,recipe")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument(
        "--stages", default="0,1,2,3", help="ZeRO stages on 2 processes (tiny, fp32); '' for none"
    )
    parser.add_argument("--data-root", type=Path, default=REPO / "runs" / "data" / "bench-throughput")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument(
        "--baseline-repo",
        type=Path,
        default=None,
        help="also time `slm train` from this checkout (e.g. a worktree of an older commit), interleaved",
    )
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both loops")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.bare_worker:
        torch.set_num_threads(1)
        args.precision = args.precisions
        bare_worker(args)
        return
    torch.set_num_threads(args.threads)

    started = time.time()
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s) per process; "
        f"{args.steps} steps per run, the first {args.log_every} not timed; medians of {args.repeats}; "
        f"load average at the start {os.getloadavg()[0]:.1f}",
        "",
        "| shape | processes | ZeRO | precision | slm train tok/s | bare loop tok/s | slm FLOP/s | overhead | load |"
        + (" baseline slm tok/s | baseline overhead |" if args.baseline_repo else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.baseline_repo else ""),
    ]
    print("\n".join(lines), flush=True)
    cells = [
        (shape, 1, None, precision)
        for shape in args.shapes.split(",")
        if shape  # --shapes '': only the 2-process rows
        for precision in args.precisions.split(",")
    ]
    cells += [("tiny", 2, int(stage), "fp32") for stage in args.stages.split(",") if stage]
    for shape, nproc, stage, precision in cells:
        preset, data_dir, overrides, cfg = shape_config(shape, args.data_root, args.steps)
        overrides = [*overrides, *args.overrides]
        stage_override = [] if stage is None else [f"train.zero_stage={stage}"]
        flops = flops_per_token(cfg.model, cfg.model.max_seq_len)
        slm, bare, base, loads = [], [], [], []

        # One case's `slm train` arguments, measured in this checkout and (with --baseline-repo) in the other one.
        slm_args = (
            str(preset),
            data_dir,
            precision,
            args.steps,
            args.log_every,
            args.threads,
            [*overrides, *stage_override],
            nproc,
        )
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            if args.baseline_repo:
                base.append(slm_train_tokens_per_second(*slm_args, args.baseline_repo))
            slm.append(slm_train_tokens_per_second(*slm_args))
            if nproc == 1:
                cfg_run = load_config(str(preset), [f"data.dir={data_dir}", *overrides])
                bare.append(
                    bare_loop_tokens_per_second(cfg_run, data_dir, precision, args.steps, args.log_every)
                )
            else:
                bare.append(
                    bare_two_processes(preset, data_dir, precision, args.steps, args.log_every, overrides)
                )
        slm_tps, bare_tps = statistics.median(slm), statistics.median(bare)
        stage_text = str(stage) if stage is not None else str(load_config(str(preset), []).train.zero_stage)
        lines.append(
            f"| {shape} | {nproc} | {stage_text} | {precision} | {slm_tps:,.0f} | {bare_tps:,.0f} "
            f"| {slm_tps * flops / 1e9:.2f} G | {100 * (1 - slm_tps / bare_tps):+.1f}% "
            f"| {min(loads):.1f}-{max(loads):.1f} |"
        )
        if base:
            base_tps = statistics.median(base)
            lines[-1] += f" {base_tps:,.0f} | {100 * (1 - base_tps / bare_tps):+.1f}% |"
        print(lines[-1], flush=True)
        print(
            f"  (runs: slm {[round(x) for x in slm]}, bare {[round(x) for x in bare]}, "
            f"baseline {[round(x) for x in base]})",
            flush=True,
        )
    lines.append("")
    lines.append(f"({time.time() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f})")
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
