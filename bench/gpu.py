"""`make bench-gpu`: the GPU-only checks, a bare loop over the presets' models, then `slm train` itself.

    python bench/gpu.py [--presets 125m,350m,1b] [--micro-batches 8] [--steps 10] [--compile]
                        [--train-presets 125m,350m] [--train-steps 20] [--skip-train] [--data-dir DIR]
                        [--budget-minutes 9] [--out FILE]
    python bench/gpu.py --cpu-smoke [--data-dir DIR] [--out FILE]

Checks (each pass/fail with a reason, none stops the others): bf16 support, NCCL (one all-reduce over a 1-process
group), the flash SDPA kernel (causal, grouped-query), flex_attention document masks against the dense mask (loss
and gradients: flex has no backward on CPU, so this is its gradient test), fused AdamW against the unfused step,
torch.compile against eager. Bare loop: a plain loop over the preset's model (bf16 weights, fused AdamW, random
tokens, seq = the preset's max_seq_len) per micro-batch size; MFU = model.stats.flops_per_token x tokens/s / the
device's dense bf16 peak (train.mfu). `slm train` matrix (what a user runs, on every GPU present: torchrun when
there are several): ZeRO 0-3 at each --train-presets preset, each run at the first preset resumed from its middle
checkpoint and its losses compared with the uninterrupted run's, with document masks (flex inside the trainer),
train.compile and Muon at the first preset; tokens/s, MFU and peak memory come from the train rows of
metrics.jsonl (the first row, warm-up and compilation, left out) and are set against the bare loop (at the
vocabulary the prepared tinyshakespeare tokenizer gives both). Cases that would start after --budget-minutes are
reported as not run, the larger presets' last. The report is appended to docs/benchmarks.md below bench/suite.py's
GPU marker. Without CUDA it exits with status 2 and says so; --cpu-smoke runs one tiny ZeRO-1 case with its resume
and the bare loop on the CPU instead, to check the harness (command lines, rows, table), measuring nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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


@dataclass(frozen=True)
class TrainCase:
    """One `slm train` run of the matrix: a preset, the overrides that make the case, and whether it is resumed."""

    name: str
    """What the table calls it (ZeRO-1, train.compile, ...)."""
    preset: str
    """configs/<preset>.yaml."""
    overrides: Tuple[str, ...] = ()
    """The case's own config overrides."""
    resume: bool = False
    """Also resume a second run from the middle checkpoint and compare its losses with the first run's."""


@dataclass(frozen=True)
class RunSettings:
    """How long every case runs and on what: the GPU default, or the CPU smoke mode's tiny shapes."""

    steps: int
    """Optimizer steps per case (a resumed run starts at steps // 2)."""
    log_every: int
    """Train rows every this many steps; the first row (warm-up, compilation) is left out of the figures."""
    extra: Tuple[str, ...] = ()
    """Overrides for every case (the smoke mode's shrunk model and CPU device)."""


GPU_RUN = RunSettings(steps=20, log_every=5, extra=("train.grad_accum_steps=2",))
"""Budget (estimated, not yet timed on a GPU): 20 steps of 2 micro-batches of 8 x 1024 are a few seconds at 125m
(about 0.1 s a micro-batch on an H100) and about 10 s at 350m; start-up, data loading, compilation and checkpoint
saves add 20-60 s a run, so the 15 runs of the matrix should take 6-8 minutes and the whole bench about 10."""
SMOKE_MODEL = (
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
    "model.max_seq_len=32",
    "train.micro_batch_size=4",
)
SMOKE_RUN = RunSettings(
    steps=4,
    log_every=1,
    extra=(*SMOKE_MODEL, "train.precision=fp32", "train.device=cpu", "train.grad_accum_steps=2"),
)
"""--cpu-smoke: the harness's plumbing (command lines, rows, resume, table) on the tiny preset, in seconds."""


def train_cases(presets: List[str]) -> List[TrainCase]:
    """ZeRO 0-3 at the first preset, each resumed from its middle checkpoint; that preset with document masks
    (flex attention inside the trainer), train.compile and Muon; then ZeRO 0-3 at the other presets (last, so
    that a spent --budget-minutes leaves out the larger models first)."""
    first, others = presets[0], presets[1:]
    zero = [
        TrainCase(f"ZeRO-{stage}", first, (f"train.zero_stage={stage}",), resume=True) for stage in range(4)
    ]
    features = [
        TrainCase("document masks", first, ("data.document_mask=true",)),
        TrainCase("train.compile", first, ("train.compile=true",)),
        TrainCase("Muon", first, ("optim.name=muon", "optim.grad_clip=0")),
    ]
    rest = [
        TrainCase(f"ZeRO-{stage}", p, (f"train.zero_stage={stage}",)) for p in others for stage in range(4)
    ]
    return zero + features + rest


def train_command(
    case: TrainCase, run_dir: Path, data_dir: Path, settings: RunSettings, gpus: int, *more: str
) -> List[str]:
    """`slm train` for one case: torchrun over every GPU when there are several, else one plain process."""
    launcher = [sys.executable]
    if gpus > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", "29531"]
    steps, half = settings.steps, settings.steps // 2
    return [
        *launcher,
        "-m",
        "launch",
        "train",
        str(REPO / "configs" / f"{case.preset}.yaml"),
        f"run.dir={run_dir}",
        f"data.dir={data_dir}",
        f"train.max_steps={steps}",
        f"schedule.warmup_steps={max(1, steps // 4)}",  # the presets warm up over 1000 steps
        f"log.every={settings.log_every}",
        f"eval.every={steps}",
        "eval.batches=2",
        f"checkpoint.every={half if case.resume else steps}",
        *settings.extra,
        *case.overrides,
        *more,
    ]


def steady_figures(rows: List[dict]) -> dict:
    """tokens/s and MFU (medians of the train rows after the first, which holds the warm-up), the peak memory
    (the largest row's) and the last loss."""
    steady = rows[1:] or rows
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_memory_gib": max(r.get("peak_memory_gib", 0.0) for r in rows),
        "loss": rows[-1]["loss"],
    }


def run_slm(cmd: List[str], deadline: Optional[float] = None) -> None:
    """Run an `slm` command; its `error:` lines (or its output's tail) when it fails or passes the deadline (a
    time.monotonic() value)."""
    timeout = None if deadline is None else max(60.0, deadline - time.monotonic())
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in output if line.startswith("error:")]
        tail = " ".join(" ".join(errors or output[-5:]).split())[-400:]
        raise RuntimeError(f"slm {cmd[cmd.index('launch') + 1]} exited {proc.returncode}: {tail}")


def run_case(
    case: TrainCase,
    data_dir: Path,
    settings: RunSettings,
    gpus: int,
    work: Path,
    deadline: Optional[float] = None,
) -> dict:
    """Run one case (and its resume), return its figures; a failure is returned as {"error": ...}."""
    from bench.slm_runs import metrics
    from train.checkpoint.layout import step_tag

    run_dir = work / case.preset / case.name.replace(" ", "-").replace(".", "-") / "run"
    started = time.perf_counter()
    try:
        run_slm(train_command(case, run_dir, data_dir, settings, gpus), deadline)
        result = steady_figures(metrics(run_dir, "train"))
        if case.resume:
            half = settings.steps // 2
            resumed = run_dir.parent / "resumed"
            middle = run_dir / "checkpoints" / step_tag(half)
            resume = f"checkpoint.resume={middle}"
            run_slm(train_command(case, resumed, data_dir, settings, gpus, resume), deadline)
            first = {r["step"]: r["loss"] for r in metrics(run_dir, "train")}
            again = {r["step"]: r["loss"] for r in metrics(resumed, "train")}
            if sorted(again) != [s for s in sorted(first) if s > half]:
                raise RuntimeError(
                    f"the resumed run logged steps {sorted(again)}, expected those after {half}"
                )
            diff = max(abs(again[s] - first[s]) for s in again)
            result["resume"] = f"from step {half}: " + ("bitwise" if diff == 0 else f"loss within {diff:.1e}")
    except Exception as err:  # noqa: BLE001 - every case is reported, none stops the others
        return {"error": f"{type(err).__name__}: {str(err)[:300]}", "seconds": time.perf_counter() - started}
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)  # checkpoints of 125m/350m are GBs
    result["seconds"] = time.perf_counter() - started
    return result


def prepare_data(preset: str, data_dir: Path, settings: RunSettings) -> None:
    """Tokenizer and shards for the matrix, once (every case of the presets shares them: the same data section)."""
    if (data_dir / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "launch", "prepare", str(REPO / "configs" / f"{preset}.yaml")]
    run_slm([*cmd, f"data.dir={data_dir}", *[o for o in settings.extra if o.startswith("data.")]])


def train_matrix(
    cases: List[TrainCase],
    data_dirs: Dict[str, Path],
    settings: RunSettings,
    gpus: int,
    deadline: Optional[float] = None,
) -> List[Tuple[TrainCase, dict]]:
    """Every case in turn (scratch run folders, removed after each case); past the deadline (time.monotonic())
    the remaining cases are reported as not run, and a run still going then is stopped."""
    results = []
    with tempfile.TemporaryDirectory(prefix="slm-bench-runs-") as tmp:
        for case in cases:
            if deadline is not None and time.monotonic() >= deadline:
                results.append((case, {"error": "not run: --budget-minutes spent", "seconds": 0.0}))
                continue
            result = run_case(case, data_dirs[case.preset], settings, gpus, Path(tmp), deadline)
            results.append((case, result))
            print(f"[train] {case.preset} {case.name}: {result}", flush=True)
    return results


def render_train(results: List[Tuple[TrainCase, dict]], bare: dict, gpus: int) -> List[str]:
    """The `slm train` table: each case's figures against the bare loop's tokens/s per GPU at its preset."""
    lines = [
        "",
        f"`slm train` on {gpus} device(s) (tokens/s over all of them; vs bare loop: per device, against the plain "
        "loop at the same micro-batch):",
        "",
        "| case | preset | tokens/s | vs bare loop | MFU | peak memory | last loss | resume | wall |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for case, r in results:
        if "error" in r:
            lines.append(
                f"| {case.name} | {case.preset} | FAIL: {r['error']} | | | | | | {r['seconds']:.0f} s |"
            )
            continue
        base = bare.get(case.preset)
        ratio = f"{r['tokens_per_second'] / gpus / base:.2f}x" if base else "no bare row"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "unknown peak"
        lines.append(
            f"| {case.name} | {case.preset} | {r['tokens_per_second']:,.0f} | {ratio} | {mfu} "
            f"| {r['peak_memory_gib']:.1f} GiB | {r['loss']:.3f} | {r.get('resume', '')} | {r['seconds']:.0f} s |"
        )
    return lines


def throughput(
    preset: str,
    micro_batch: int,
    steps: int,
    compile_model: bool,
    device: str = "cuda",
    overrides: Tuple[str, ...] = (),
) -> dict:
    """tokens/s, MFU and peak memory of a plain training loop over a preset's model: bf16 weights and fused AdamW
    on a GPU, fp32 on the CPU (the smoke mode)."""
    from launch.config import load_config
    from model import Transformer
    from model.stats import flops_per_token
    from train.mfu import peak_flops_per_device

    cfg = load_config(str(REPO / "configs" / f"{preset}.yaml"), list(overrides))
    cuda = device == "cuda"
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    if cuda:
        model = model.to(torch.bfloat16)
    model.set_activation_checkpointing(bool(cfg.train.activation_checkpointing))
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    seq = cfg.model.max_seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq + 1), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        _, loss = step_model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    tps = micro_batch * seq * steps / (time.perf_counter() - started)
    if not cuda:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"tokens_per_second": tps, "mfu": None, "peak_memory": peak_memory}
    peak = peak_flops_per_device(torch.cuda.get_device_name(), "bf16")
    mfu = flops_per_token(cfg.model, seq) * tps / peak if peak else None
    return {"tokens_per_second": tps, "mfu": mfu, "peak_memory": torch.cuda.max_memory_allocated()}


def bare_per_preset(rows: List[tuple], micro_batch: Dict[str, int]) -> Dict[str, float]:
    """The bare loop's tokens/s of each preset at the micro-batch its `slm train` cases use."""
    return {
        preset: result["tokens_per_second"]
        for preset, micro, _seq, result in rows
        if not isinstance(result, str) and micro == micro_batch.get(preset)
    }


def render(
    device: str,
    checks: List[Check],
    rows: List[tuple],
    command: str,
    train_lines: Optional[List[str]] = None,
) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### {device}, {date}", "", f"`{command}`, torch {torch.__version__}", ""]
    if checks:
        lines += ["| check | result | detail |", "|---|---|---|"]
        lines += [f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |" for name, ok, detail in checks]
        lines.append("")
    lines += [
        "Bare loop (the preset's model, random tokens, no DeepSpeed):",
        "",
        "| preset | micro-batch x seq | tokens/s | MFU | peak memory |",
        "|---|---|---:|---:|---:|",
    ]
    for preset, micro, seq, result in rows:
        if isinstance(result, str):
            lines.append(f"| {preset} | {micro} x {seq} | {result} | | |")
        else:
            mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "unknown peak"
            lines.append(
                f"| {preset} | {micro} x {seq} | {result['tokens_per_second']:,.0f} | {mfu} "
                f"| {result['peak_memory'] / 2**30:.1f} GiB |"
            )
    return "\n".join(lines + (train_lines or [])) + "\n"


def append_report(path: Path, section: str) -> None:
    """Add section below the GPU marker of path (creating the marker, or the file, if missing)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n## GPU\n\n"
    if GPU_MARKER not in text:
        text = text.rstrip("\n") + f"\n\n{GPU_MARKER}\n"
    head, tail = text.split(GPU_MARKER, 1)
    tail = "\n".join(line for line in tail.splitlines() if not line.startswith("GPU figures: unmeasured"))
    atomic_write_text(path, f"{head}{GPU_MARKER}\n{tail.strip()}\n\n{section}".replace("\n\n\n", "\n\n"))


def data_vocab(data_dir: Path) -> int:
    """The model vocabulary `slm train` sets from the prepared data's tokenizer (tinyshakespeare trains fewer tokens
    than the presets' 50,304)."""
    from data_pipeline.tokenizer import load_tokenizer, model_vocab_size

    return model_vocab_size(load_tokenizer(data_dir / "tokenizer.json"))


def data_dirs(presets: List[str], root: Path, settings: RunSettings) -> Dict[str, Path]:
    """Prepared data for each preset under root, shared by presets whose data and tokenizer sections match."""
    from launch.config import load_config

    dirs: Dict[str, Path] = {}
    made: Dict[str, Path] = {}
    for preset in presets:
        cfg = load_config(str(REPO / "configs" / f"{preset}.yaml"))
        key = repr((dataclasses.replace(cfg.data, dir=""), cfg.tokenizer))
        if key not in made:
            made[key] = root / preset
            prepare_data(preset, made[key], settings)
        dirs[preset] = made[key]
    return dirs


def cpu_smoke(args: argparse.Namespace, command: str) -> int:
    """The harness on the CPU: one tiny ZeRO-1 case with its resume and the bare loop at the same shapes."""
    cases = [TrainCase("ZeRO-1", "tiny", ("train.zero_stage=1",), resume=True)]
    with tempfile.TemporaryDirectory(prefix="slm-bench-smoke-") as tmp:
        data = args.data_dir or Path(tmp) / "data"
        prepare_data("tiny", data, SMOKE_RUN)
        overrides = (*SMOKE_MODEL, "train.precision=fp32", f"model.vocab_size={data_vocab(data)}")
        rows = [("tiny", 4, 32, throughput("tiny", 4, 2, False, device="cpu", overrides=overrides))]
        results = train_matrix(cases, {"tiny": data}, SMOKE_RUN, 1)
    bare = bare_per_preset(rows, {"tiny": 4})
    section = render("CPU smoke run (not a benchmark)", [], rows, command, render_train(results, bare, 1))
    print(section)
    append_report(args.out, section)
    return 0 if all("error" not in r for _, r in results) else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="125m,350m,1b", help="presets of the bare loop")
    parser.add_argument("--micro-batches", default="8", help="micro-batch sizes of the bare loop")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the bare loop")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model in the throughput loop"
    )
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--train-presets", default="125m,350m", help="presets of the slm train matrix")
    parser.add_argument("--train-steps", type=int, default=GPU_RUN.steps, help="steps per slm train case")
    parser.add_argument("--skip-train", action="store_true", help="leave out the slm train matrix")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=9.0,
        help="wall-clock budget of the whole bench (9: a 10-minute GPU lease with room for the report); slm train "
        "cases that would start after it are reported as not run, and a run still going is stopped",
    )
    parser.add_argument("--data-dir", type=Path, help="prepared data to train on (default: prepared here)")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes on the CPU: checks the harness, measures nothing",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + 60 * args.budget_minutes
    command = ("python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.cpu_smoke:
        return cpu_smoke(args, command)
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
        ]:
            checks.append(run_check(name, fn))
            print(f"[check] {' | '.join(map(str, checks[-1]))}", flush=True)
    from launch.config import load_config

    gpus = torch.cuda.device_count()
    train_presets = [] if args.skip_train else args.train_presets.split(",")
    settings = dataclasses.replace(GPU_RUN, steps=args.train_steps)
    with tempfile.TemporaryDirectory(prefix="slm-bench-data-") as tmp:
        if args.data_dir:
            dirs = {p: args.data_dir for p in train_presets}
        else:
            dirs = data_dirs(train_presets, Path(tmp), settings)
        rows = []
        for preset in args.presets.split(","):
            # the trained tokenizer sets the vocabulary `slm train` builds: the bare loop uses the same one
            vocab = (f"model.vocab_size={data_vocab(dirs[preset])}",) if preset in dirs else ()
            for micro in map(int, args.micro_batches.split(",")):
                seq = load_config(str(REPO / "configs" / f"{preset}.yaml")).model.max_seq_len
                try:
                    result = throughput(preset, micro, args.steps, args.compile, overrides=vocab)
                except torch.cuda.OutOfMemoryError:
                    result = "out of memory"
                torch.cuda.empty_cache()
                rows.append((preset, micro, seq, result))
                print(f"[throughput] {preset} {micro}x{seq}: {result}", flush=True)
        cases = train_cases(train_presets) if train_presets else []
        results = train_matrix(cases, dirs, settings, gpus, deadline)
    train_lines: List[str] = []
    if results:
        micro = {
            p: load_config(str(REPO / "configs" / f"{p}.yaml")).train.micro_batch_size for p in train_presets
        }
        train_lines = render_train(results, bare_per_preset(rows, micro), gpus)
    section = render(f"{gpus} x {torch.cuda.get_device_name()}", checks, rows, command, train_lines)
    print(section)
    append_report(args.out, section)
    passed = all(ok for _, ok, _ in checks) and all("error" not in r for _, r in results)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
