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
def test_gpu_bench_without_cuda_exits_2_with_a_clear_message():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True, text=True,
                          env=test_env(), cwd=REPO)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "make bench" in proc.stderr


def test_gpu_report_goes_below_the_suite_marker_and_keeps_the_cpu_tables(tmp_path):
    suite, gpu = load("suite"), load("gpu")
    assert suite.GPU_MARKER == gpu.GPU_MARKER
    report = tmp_path / "benchmarks.md"
    bench = suite.BENCHES[0]
    report.write_text(suite.render({"cpu": "test"}, [(bench, ("python x.py", "| a |\n|---|", 1.0))], True, 2.0,
                                   suite.gpu_section(None)))
    assert suite.NO_GPU_YET in report.read_text()
    rows = [("125m", 4, 1024, {"tokens_per_second": 12345.0, "mfu": 0.5, "peak_memory": 3 * 2**30}),
            ("1b", 8, 2048, "out of memory")]
    section = gpu.render("1 x Test GPU", [("bf16", True, "ok"), ("NCCL", False, "RuntimeError: no")], rows, "cmd")
    assert "| 125m | 4 x 1024 | 12,345 | 50.0% | 3.0 GiB |" in section and "| NCCL | FAIL |" in section
    gpu.append_report(report, section)
    gpu.append_report(report, section.replace("Test GPU", "Other GPU"))
    text = report.read_text()
    assert suite.NO_GPU_YET not in text and "| a |" in text  # unmeasured line gone, CPU table kept
    assert text.index(suite.GPU_MARKER) < text.index("Test GPU") < text.index("Other GPU")
    # A later `make bench` rewrites the CPU part and carries the GPU results over unchanged.
    carried = suite.gpu_section(text)
    assert "Test GPU" in carried and "Other GPU" in carried and carried.startswith(suite.GPU_MARKER)
