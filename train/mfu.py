"""Model FLOPs utilization: achieved model FLOP/s as a fraction of the hardware's peak.

MFU (PaLM, Chowdhery et al. 2022) counts only the model's own FLOPs (model.stats.flops_per_token,
no recomputation), so it does not rise when activation checkpointing adds work. The peaks below are
the vendors' dense (no 2:4 sparsity) tensor-core figures at boost clock; a GPU the table does not
know gives None, and `log.peak_flops` overrides the table. CPUs have no table entry: the
benchmark measures this machine's achieved matmul FLOP/s with `measure_matmul_peak` instead.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Dict, Optional, Tuple, Union

import torch

# (pattern matched as a whole word in torch.cuda.get_device_name(), {precision: dense FLOP/s}).
# First match wins, so the specific names (H100 PCIe, H100 NVL) come before the generic ones.
# fp16 is the FP16-with-FP32-accumulate tensor figure (equal to bf16 wherever both exist).
# fp32 has no entry: PyTorch runs fp32 matmuls without TF32 by default, and MFU against the
# half-precision peak would mislead; set log.peak_flops for fp32 runs.
# Sources (dense figures; datasheets print the sparse ones as twice these):
#   A100: NVIDIA A100 datasheet, BF16/FP16 tensor 312 TF.
#     https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#   H100 SXM 989.4 TF, H100 PCIe 756 TF, H100 NVL 835 TF: NVIDIA H100 datasheet
#     (1979 / 1513 / 1671 TF with sparsity); https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
#     989.4 = 528 tensor cores x 1024 FLOP/clock x 1.83 GHz (glennklockwood.com/garden/peak-FLOPS).
#   H200 SXM 989 TF (same GH100 compute as H100 SXM; H200 datasheet: 1979 TF sparse), H200 NVL 835 TF.
#   GH200: the Hopper GPU at H100 SXM compute, 989 TF.
#   B200: HGX B200 spec, FP16/BF16 4.5 PF sparse per GPU -> 2.25 PF dense.
#   A10: NVIDIA A10 datasheet, BF16 tensor 125 TF. A10G (AWS g5 variant, no public NVIDIA
#     datasheet): about 70 TF per baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference (approx).
#   A40: NVIDIA A40 datasheet, BF16 tensor 149.7 TF.
#   L4: NVIDIA L4 datasheet, BF16 tensor 242 TF sparse -> 121 TF dense.
#   L40S: NVIDIA L40S datasheet, BF16 tensor 362.05 TF dense (733 sparse). L40: L40 datasheet, 181 TF.
#   RTX 4090: NVIDIA Ada Lovelace architecture whitepaper, appendix, "Peak BF16 Tensor TFLOPS with
#     FP32 Accumulate" 165.2 (330.4 sparse); GeForce cards are halved for FP32 accumulation.
#   RTX 3090: NVIDIA Ampere GA102 whitepaper, FP16/BF16 tensor with FP32 accumulate 71 TF.
#   V100: NVIDIA V100 datasheet, tensor (fp16 only, no bf16) 125 TF SXM2, 112 TF PCIe.
#   MI250X / MI250: AMD Instinct spec pages, peak BF16/FP16 383 / 362.1 TF. MI300X: AMD Instinct MI300X
#     datasheet, BF16/FP16 1307.4 TF dense. MI325X: same compute as MI300X, 1307.4 TF.
_BOTH = ("bf16", "fp16")
PEAK_FLOPS: Tuple[Tuple[str, Dict[str, float]], ...] = (
    ("GH200", dict.fromkeys(_BOTH, 989e12)),
    ("H100 PCIe", dict.fromkeys(_BOTH, 756e12)),
    ("H100 NVL", dict.fromkeys(_BOTH, 835e12)),
    ("H100", dict.fromkeys(_BOTH, 989e12)),
    ("H800", dict.fromkeys(_BOTH, 989e12)),
    ("H200 NVL", dict.fromkeys(_BOTH, 835e12)),
    ("H200", dict.fromkeys(_BOTH, 989e12)),
    ("B200", dict.fromkeys(_BOTH, 2250e12)),
    ("A100", dict.fromkeys(_BOTH, 312e12)),
    ("A800", dict.fromkeys(_BOTH, 312e12)),
    ("A10G", dict.fromkeys(_BOTH, 70e12)),
    ("A10", dict.fromkeys(_BOTH, 125e12)),
    ("A40", dict.fromkeys(_BOTH, 149.7e12)),
    ("L40S", dict.fromkeys(_BOTH, 362e12)),
    ("L40", dict.fromkeys(_BOTH, 181e12)),
    ("L4", dict.fromkeys(_BOTH, 121e12)),
    ("RTX 4090", dict.fromkeys(_BOTH, 165.2e12)),
    ("RTX 3090", dict.fromkeys(_BOTH, 71e12)),
    ("V100-PCIE", {"fp16": 112e12}),
    ("V100", {"fp16": 125e12}),
    ("MI250X", dict.fromkeys(_BOTH, 383e12)),
    ("MI250", dict.fromkeys(_BOTH, 362.1e12)),
    ("MI300X", dict.fromkeys(_BOTH, 1307.4e12)),
    ("MI325X", dict.fromkeys(_BOTH, 1307.4e12)),
)

_PRECISION_NAMES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    torch.bfloat16: "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    torch.float16: "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    torch.float32: "fp32",
}


def _matches(pattern: str, device_name: str) -> bool:
    """Whole-word, case-insensitive: 'A10' must not match 'A100', nor 'L4' match 'L40S'."""
    return (
        re.search(rf"(?<![A-Za-z0-9]){re.escape(pattern)}(?![A-Za-z0-9])", device_name, re.IGNORECASE)
        is not None
    )


def peak_flops_per_device(device_name: str, precision: Union[str, torch.dtype] = "bf16") -> Optional[float]:
    """Dense peak FLOP/s of a known GPU (by its torch.cuda.get_device_name()) at `precision`, else None."""
    name = _PRECISION_NAMES.get(precision.lower() if isinstance(precision, str) else precision)
    if name is None:
        raise ValueError(f"unknown precision {precision!r}; expected bf16, fp16 or fp32.")
    for pattern, peaks in PEAK_FLOPS:
        if _matches(pattern, device_name):
            return peaks.get(name)
    return None


def mfu(
    flops_per_token: float, tokens_per_second: float, peak_flops: Optional[float], n_devices: int
) -> Optional[float]:
    """Achieved model FLOP/s over the peak of all `n_devices`, as a fraction (0.4 = 40%); None without a peak."""
    if peak_flops is None or peak_flops <= 0 or n_devices <= 0:
        return None
    return flops_per_token * tokens_per_second / (peak_flops * n_devices)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    dtype: torch.dtype = torch.bfloat16,
    size: int = 1024,
    seconds: float = 1.0,
    device: Union[str, torch.device, None] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """This machine's achieved FLOP/s on square `size` matmuls of `dtype` (2*size^3 FLOPs each), timed for ~`seconds`.

    The honest ceiling for a CPU (no vendor table applies) and a sanity check of a GPU's table entry.
    Runs on `device` (default: cuda if available, else cpu) with the current torch thread count; `clock` is
    the timer (a test passes a deterministic one to check the arithmetic).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm up kernels and caches
    _sync(device)
    # Calibrate a batch of matmuls long enough (~seconds/10) that timer overhead does not count.
    start = clock()
    torch.matmul(a, b, out=out)
    _sync(device)
    one = max(clock() - start, 1e-7)
    batch = max(1, int(seconds / 10 / one))
    count = 0
    start = clock()
    while True:
        for _ in range(batch):
            torch.matmul(a, b, out=out)
        _sync(device)
        count += batch
        elapsed = clock() - start
        if elapsed >= seconds:
            return 2.0 * size**3 * count / elapsed
