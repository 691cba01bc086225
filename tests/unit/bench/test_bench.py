"""The benchmark harness's parts that run without a GPU: bench/gpu.py's refusal and report, the suite's report."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import REPO, test_env


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_gpu_bench_without_cuda_exits_2_with_a_clear_message(capsys):
    """bench/gpu.py's main in this process: the refusal comes before anything runs, so a subprocess would only add
    a start-up."""
    capsys.readouterr()
    assert load("gpu").main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "make bench" in err


def test_gpu_train_matrix_covers_what_a_user_runs_with_valid_command_lines(tmp_path):
    """Every `slm train` command of the GPU matrix loads as a valid config (as `slm train` would refuse it on
    the GPU machine otherwise), with the case's overrides in force."""
    from launch.config import load_config

    gpu = load("gpu")
    cases = gpu.train_cases(["125m", "350m"])
    covered = {(c.preset, c.name, c.resume) for c in cases}
    for stage in range(4):
        assert ("125m", f"ZeRO-{stage}", True) in covered and ("350m", f"ZeRO-{stage}", False) in covered
    names = {c.name for c in cases}
    assert {"document masks", "train.compile", "Muon"} <= names
    for case in cases:
        cmd = gpu.train_command(
            case, tmp_path / "run", tmp_path / "data", gpu.GPU_RUN, 1, "checkpoint.resume=x"
        )
        config = cmd.index("train") + 1
        assert cmd[:3] == [sys.executable, "-m", "launch"] and cmd[config].endswith(f"{case.preset}.yaml")
        cfg = load_config(cmd[config], cmd[config + 1 :])
        assert cfg.train.max_steps == gpu.GPU_RUN.steps and cfg.checkpoint.resume == "x"
        if case.name == "Muon":
            assert cfg.optim.name == "muon"
        if case.name == "document masks":
            assert cfg.data.document_mask
    several = gpu.train_command(cases[0], tmp_path, tmp_path, gpu.GPU_RUN, 8)
    assert several[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "8"]
    # a spent --budget-minutes runs nothing more and says so in the table
    spent = gpu.train_matrix(cases[:2], {"125m": tmp_path}, gpu.GPU_RUN, 1, deadline=0.0)
    assert [r["error"] for _, r in spent] == ["not run: --budget-minutes spent"] * 2
    assert "| ZeRO-0 | 125m | FAIL: not run: --budget-minutes spent |" in "\n".join(
        gpu.render_train(spent, {}, 1)
    )


@pytest.mark.slow
def test_gpu_bench_cpu_smoke_trains_resumes_and_tabulates(tmp_path, tiny_data_dir):
    """bench/gpu.py --cpu-smoke: the harness's `slm train` runs, row parsing, resume comparison and table on a
    2-layer model (two short `slm train` runs and the bare loop; 40-90 s on 2 busy cores)."""
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--cpu-smoke", "--data-dir", str(tiny_data_dir)]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env=test_env(),
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.index(load("gpu").GPU_MARKER) < text.index("CPU smoke run")
    bare = next(line for line in text.splitlines() if line.startswith("| tiny | 4 x 32 |"))
    assert float(bare.split("|")[3].replace(",", "")) > 0
    row = next(line for line in text.splitlines() if line.startswith("| ZeRO-1 | tiny |"))
    _, _, tps, ratio, mfu, peak, loss, resume, wall = [c.strip() for c in row.strip("|").split("|")]
    assert float(tps.replace(",", "")) > 0 and float(ratio.rstrip("x")) > 0 and mfu == "unknown peak"
    assert float(peak.removesuffix(" GiB")) > 0 and float(loss) > 0 and wall.endswith(" s")
    assert resume == "from step 2: bitwise"  # on the CPU a resume repeats the uninterrupted run exactly


def test_gpu_report_goes_below_the_suite_marker_and_keeps_the_cpu_tables(tmp_path):
    suite, gpu = load("suite"), load("gpu")
    assert suite.GPU_MARKER == gpu.GPU_MARKER
    report = tmp_path / "benchmarks.md"
    bench = suite.BENCHES[0]
    report.write_text(
        suite.render(
            {"cpu": "test"},
            [(bench, ("python x.py", "| a |\n|---|", 1.0))],
            True,
            2.0,
            suite.gpu_section(None),
        )
    )
    assert suite.NO_GPU_YET in report.read_text()
    rows = [
        ("125m", 4, 1024, {"tokens_per_second": 12345.0, "mfu": 0.5, "peak_memory": 3 * 2**30}),
        ("1b", 8, 2048, "out of memory"),
    ]
    section = gpu.render(
        "1 x Test GPU", [("bf16", True, "ok"), ("NCCL", False, "RuntimeError: no")], rows, "cmd"
    )
    assert "| 125m | 4 x 1024 | 12,345 | 50.0% | 3.0 GiB |" in section and "| NCCL | FAIL |" in section
    gpu.append_report(report, section)
    gpu.append_report(report, section.replace("Test GPU", "Other GPU"))
    text = report.read_text()
    assert suite.NO_GPU_YET not in text and "| a |" in text  # unmeasured line gone, CPU table kept
    assert text.index(suite.GPU_MARKER) < text.index("Test GPU") < text.index("Other GPU")
    # A later `make bench` rewrites the CPU part and carries the GPU results over unchanged.
    carried = suite.gpu_section(text)
    assert "Test GPU" in carried and "Other GPU" in carried and carried.startswith(suite.GPU_MARKER)


def test_quality_table_says_whether_the_target_is_met():
    quality = load("quality")
    result = {
        "prepare_s": 3.0,
        "wall_s": 101.0,
        "val_bpb": 2.25,
        "val_loss": 4.3,
        "steps": 900,
        "tokens": 3_686_400,
        "final_lr": 3e-4,
        "data_wait": 0.012,
    }
    text = quality.table("configs/shakespeare-cpu.yaml", 100, [], result)
    assert "**2.250**" in text and "misses by 0.150 the target of 2.1" in text and "data wait 1.2%" in text
    assert "meets the target" in quality.table("c.yaml", 100, [], {**result, "val_bpb": 2.05})


def test_distributed_tables_compare_layouts_and_memory_with_the_estimate():
    dist = load("distributed")
    rows = [{"tokens_per_second": t, "data_wait": 0.01} for t in (50.0, 1000.0, 1200.0)]
    memory = [
        {
            "rank": r,
            "baseline": 100 * dist.MIB,
            "peak": 160 * dist.MIB,
            "estimate": {"total": 30 * dist.MIB, "model_states": 20 * dist.MIB, "activations": 10 * dist.MIB},
        }
        for r in (0, 1)
    ]
    results = {
        name: {"rows": rows, "memory": memory}
        for name in ("1 process x 2 threads", "ZeRO-0 x 2", "ZeRO-1 x 2", "ZeRO-3 x 2")
    }
    results["2 processes x 1 thread (ZeRO-2)"] = results["ZeRO-2 x 2"] = {
        "rows": [{**r, "tokens_per_second": 2 * r["tokens_per_second"]} for r in rows],
        "memory": memory,
    }
    text = dist.tables(results, 4)
    assert "| 1 process x 2 threads | 1,100 | 1.00x | 1.0% |" in text  # the median after the warm-up row
    assert "| 2 processes x 1 thread (ZeRO-2) | 2,200 | 2.00x | 1.0% |" in text
    assert text.count("| 100 | 160 | 60 | 30.0 (20.0 + 10.0) | 2.0 |") == 8  # 4 stages x 2 ranks


def test_cpu_choices_table_compares_each_variant_with_bf16_adamw_eager():
    choices = load("cpu_choices")
    base = {"first_s": 0.4, "steady_ms": 400.0, "wall_s": 20.0, "budget_steps": 230}
    compiled = {"first_s": 30.0, "steady_ms": 320.0, "wall_s": 50.0, "budget_steps": 200}
    text = choices.table([("bf16, AdamW, eager", base), ("bf16, AdamW, torch.compile", compiled)], 4096)
    assert "| bf16, AdamW, eager | 0.4 s | 400 ms | 10,240 | 1.00x | 230 |" in text
    assert "| bf16, AdamW, torch.compile | 30.0 s | 320 ms | 12,800 | 1.25x | 200 |" in text


def test_recipe_sweep_table_marks_the_best_variant():
    sweep = load("recipe_sweep")
    results = [
        ("recipe", [], {"seconds_per_step": 0.5, "steps": 188, "tokens": 770_048, "val_bpb": 1.97}),
        (
            "2 layers",
            ["model.n_layers=2"],
            {"seconds_per_step": 0.4, "steps": 235, "tokens": 962_560, "val_bpb": 1.99},
        ),
    ]
    text = sweep.table(results, 100)
    assert "| recipe | 0.500 | 188 | 770,048 | **1.970** |" in text
    assert "| 2 layers (`model.n_layers=2`) | 0.400 | 235 | 962,560 | 1.990 |" in text
    assert {name for name, _ in sweep.VARIANTS} >= {"recipe", "AdamW instead of Muon"}
