"""Peak FLOP/s table lookup by real device names, the MFU arithmetic, and a real matmul measurement."""

from __future__ import annotations

import pytest
import torch

from train.mfu import measure_matmul_peak, mfu, peak_flops_per_device


@pytest.mark.parametrize(
    "device_name, peak",
    [
        # Names as torch.cuda.get_device_name() prints them.
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
        ("AMD Instinct MI250X/MI250", 383e12),
        ("AMD Instinct MI300X", 1307.4e12),
    ],
)
def test_known_gpus_bf16(device_name, peak):
    assert peak_flops_per_device(device_name, "bf16") == peak
    assert peak_flops_per_device(device_name.lower(), torch.bfloat16) == peak  # case and dtype forms


def test_precisions_and_unknown_devices():
    assert peak_flops_per_device("Tesla V100-SXM2-32GB", "fp16") == 125e12
    assert peak_flops_per_device("Tesla V100-PCIE-32GB", "fp16") == 112e12
    assert peak_flops_per_device("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "fp32") is None  # set log.peak_flops instead
    assert peak_flops_per_device("cpu", "bf16") is None
    assert peak_flops_per_device("NVIDIA GeForce GTX 1080", "bf16") is None
    with pytest.raises(ValueError, match="fp8"):
        peak_flops_per_device("NVIDIA H100 80GB HBM3", "fp8")


def test_mfu_arithmetic():
    # 1e9 FLOPs/token at 1e5 tokens/s on 2 devices of 1e14 peak: 1e14 / 2e14.
    assert mfu(1e9, 1e5, 1e14, 2) == pytest.approx(0.5)
    assert mfu(6 * 124e6, 400_000, 989e12, 8) == pytest.approx(6 * 124e6 * 400_000 / (8 * 989e12))
    assert mfu(1e9, 1e5, None, 2) is None
    assert mfu(1e9, 1e5, 0.0, 2) is None


def test_measure_matmul_peak_reports_the_flops_it_executed_per_second():
    """With a clock that ticks one second per reading, the result must be exactly the matmul FLOPs torch counted
    in the timed loop divided by the seconds the clock says passed: a wrong FLOP formula, a wrong count or
    a wrong elapsed time each change it."""
    from itertools import count

    from torch.utils.flop_counter import FlopCounterMode

    ticks = count()
    size, seconds = 32, 20.0
    with FlopCounterMode(display=False) as counter:
        flops = measure_matmul_peak(
            dtype=torch.float32, size=size, seconds=seconds, device="cpu", clock=lambda: float(next(ticks))
        )
    untimed = 2 * (2 * size**3)  # the warm-up and the calibration matmul
    timed_seconds = next(ticks) - 3  # readings: calibration start/end, loop start ... last loop reading
    assert counter.get_total_flops() > untimed
    assert flops == pytest.approx((counter.get_total_flops() - untimed) / timed_seconds, rel=1e-12)


def test_measure_matmul_peak_on_this_machine():
    flops = measure_matmul_peak(dtype=torch.float32, size=128, seconds=0.2, device="cpu")
    # A real measurement: positive and below anything a CPU could reach (1 PFLOP/s); no timing bound otherwise.
    assert 1e6 < flops < 1e15
