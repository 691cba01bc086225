"""Process-group setup for every way `slm train` is started: a plain process, torchrun, or the
deepspeed launcher; gloo on CPU and nccl on GPU, chosen automatically and overridable.

A plain process has no launcher to tell it its rank, and DeepSpeed would then try MPI discovery and
fail, so a single process sets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR and a free
MASTER_PORT itself before initialising.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, TypeVar

import torch

from common.log import say
from common.os_errors import describe_os_error
from train.config import Config, TrainConfig
from train.errors import TrainError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def n_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(cfg: TrainConfig) -> str:
    """'cuda' or 'cpu': train.device, or cuda when a GPU is visible."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError(
            "train.device is 'cuda' but no CUDA GPU is visible to this process; use train.device=cpu or auto."
        )
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 matmuls in hardware. A CPU without AVX512-BF16 or AMX emulates them: measured
    40x slower than fp32 on an AVX2 EPYC (docs/benchmarks.md), so there bf16 costs speed and buys nothing."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def choose_precision(cfg: TrainConfig, device: str) -> str:
    """train.precision, with auto resolved for `device`: bf16 where native, fp16 on an older GPU, else fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if device == "cuda" else "fp32"


def with_auto_resolved(cfg: Config, device: str, is_main: bool) -> Config:
    """`cfg` with train.precision=auto and optim.muon_ns_method=auto replaced by what they mean on `device`, so that
    the run's records and a resume compare what was trained. Says each choice, and warns when bf16 is asked of a CPU
    that emulates it."""
    method = newton_schulz_method(cfg.optim.muon_ns_method, device)
    if method != cfg.optim.muon_ns_method:
        if is_main and cfg.optim.name == "muon":
            say(f"optim.muon_ns_method=auto -> {method} on this {device}")
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, muon_ns_method=method))
    precision = choose_precision(cfg.train, device)
    if is_main and device == "cpu" and precision == "bf16" and not native_bf16(device):
        say(
            f"warning: train.precision=bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
            "each matmul is emulated, many times slower than fp32. train.precision=auto picks fp32 here."
        )
    if precision == cfg.train.precision:
        return cfg
    if is_main:
        say(f"train.precision=auto -> {precision} on this {device}")
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    try:
        resolved.validate()
    except ValueError as err:
        raise TrainError(
            f"train.precision=auto means {precision} on this {device}, and then: {err}"
        ) from None
    return resolved


def newton_schulz_method(method: str, device: str) -> str:
    """optim.muon_ns_method, with auto resolved for `device`: DeepSpeed's standard iteration computes in bf16, which
    a CPU without native bf16 emulates (its Muon step 4.1x slower than gram's on an AVX2 EPYC); where bf16 is
    native, standard is the faster one (about 10% per step on an AMX Xeon; docs/benchmarks-recipe.md)."""
    if method != "auto":
        return method
    return "standard" if native_bf16(device) else "gram"


def choose_backend(cfg: TrainConfig, device: str) -> str:
    """train.backend, or nccl for cuda and gloo for cpu."""
    if cfg.backend == "nccl" and device != "cuda":
        raise TrainError(
            "train.backend is 'nccl' but the device is cpu; nccl needs GPUs (use train.backend=gloo or auto)."
        )
    if cfg.backend == "auto":
        return "nccl" if device == "cuda" else "gloo"
    return cfg.backend


def ensure_launcher_env() -> None:
    """Give a launcher-less process the env a launcher would have set: its place in an srun step of several
    tasks (`srun python -m launch train`), or rank 0 of 1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if step_tasks.isdigit() and int(step_tasks) > 1:
        slurm_step_env(int(step_tasks))
        return
    os.environ["RANK"] = "0"
    os.environ["WORLD_SIZE"] = "1"
    os.environ["LOCAL_RANK"] = "0"
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def slurm_step_env(tasks: int) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK from srun's SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID. Without them
    each of the step's tasks would start its own rank-0 run, all writing one run.dir."""
    missing = [
        k for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID") if not os.environ.get(k)
    ]
    if missing:
        raise TrainError(
            f"slm train runs as one of {tasks} tasks of an srun step without a launcher, but {', '.join(missing)} "
            "is not set: the tasks cannot find each other. Start it with `slm slurm` (torchrun or the deepspeed "
            "launcher per node), or export MASTER_ADDR (the first node) and MASTER_PORT before srun."
        )
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0]
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(tasks)
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    if per_node.isdigit():
        os.environ["LOCAL_WORLD_SIZE"] = per_node


def separate_extension_cache_per_ninja() -> None:
    """Give DeepSpeed's JIT-built C++ ops a cache folder per ninja version (unless TORCH_EXTENSIONS_DIR is set).

    DeepSpeed builds a small op at start-up in ~/.cache/torch_extensions, shared by every process of
    the user. The build records of ninja 1.11 (e.g. /usr/bin) and of pip's ninja 1.12+ (in a venv)
    are incompatible, so processes that find different ninjas on PATH rebuild the op (tens of
    seconds) every time they alternate. One folder per ninja version keeps each build valid.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    ninja = shutil.which("ninja")
    if ninja is None:
        return
    try:
        version = subprocess.run(
            [ninja, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return
    if version:
        from torch.utils.cpp_extension import get_default_build_root

        safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in version)
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(get_default_build_root(), f"ninja-{safe}")


def skip_cpu_shm_comm_op() -> None:
    """Tell DeepSpeed that its CPU shared-memory all-reduce op is unavailable, so it never builds or loads it.

    The op serves only DeepSpeed's inference_all_reduce, never training, but it is JIT-built and loaded under a
    file lock in ~/.cache/torch_extensions on every start: a process killed while it holds that lock (a
    preemption, a SIGKILL test) leaves the lock behind and every later start on the machine waits on it forever.
    DeepSpeed caches its table of compatible ops in one dict, so the edit holds for this process.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed and return this process's place in the job."""
    device_type = choose_device(cfg)
    backend = choose_backend(cfg, device_type)
    if device_type == "cpu":
        # DeepSpeed picks its accelerator once, at first use: make it agree with our device choice.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ensure_launcher_env()
    separate_extension_cache_per_ninja()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(
        logging.WARNING
    )  # our own lines say what matters; DeepSpeed's warnings still show
    # DeepSpeed's ZeRO calls torch.distributed APIs that torch marks deprecated; the warning is not ours to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if device_type == "cpu":
        skip_cpu_shm_comm_op()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timedelta(minutes=cfg.timeout_minutes),
        )
    world_size = torch.distributed.get_world_size()
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE, Slurm SLURM_NTASKS_PER_NODE.
    local_world_size = next(
        (
            int(os.environ[k])
            for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
            if os.environ.get(k, "").isdigit()
        ),
        None,
    )
    if local_world_size is None:
        local_world_size = (
            min(world_size, max(1, torch.cuda.device_count())) if device_type == "cuda" else world_size
        )
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
        backend=backend,
    )


def teardown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box: List[Any] = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's Python object, in rank order, on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    found: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(found, obj)
    return found


def on_main_then_share(dist_info: DistInfo, fn: Callable[[], T], what: str) -> T:
    """Run `fn` on rank 0 only while the others wait; its result (or its error) reaches every rank.

    A failure on rank 0 must stop every rank with the same message, not leave the others waiting in a
    collective until the timeout.
    """
    result: Any = None
    error = None
    if dist_info.is_main:
        try:
            result = fn()
        except OSError as err:  # the filesystem refused: said in words, naming the path
            error = ("TrainError", f"{what} failed: {describe_os_error(err)}")
        except Exception as err:  # re-raised on every rank below
            error = (type(err).__name__, str(err))
    result, error = broadcast_object((result, error))
    if error is not None:
        name, message = error
        if name in ("TrainError", "DataError", "ConfigError"):
            raise TrainError(message)
        raise TrainError(f"{what} failed on rank 0: {name}: {message}")
    return result
