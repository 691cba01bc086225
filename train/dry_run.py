"""`slm train CONFIG --dry-run --world-size N`: one CPU process plays rank R of an N-rank job, to find before a
job is queued what fails only at N.

It runs under PyTorch's fake process group (collectives return at once and move no data), so DeepSpeed builds
the real ZeRO partitions of rank R for N ranks on this machine. It builds the run's plan (batch arithmetic, the
DeepSpeed config, the data this rank reads, the checkpoint layout), initialises DeepSpeed with the real model
when it fits in this host's memory, takes `steps` real optimizer steps, saves a checkpoint into a scratch folder
(removed afterwards), and reports the partition sizes DeepSpeed made next to the preflight estimate for the
target GPU. Every problem found is collected, not only the first. It never touches run.dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from common.files import GIB
from common.log import say
from data_pipeline.format.manifest import load_manifest, verify_dataset
from data_pipeline.format.names import MANIFEST
from data_pipeline.loading.windows import TokenWindows
from data_pipeline.sources.corpus import source_weights
from data_pipeline.storage.store import DataStore
from model.stats import param_counts, training_memory_per_rank
from train.batch import batch_loss, to_device
from train.checkpoint.layout import rng_file, step_tag
from train.checkpoint.rng_state import rng_state
from train.config import Config
from train.distributed import DistInfo, skip_cpu_shm_comm_op
from train.errors import TrainError
from train.plan import RunPlan, plan_batches, plan_run
from train.preflight import check_memory, choose_activation_checkpointing, meminfo_available_bytes

MIB = 1 << 20
GPU_MEMORY_MIB = {
    "a100-40gb": 40_960,
    "a100-80gb": 81_920,
    "h100": 81_559,
    "h100-nvl": 95_830,
    "h200": 143_771,
    "b200": 183_359,
    "l40s": 46_068,
    "l4": 23_034,
    "a10g": 23_028,
}
"""--gpu name -> the memory one GPU has, in MiB as nvidia-smi reports it (what torch's total_memory sees)."""
CHECKPOINT_WRITERS = {
    0: "rank 0 writes the model and optimizer states, each of the {n} ranks its RNG file",
    1: "each of the {n} ranks writes its optimizer partition and RNG file, rank 0 also the model states",
    2: "each of the {n} ranks writes its optimizer partition and RNG file, rank 0 also the model states",
    3: "each of the {n} ranks writes its model and optimizer partitions and RNG file",
}
"""ZeRO stage -> which rank writes which checkpoint files (rank 0 then adds meta.json, tokenizer.json, COMPLETE)."""
HOST_HEADROOM = 0.7
"""Share of this host's MemAvailable the dry run lets DeepSpeed (and a step) use before it skips them."""


@dataclass(frozen=True)
class DryRunOptions:
    """What `slm train --dry-run` simulates: the job's shape and the target GPU."""

    world_size: int
    """Data-parallel ranks of the job being simulated (N)."""
    rank: int = 0
    """The rank this process plays (0 <= rank < world_size)."""
    gpu: Optional[str] = None
    """Target GPU (a GPU_MEMORY_MIB name) for the memory check; None: no memory check against a GPU."""
    steps: int = 1
    """Real optimizer steps to take once DeepSpeed is initialised (0: none)."""
    nodes: Optional[int] = None
    """Slurm nodes of the job, when known (checked against world_size with tasks_per_node)."""
    tasks_per_node: Optional[int] = None
    """Training processes per node, when known."""

    def validate(self) -> None:
        """Raise TrainError naming the flag."""
        if self.world_size < 1:
            raise TrainError(f"--world-size is {self.world_size}; expected the job's number of ranks (>= 1).")
        if not 0 <= self.rank < self.world_size:
            raise TrainError(
                f"--rank is {self.rank}; expected a rank of the job, 0 to {self.world_size - 1} (--world-size "
                f"{self.world_size})."
            )
        if self.gpu is not None and self.gpu not in GPU_MEMORY_MIB:
            raise TrainError(
                f"--gpu {self.gpu!r} is not a GPU the dry run knows; expected one of {', '.join(GPU_MEMORY_MIB)}."
            )
        if self.steps < 0:
            raise TrainError(f"--steps is {self.steps}; expected 0 or more optimizer steps.")
        for flag, value in (("--nodes", self.nodes), ("--tasks-per-node", self.tasks_per_node)):
            if value is not None and value < 1:
                raise TrainError(f"{flag} is {value}; expected at least 1.")


@dataclass
class DryRunReport:
    """What the dry run found: report sections (title, lines), every error, and what it skipped."""

    sections: List[Tuple[str, List[str]]] = field(default_factory=list)
    """(title, lines) in the order they were checked."""
    errors: List[str] = field(default_factory=list)
    """Every config error found at this world size, each a complete sentence."""
    skipped: List[str] = field(default_factory=list)
    """What was not exercised, and why."""
    partitions: Dict[str, int] = field(default_factory=dict)
    """Elements rank R holds as DeepSpeed made them (`partition_sizes`); empty when DeepSpeed was not initialised."""

    def add(self, title: str, lines: List[str]) -> None:
        self.sections.append((title, lines))

    def text(self) -> str:
        out: List[str] = []
        for title, lines in self.sections:
            out += [title] + [f"  {line}" for line in lines] + [""]
        if self.skipped:
            out += ["skipped"] + [f"  {line}" for line in self.skipped] + [""]
        if self.errors:
            out += [f"{len(self.errors)} error(s) at this world size"]
            out += [f"  error: {e}" for e in self.errors]
        else:
            out += ["no errors found"]
        return "\n".join(out) + "\n"


# --- arithmetic checks -------------------------------------------------------------------------------------------


def check_slurm_shape(options: DryRunOptions) -> Optional[str]:
    """An error when nodes x tasks per node is not the simulated world size."""
    if options.nodes is None or options.tasks_per_node is None:
        return None
    if options.nodes * options.tasks_per_node == options.world_size:
        return None
    return (
        f"the Slurm shape --nodes {options.nodes} x --tasks-per-node {options.tasks_per_node} = "
        f"{options.nodes * options.tasks_per_node} ranks, but --world-size is {options.world_size}; the job would "
        "start another number of ranks than the one checked. Make nodes x GPUs (processes) per node equal the "
        "world size."
    )


def batch_hint(cfg: Config, world_size: int) -> str:
    """How train.global_batch_size could be reached at `world_size` (appended to plan_batches' error)."""
    wanted, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if wanted is None:
        return ""
    per_accum = micro * world_size
    if wanted % per_accum == 0:
        return f" At world size {world_size}, train.grad_accum_steps={wanted // per_accum} gives it."
    return (
        f" {wanted} is not divisible by world size {world_size} x micro_batch_size {micro} = {per_accum}, so no "
        "grad_accum_steps gives it at this world size: change the global batch or the micro-batch."
    )


def make_plan(cfg: Config, world_size: int, report: DryRunReport) -> RunPlan:
    """The run's plan at `world_size`; a plan error is recorded and a plan without train.global_batch_size is
    used for the remaining checks."""
    try:
        return plan_run(cfg, world_size)
    except TrainError as err:
        report.errors.append(str(err) + batch_hint(cfg, world_size))
    train = dataclasses.replace(cfg.train, global_batch_size=None)
    try:
        return plan_batches(train, world_size, cfg.model.max_seq_len, cfg.model.vocab_size)
    except TrainError as err:  # train.max_tokens
        report.errors.append(str(err))
        train = dataclasses.replace(train, max_tokens=None)
        return plan_batches(train, world_size, cfg.model.max_seq_len, cfg.model.vocab_size)


def check_data(cfg: Config, plan: RunPlan, options: DryRunOptions, report: DryRunReport) -> Optional[Any]:
    """Windows per split against N ranks, and what rank R reads first; the local data's manifest, or None when
    the data checks were skipped (say why)."""
    if cfg.train.stage == "ift":
        report.skipped.append("data: the instruction data of train.stage=ift is not checked by the dry run.")
        return None
    store = DataStore(cfg.data.dir, cfg.data.storage_options)
    if store.remote:
        report.skipped.append(
            f"data: data.dir {cfg.data.dir} is a URL; the dry run downloads nothing, so the windows per rank "
            "were not checked."
        )
        return None
    if not store.exists(MANIFEST):
        report.skipped.append(
            f"data: data.dir {cfg.data.dir} holds no {MANIFEST} (not prepared; a dry run prepares nothing), so "
            "the windows per rank were not checked. Run `slm prepare CONFIG` and dry-run again."
        )
        return None
    manifest = load_manifest(store)
    verify_dataset(manifest, splits=("train", "val"), checksums=False)
    weights = source_weights(cfg.data) if len(cfg.data.sources) > 1 else None
    seq, micro, n, rank = plan.seq_len, plan.micro_batch_size, plan.world_size, options.rank
    lines, windows = [], {}
    for split in ("train", "val"):
        dataset = TokenWindows(
            manifest, split, seq, micro, rank, n, cfg.run.seed, weights if split == "train" else None
        )
        windows[split] = dataset
        shards = len([s for s in manifest.shards if s.split == split])
        lines.append(f"{split}: {shards} shard(s), {dataset.windows:,} windows of {seq + 1} tokens")
    train_windows = windows["train"].windows
    if train_windows < plan.global_batch_size:
        report.errors.append(
            f"data.dir {cfg.data.dir} has {train_windows:,} train windows of seq_len + 1 = {seq + 1} tokens, but one "
            f"step at world size {n} takes a global batch of {plan.global_batch_size:,} (micro {micro} x accum "
            f"{plan.grad_accum_steps} x {n} ranks): every step would repeat windows. Prepare more data, or use fewer "
            "ranks or a smaller batch."
        )
    val_per_rank = math.ceil(cfg.eval.batches / n)
    val_needed = val_per_rank * n * micro
    if windows["val"].windows < n * micro:
        report.errors.append(
            f"data.dir {cfg.data.dir} has {windows['val'].windows:,} validation windows, fewer than one validation "
            f"batch per rank needs at world size {n} ({n} ranks x micro {micro} = {n * micro}); the ranks would "
            "evaluate the same windows. Prepare with a larger data.val_fraction or more data."
        )
    lines.append(
        f"each micro-step takes the next {n * micro:,} samples of the global order; rank {rank} reads samples "
        f"[{rank * micro}, {rank * micro + micro}) of each"
    )
    lines.append(
        f"validation: {val_per_rank} batch(es) per rank, {val_needed:,} windows over all ranks "
        f"(eval.batches {cfg.eval.batches})"
    )
    train = windows["train"]
    sources, picked = train.locate(torch.arange(rank * micro, rank * micro + micro).numpy())
    first = sorted(
        {
            train.streams[s].paths[k].name
            for s, w in zip(sources.tolist(), picked.tolist())
            for k, _, _ in train.pieces(s, w)
        }
    )
    lines.append(f"rank {rank}'s first micro-batch reads {', '.join(first)}")
    if cfg.data.num_workers:
        lines.append(
            f"data.num_workers {cfg.data.num_workers}: each worker takes whole steps of the same global order "
            "(shards are not divided among ranks or workers)"
        )
    report.add(f"data this rank reads ({cfg.data.dir})", lines)
    return manifest


# --- DeepSpeed under the fake process group ----------------------------------------------------------------------


class RandomInitSkipped(torch.overrides.TorchFunctionMode):
    """Within it, the in-place fills that initialise parameters return their tensor untouched: a model built
    under it has its parameters allocated (torch.empty) but never written.

    Safe for a dry run that takes no step, and only there: what it checks is the parameters' shapes and dtypes,
    DeepSpeed's partitions of them and the memory they take, none of which depends on the values; without a
    step no value is used, only copied (into DeepSpeed's flat buffers and fp32 masters, and the scratch
    checkpoint, removed unread). The fill is 10-14 s of CPU for the 1b preset (a third of its dry run: a
    billion random draws, twice: nn.Linear's kaiming_uniform_, then Transformer.reset_parameters' normal_), 2 s
    for 125m.

    Skipped: the nn.init functions that defer to torch function modes (uniform_, normal_, constant_,
    kaiming_uniform_: all that nn.Linear, nn.Embedding and model/transformer.py call) and the Tensor fills the
    other nn.init functions end in (normal_, uniform_, fill_, zero_: ones_, zeros_, kaiming_normal_, ...);
    trunc_normal_'s arithmetic after its uniform_ still runs. Every fill_ and zero_ is skipped, a buffer's too,
    so only the model's construction runs under it, never DeepSpeed's.
    """

    SKIPPED = frozenset(
        {
            torch.nn.init.uniform_,
            torch.nn.init.normal_,
            torch.nn.init.constant_,
            torch.nn.init.kaiming_uniform_,
            torch.Tensor.normal_,
            torch.Tensor.uniform_,
            torch.Tensor.fill_,
            torch.Tensor.zero_,
        }
    )

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def dry_run_model(cfg: Config, plan: RunPlan, steps: int) -> Any:
    """The run's model as `slm train` builds it (from scratch: the dry run loads no init_from weights); with no
    step to take, under RandomInitSkipped."""
    from train.startup import seeded_model

    with RandomInitSkipped() if steps == 0 else contextlib.nullcontext():
        return seeded_model(cfg, plan, None)


def fake_process_group(options: DryRunOptions) -> DistInfo:
    """Start torch.distributed's fake backend as rank R of N (and DeepSpeed's view of it) on the CPU."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(
        RANK=str(options.rank),
        WORLD_SIZE=str(options.world_size),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE=str(options.tasks_per_node or 1),
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    torch.distributed.init_process_group(
        "fake", store=FakeStore(), rank=options.rank, world_size=options.world_size
    )
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel("WARNING")
    skip_cpu_shm_comm_op()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    return DistInfo(
        rank=options.rank,
        world_size=options.world_size,
        local_rank=0,
        local_world_size=options.tasks_per_node or 1,
        device=torch.device("cpu"),
        backend="fake",
    )


def end_fake_process_group() -> None:
    """Destroy the fake group and forget DeepSpeed's cached groups and backend, which would otherwise point at
    the destroyed group: the process can then run another dry run (or anything else) cleanly."""
    from deepspeed import comm
    from deepspeed.utils import groups

    torch.distributed.destroy_process_group()
    comm.cdb = None
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUPS", "_GROUP_RANKS")):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mesh_device = None


def _numel(tensors: Any) -> int:
    return sum(int(t.numel()) for t in tensors)


def partition_sizes(engine: Any, zero_stage: int) -> Dict[str, int]:
    """Elements this rank holds, read from DeepSpeed's own flat partitions: "params" (the bit16 weights this
    rank keeps), "grads" (its gradient buffer), "master" (fp32 master weights) and "optimizer_state" (fp32
    elements of the optimizer's state tensors; 0 before the first step creates them), and "grad_bytes", the bytes
    of one gradient element (4 where ZeRO-1 accumulates in fp32, DeepSpeed's BF16_Optimizer)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = sum(
        int(v.numel()) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )
    if hasattr(opt, "fp32_groups_gradients_flat"):  # BF16_Optimizer: ZeRO-1 with fp32 gradient accumulation
        rank = torch.distributed.get_rank()
        return {
            "params": _numel(opt.bf16_groups_flat),
            "params_partition": _numel(groups[rank] for groups in opt.bf16_partitioned_groups),
            "grads": _numel(opt.fp32_groups_gradients_flat),
            "grad_bytes": opt.fp32_groups_gradients_flat[0].element_size(),
            "master": _numel(opt.fp32_groups_flat_partition),
            "optimizer_state": state,
        }
    if zero_stage in (1, 2):
        rank = torch.distributed.get_rank()
        partition = _numel(groups[rank] for groups in opt.parallel_partitioned_bit16_groups)
        flat = _numel(opt.bit16_groups_flat)
        return {
            "params": flat,
            "params_partition": partition,
            "grads": partition if zero_stage == 2 else flat,
            "grad_bytes": opt.bit16_groups_flat[0].element_size(),
            "master": _numel(opt.single_partition_of_fp32_groups),
            "optimizer_state": state,
        }
    if zero_stage == 3:
        return {
            "params": _numel(opt.fp16_partitioned_groups_flat),
            "params_partition": _numel(opt.fp16_partitioned_groups_flat),
            "grads": int(opt.grad_partitions_flat_buffer.numel()),
            "grad_bytes": opt.grad_partitions_flat_buffer.element_size(),
            "master": _numel(opt.fp32_partitioned_groups_flat),
            "optimizer_state": state,
        }
    total = _numel(engine.module.parameters())
    return {
        "params": total,
        "params_partition": total,
        "grads": total,
        "grad_bytes": next(engine.module.parameters()).element_size(),
        "master": total,
        "optimizer_state": state,
    }


def measured_state_bytes(sizes: Dict[str, int], bit16_bytes: int) -> int:
    """Bytes of model states per rank from the partitions (Adam: two fp32 states per master element, counted
    from the master partition before the first step creates them; with fp32 accumulation, also the bit16
    gradient autograd makes for each micro-batch)."""
    state = sizes["optimizer_state"] or 2 * sizes["master"]
    grad_bytes = sizes["grad_bytes"]
    micro_grads = sizes["params"] * bit16_bytes if grad_bytes > bit16_bytes else 0
    return (
        sizes["params"] * bit16_bytes
        + sizes["grads"] * grad_bytes
        + micro_grads
        + (sizes["master"] + state) * 4
    )


def random_batches(plan: RunPlan, vocab_size: int, seed: int) -> Any:
    """Micro-batches of random token ids: the step's stand-in when data.dir is not prepared."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, vocab_size, (plan.micro_batch_size, plan.seq_len + 1), generator=generator)
        yield {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}


def take_steps(engine: Any, batches: Any, plan: RunPlan, steps: int) -> List[str]:
    """`steps` real optimizer steps (grad_accum_steps micro-batches each), as the training loop takes them."""
    lines = []
    for number in range(1, steps + 1):
        started, loss_sum = time.perf_counter(), 0.0
        for _micro in range(plan.grad_accum_steps):
            loss = batch_loss(engine, to_device(next(batches), engine.device))
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        lines.append(
            f"step {number}: loss {loss_sum / plan.grad_accum_steps:.4f} (this rank's; collectives moved no data), "
            f"{time.perf_counter() - started:.1f} s on this CPU"
        )
    return lines


def save_scratch_checkpoint(engine: Any, rank: int, step: int) -> List[str]:
    """Save this rank's part of a checkpoint into a scratch folder (ours, removed afterwards); the files."""
    scratch = Path(tempfile.mkdtemp(prefix="slm-dry-run-"))
    try:
        tag = step_tag(step)
        (scratch / tag).mkdir()
        torch.save(rng_state(), rng_file(scratch / tag, rank))
        engine.save_checkpoint(str(scratch), tag=tag, client_state={}, save_latest=False)
        files = sorted(p for p in (scratch / tag).rglob("*") if p.is_file())
        return [f"{tag}/{p.relative_to(scratch / tag)}  {p.stat().st_size / MIB:,.1f} MiB" for p in files]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB"


def deepspeed_checks(
    cfg: Config,
    plan: RunPlan,
    options: DryRunOptions,
    manifest: Any,
    report: DryRunReport,
    memory: Dict[str, float],
) -> None:
    """Initialise DeepSpeed as rank R of N, read its partitions, take the steps and save a scratch checkpoint."""
    from train.startup import deepspeed_engine

    stage, n = cfg.train.zero_stage, options.world_size
    bit16 = 4 if cfg.train.precision == "fp32" else 2
    psi = param_counts(plan.model(cfg.model))["total"]
    init_bytes = psi * (4 + bit16) + 16 * psi / n
    if stage == 1 and bit16 == 2:  # BF16_Optimizer's whole fp32 gradient buffer
        init_bytes += 4 * psi
    available = meminfo_available_bytes()
    if available is not None and init_bytes > HOST_HEADROOM * available:
        report.skipped.append(
            f"DeepSpeed: building the model here needs about {gib(init_bytes)} but this host has {gib(available)} "
            "available; DeepSpeed was not initialised, so no partition was measured, no step taken and no "
            "checkpoint saved. Dry-run on a host with more memory."
        )
        return
    saved_env = dict(os.environ)
    dist_info = fake_process_group(options)
    try:
        say(f"dry run: DeepSpeed ZeRO {stage} as rank {options.rank} of {n} (fake process group)")
        started = time.perf_counter()
        try:
            model = dry_run_model(cfg, plan, options.steps)
            engine = deepspeed_engine(cfg, dist_info, model, universal=False)
        except TrainError as err:
            if str(err) not in report.errors:  # a deepspeed: block error is found first by target_deepspeed
                report.errors.append(str(err))
            return
        except Exception as err:  # DeepSpeed's own assertion (a bucket or partition that cannot hold, ...)
            report.errors.append(
                f"DeepSpeed could not initialise ZeRO {stage} at world size {n}: {type(err).__name__}: "
                f"{' '.join(str(err).split())}"
            )
            return
        init_seconds = time.perf_counter() - started
        at = len(
            report.sections
        )  # the partitions are read after the steps (which create the optimizer state)
        if options.steps:
            step_report(cfg, plan, options, manifest, engine, dist_info, report, available)
        sizes = report.partitions = partition_sizes(engine, stage)
        measured = measured_state_bytes(sizes, bit16)
        grad_bytes = sizes["grad_bytes"]
        state = sizes["optimizer_state"]
        lines = [
            f"initialised in {init_seconds:.1f} s: {psi:,} parameters, precision {cfg.train.precision}",
            f"parameters held       {sizes['params']:>14,}  ({sizes['params'] * bit16 / GIB:.3f} GiB)"
            + (f"; own partition {sizes['params_partition']:,}" if stage in (1, 2) else ""),
            f"gradients             {sizes['grads']:>14,}  ({sizes['grads'] * grad_bytes / GIB:.3f} GiB)"
            + (" fp32 accumulation (BF16_Optimizer)" if grad_bytes > bit16 else ""),
            f"fp32 master weights   {sizes['master']:>14,}  ({sizes['master'] * 4 / GIB:.3f} GiB)",
            (
                f"optimizer state       {state:>14,}  ({state * 4 / GIB:.3f} GiB)"
                if state
                else f"optimizer state       {2 * sizes['master']:>14,}  (2 x master: created by the first step)"
            ),
            f"model states per rank: {gib(measured)} from these partitions; preflight estimate "
            f"{gib(memory['model_states'])}",
        ]
        report.sections.insert(
            at, (f"DeepSpeed partitions of rank {options.rank} (ZeRO {stage}, world size {n})", lines)
        )
        try:
            files = save_scratch_checkpoint(engine, options.rank, options.steps)
        except Exception as err:
            report.errors.append(f"saving a checkpoint at world size {n} failed: {type(err).__name__}: {err}")
            return
        report.add(
            f"checkpoint files rank {options.rank} writes (saved to a scratch folder, then removed)",
            files
            + [f"(a run writes them to {cfg.run.dir}/checkpoints/; {CHECKPOINT_WRITERS[stage].format(n=n)})"],
        )
    finally:
        end_fake_process_group()
        os.environ.clear()
        os.environ.update(saved_env)  # RANK, WORLD_SIZE ... of the simulated job


def step_report(
    cfg: Config,
    plan: RunPlan,
    options: DryRunOptions,
    manifest: Any,
    engine: Any,
    dist_info: DistInfo,
    report: DryRunReport,
    available: Optional[int],
) -> None:
    """Take options.steps real steps when they fit in this host's memory, on this rank's data (random tokens
    when data.dir is not prepared)."""
    from train.startup import build_loaders, load_data

    if cfg.train.zero_stage == 3 and options.rank != 0:
        report.skipped.append(
            f"steps: ZeRO 3 checks during a step that every rank traced what rank 0 broadcasts, and the fake group "
            f"carries no data, so rank {options.rank} cannot step here; dry-run --rank 0 to take the steps."
        )
        return
    activations = training_memory_per_rank(
        plan.model(cfg.model),
        cfg.train.zero_stage,
        options.world_size,
        plan.micro_batch_size,
        plan.seq_len,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )["activations"]
    step_bytes = 4 * activations  # fp32 on the CPU, and attention without a fused kernel
    if available is not None and step_bytes > HOST_HEADROOM * available:
        report.skipped.append(
            f"steps: a step needs about {gib(step_bytes)} on this host ({gib(available)} available); no step taken."
        )
        return
    if manifest is not None:
        data = load_data(cfg, dist_info)
        batches = iter(build_loaders(cfg, data.dir, data.tokenizer, dist_info)[0])
        source = f"rank {options.rank}'s batches of {cfg.data.dir}"
    else:
        batches = random_batches(plan, plan.model(cfg.model).vocab_size, cfg.run.seed)
        source = "random tokens (data.dir not prepared)"
    try:
        lines = take_steps(engine, batches, plan, options.steps)
    except Exception as err:
        report.errors.append(
            f"a training step at world size {options.world_size} failed: {type(err).__name__}: {err}"
        )
        return
    report.add(f"{options.steps} real step(s) on {source}", lines)


def target_deepspeed(cfg: Config, plan: RunPlan, options: DryRunOptions, report: DryRunReport) -> List[str]:
    """The communication options and gradient accumulation the job's GPUs get (this CPU dry run initialises
    DeepSpeed with overlap_comm off), and whether ZeRO-1 would spare per-micro-batch reductions."""
    from train.deepspeed_config import build_deepspeed_config

    try:
        ds = build_deepspeed_config(
            cfg.train,
            cfg.optim,
            options.world_size,
            cfg.deepspeed,
            model=plan.model(cfg.model),
            device_type="cuda",
            skips_steps=cfg.skips_steps,
        )
    except TrainError as err:
        report.errors.append(str(err))
        return ["not built (see the errors)"]
    stage, accum = cfg.train.zero_stage, plan.grad_accum_steps
    lines = ["zero_optimization " + json.dumps(ds["zero_optimization"])]
    if ds.get("data_types", {}).get("grad_accum_dtype") == "fp32" and stage == 1:
        lines.append(
            f"ZeRO 1, bf16: gradients of the {accum} micro-batch(es) accumulate in fp32 (BF16_Optimizer) and are "
            "all-reduced once per step"
        )
    elif stage == 2 and accum > 1:
        lines.append(
            f"ZeRO 2 reduce-scatters the gradients after each of the {accum} micro-batches of a step"
        )
        if options.gpu:
            one = training_memory_per_rank(
                plan.model(cfg.model),
                1,
                options.world_size,
                plan.micro_batch_size,
                plan.seq_len,
                activation_checkpointing=cfg.train.activation_checkpointing,
            )["total"]
            budget = GPU_MEMORY_MIB[options.gpu] * MIB
            if one <= budget:
                lines.append(
                    f"train.zero_stage=1 would fit ({gib(one)} of {gib(budget)} estimated) and reduce once per "
                    "step, with fp32 accumulation"
                )
    return lines


def resolve_target_auto(cfg: Config, options: DryRunOptions) -> Config:
    """train.precision=auto and optim.muon_ns_method=auto as a GPU of the table would resolve them (bf16 and the
    standard Newton-Schulz: all of them compute bf16 natively)."""
    if cfg.optim.muon_ns_method == "auto":
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, muon_ns_method="standard"))
    if cfg.train.precision != "auto":
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16"))


def dry_run(cfg: Config, options: DryRunOptions) -> DryRunReport:
    """Every check at world size N as rank R (see the module docstring); errors are collected in the report."""
    options.validate()
    report = DryRunReport()
    auto = (
        " (train.precision=auto, as a GPU of --gpu's table resolves it)"
        if cfg.train.precision == "auto"
        else ""
    )
    cfg = resolve_target_auto(cfg, options)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False, device="cpu"))
    shape_error = check_slurm_shape(options)
    if shape_error:
        report.errors.append(shape_error)
    plan = make_plan(cfg, options.world_size, report)
    checkpointing = ""
    if cfg.train.activation_checkpointing is None:  # auto: decided against the target GPU's memory
        gpu_bytes = GPU_MEMORY_MIB[options.gpu] * MIB if options.gpu else None
        chosen = choose_activation_checkpointing(
            plan.model(cfg.model), cfg.train, plan, options.world_size, gpu_bytes
        )
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=chosen))
        checkpointing = f" (auto, against {options.gpu})" if options.gpu else " (auto: no --gpu to judge by)"
    stage = cfg.train.zero_stage
    report.add(
        f"plan at world size {options.world_size} (rank {options.rank})",
        [
            f"ZeRO stage {stage}, precision {cfg.train.precision}{auto}, activation checkpointing "
            f"{'on' if cfg.train.activation_checkpointing else 'off'}{checkpointing}",
            f"global batch {plan.global_batch_size:,} = micro {plan.micro_batch_size} x accum {plan.grad_accum_steps}"
            f" x world {plan.world_size}; {plan.tokens_per_step:,} tokens per step",
            f"{plan.max_steps:,} steps = {plan.tokens_per_step * plan.max_steps:,} tokens",
        ],
    )
    report.add(
        "DeepSpeed config on the target GPUs (zero_optimization as built for CUDA)",
        target_deepspeed(cfg, plan, options, report),
    )
    manifest = None
    try:
        manifest = check_data(cfg, plan, options, report)
    except Exception as err:  # DataError and friends: a finding, not the end of the dry run
        report.errors.append(f"data: {err}")
    if manifest is not None:
        from data_pipeline.tokenizer import load_tokenizer, model_vocab_size

        tokenizer = load_tokenizer(Path(cfg.data.dir) / "tokenizer.json")
        plan = dataclasses.replace(plan, vocab_size=model_vocab_size(tokenizer))
    model_cfg = plan.model(cfg.model)
    memory = training_memory_per_rank(
        model_cfg,
        stage,
        options.world_size,
        plan.micro_batch_size,
        plan.seq_len,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )
    lines = [
        f"model states {gib(memory['model_states'])} + activations {gib(memory['activations'])} = "
        f"{gib(memory['total'])} per rank (model/stats.py, bf16 + fp32 Adam)"
    ]
    if options.gpu:
        budget = GPU_MEMORY_MIB[options.gpu] * MIB
        lines.append(
            f"{options.gpu}: {gib(budget)} per GPU ({100 * memory['total'] / budget:.0f}% estimated)"
        )
        try:
            check_memory(memory["total"], budget, f"one {options.gpu}", cfg.train, options.world_size)
        except TrainError as err:
            report.errors.append(str(err))
    else:
        report.skipped.append(
            "GPU memory: no --gpu given, so the estimate was not compared with a GPU's memory."
        )
    report.add("memory per rank (preflight estimate)", lines)
    deepspeed_checks(cfg, plan, options, manifest, report, memory)
    return report
