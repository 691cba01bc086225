"""`make bench-gpu`: the GPU-only checks, then tokens/s, MFU and peak memory of the 125m/350m/1b presets.

    python bench/gpu.py [--presets 125m,350m,1b] [--micro-batches 1,4,8] [--steps 10] [--compile] [--out FILE]

Checks (each pass/fail with a reason, none stops the others): bf16 support, NCCL (one all-reduce over a
1-process group), the flash SDPA kernel (causal, grouped-query), flex_attention document masks against the
dense mask (loss and gradients: flex has no backward on CPU, so this is its gradient test), fused AdamW
against the unfused step, torch.compile against eager, and `slm train` under DeepSpeed ZeRO-2 and ZeRO-3 (and
ZeRO-2 with optim.name=muon) on every GPU present (torchrun, the tiny preset, a few steps). Throughput: a plain loop over the preset's model
(bf16 weights, fused AdamW, the preset's activation checkpointing, random tokens, seq = the preset's
max_seq_len) for each micro-batch size; MFU = model.stats.flops_per_token x tokens/s / the device's dense
bf16 peak (train.mfu). The report is appended to docs/benchmarks.md below bench/suite.py's GPU marker.
On a machine without CUDA it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common.atomic import atomic_write_text  # noqa: E402

GPU_MARKER = "<!-- GPU results: bench/gpu.py appends below this line -->"  # the same line as bench/suite.py's
NO_CUDA = (
    "bench/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine (torch {version}). "
    "Run it where `nvidia-smi` lists a GPU, in a venv with a CUDA build of torch (the Makefile's "
    "TORCH_SPEC); the CPU benchmarks are `make bench`."
)
Check = Tuple[str, bool, str]


def run_check(name: str, fn: Callable[[], str]) -> Check:
    """(name, passed, detail): a failing check reports its error instead of stopping the bench."""
    try:
        return name, True, fn()
    except Exception as err:  # noqa: BLE001 - every failure is reported, none is fatal
        return name, False, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def check_bf16() -> str:
    if not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"{torch.cuda.get_device_name()} does not support bf16")
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    if not torch.isfinite(x @ x).all():
        raise RuntimeError("a bf16 matmul of normal inputs gave non-finite values")
    return f"bf16 matmul ok, {torch.cuda.get_device_name()}"


def check_nccl() -> str:
    import torch.distributed as dist

    if not dist.is_nccl_available():
        raise RuntimeError("torch was built without NCCL")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            t = torch.ones(4, device="cuda")
            dist.all_reduce(t)
            torch.cuda.synchronize()
        finally:
            dist.destroy_process_group()
    return f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}: all-reduce ok"


def check_flash() -> str:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot serve these inputs
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    return "flash kernel serves causal grouped-query attention (enable_gqa)"


def small_model(**overrides):
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = dict(n_layers=2, d_model=256, n_heads=8, n_kv_heads=2, vocab_size=1024, max_seq_len=512)
    return Transformer(ModelConfig(**{**cfg, **overrides})).cuda()


def loss_and_grads(model, **inputs) -> tuple:
    model.zero_grad(set_to_none=True)
    _, loss = model(**inputs)
    loss.backward()
    return loss.detach().float(), [p.grad.detach().float().clone() for p in model.parameters()]


def max_relative_difference(a: tuple, b: tuple) -> float:
    diffs = [((a[0] - b[0]).abs() / b[0].abs()).item()]
    diffs += [((x - y).abs().max() / y.abs().max().clamp(min=1e-30)).item() for x, y in zip(a[1], b[1])]
    return max(diffs)


def check_flex() -> str:
    from data_pipeline.loading.documents import document_ids_from_eot

    dense, flex = small_model(attention="sdpa"), small_model(attention="flex")
    flex.load_state_dict(dense.state_dict())
    tokens = torch.randint(1, 1024, (4, 512), device="cuda")
    tokens[torch.rand(4, 512, device="cuda") < 0.01] = 0  # EOT-separated documents
    position_ids, doc_ids = document_ids_from_eot(tokens, 0)
    inputs = dict(tokens=tokens, targets=tokens.roll(-1, 1), position_ids=position_ids, doc_ids=doc_ids)
    diff = max_relative_difference(loss_and_grads(flex, **inputs), loss_and_grads(dense, **inputs))
    if diff > 1e-3:  # fp32 weights: both are exact attention up to summation order
        raise RuntimeError(f"flex and dense-mask loss/gradients differ by {diff:.2e} (relative)")
    return f"flex block mask = dense mask, loss and gradients within {diff:.1e}"


def check_fused_adamw() -> str:
    results = []
    for fused in (False, True):
        model = small_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
        tokens = torch.randint(0, 1024, (2, 128), device="cuda")
        for _ in range(3):
            _, loss = model(tokens, targets=tokens)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    diff = (results[0] - results[1]).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"fused and unfused AdamW weights differ by {diff:.2e} after 3 steps")
    return f"fused AdamW = unfused within {diff:.1e} after 3 steps"


def check_compile() -> str:
    model = small_model()
    tokens = torch.randint(0, 1024, (2, 256), device="cuda")
    eager = loss_and_grads(model, tokens=tokens, targets=tokens)
    compiled = loss_and_grads(torch.compile(model), tokens=tokens, targets=tokens)
    diff = max_relative_difference(compiled, eager)
    if diff > 1e-3:
        raise RuntimeError(f"compiled and eager loss/gradients differ by {diff:.2e}")
    return f"torch.compile = eager within {diff:.1e}"


def check_zero(stage: int, extra: Tuple[str, ...] = ()) -> Callable[[], str]:
    def run() -> str:
        gpus = torch.cuda.device_count()
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(gpus),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(29500 + stage),
                "-m",
                "launch",
                "train",
                str(REPO / "configs" / "tiny.yaml"),
                f"run.dir={tmp}/run",
                f"data.dir={tmp}/data",
                "data.num_proc=1",
                f"train.zero_stage={stage}",
                "train.precision=bf16",
                "train.max_steps=10",
                "eval.every=10",
                "checkpoint.every=10",
                "log.every=5",
                "eval.batches=2",
                *extra,
            ]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"slm train exited {proc.returncode}: {(proc.stdout + proc.stderr)[-300:]}"
                )
        return f"slm train, ZeRO-{stage}, {gpus} GPU(s), 10 bf16 steps{' ' + ' '.join(extra) if extra else ''}: ok"

    return run


def throughput(preset: str, micro_batch: int, steps: int, compile_model: bool) -> dict:
    """tokens/s, MFU and peak memory of a plain bf16 training loop over a preset's model on this GPU."""
    from launch.config import load_config
    from model import Transformer
    from model.stats import flops_per_token
    from train.mfu import peak_flops_per_device

    cfg = load_config(str(REPO / "configs" / f"{preset}.yaml"))
    torch.manual_seed(0)
    model = Transformer(cfg.model).cuda().to(torch.bfloat16)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    seq = cfg.model.max_seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        _, loss = step_model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    tps = micro_batch * seq * steps / (time.perf_counter() - started)
    peak = peak_flops_per_device(torch.cuda.get_device_name(), "bf16")
    mfu = flops_per_token(cfg.model, seq) * tps / peak if peak else None
    return {"tokens_per_second": tps, "mfu": mfu, "peak_memory": torch.cuda.max_memory_allocated()}


def render(device: str, checks: List[Check], rows: List[tuple], command: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### {device}, {date}",
        "",
        f"`{command}`, torch {torch.__version__}",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |" for name, ok, detail in checks]
    lines += ["", "| preset | micro-batch x seq | tokens/s | MFU | peak memory |", "|---|---|---:|---:|---:|"]
    for preset, micro, seq, result in rows:
        if isinstance(result, str):
            lines.append(f"| {preset} | {micro} x {seq} | {result} | | |")
        else:
            mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "unknown peak"
            lines.append(
                f"| {preset} | {micro} x {seq} | {result['tokens_per_second']:,.0f} | {mfu} "
                f"| {result['peak_memory'] / 2**30:.1f} GiB |"
            )
    return "\n".join(lines) + "\n"


def append_report(path: Path, section: str) -> None:
    """Add section below the GPU marker of path (creating the marker, or the file, if missing)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n## GPU\n\n"
    if GPU_MARKER not in text:
        text = text.rstrip("\n") + f"\n\n{GPU_MARKER}\n"
    head, tail = text.split(GPU_MARKER, 1)
    tail = "\n".join(line for line in tail.splitlines() if not line.startswith("GPU figures: unmeasured"))
    atomic_write_text(path, f"{head}{GPU_MARKER}\n{tail.strip()}\n\n{section}".replace("\n\n\n", "\n\n"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="125m,350m,1b")
    parser.add_argument("--micro-batches", default="1,4,8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model in the throughput loop"
    )
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
        return 2
    checks: List[Check] = []
    if not args.skip_checks:
        for name, fn in [
            ("bf16", check_bf16),
            ("NCCL", check_nccl),
            ("flash SDPA", check_flash),
            ("flex attention", check_flex),
            ("fused AdamW", check_fused_adamw),
            ("torch.compile", check_compile),
            ("ZeRO-2", check_zero(2)),
            ("ZeRO-3", check_zero(3)),
            ("Muon, ZeRO-2", check_zero(2, ("optim.name=muon", "optim.grad_clip=0"))),
        ]:
            checks.append(run_check(name, fn))
            print(f"[check] {' | '.join(map(str, checks[-1]))}", flush=True)
    rows = []
    for preset in args.presets.split(","):
        for micro in map(int, args.micro_batches.split(",")):
            from launch.config import load_config

            seq = load_config(str(REPO / "configs" / f"{preset}.yaml")).model.max_seq_len
            try:
                result = throughput(preset, micro, args.steps, args.compile)
            except torch.cuda.OutOfMemoryError:
                result = "out of memory"
            torch.cuda.empty_cache()
            rows.append((preset, micro, seq, result))
            print(f"[throughput] {preset} {micro}x{seq}: {result}", flush=True)
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = render(
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}", checks, rows, command.strip()
    )
    print(section)
    append_report(args.out, section)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
