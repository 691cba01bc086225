"""Typed configs of a training run and the root `Config` that composes every component's section, each owned by
what uses it: train (the run's shape and runtime), optim (train.optim_config), schedule (train.schedule),
checkpoint, export, eval (train.downstream.config), log, guard (train.guard). `launch.config` loads it from YAML and validates it; the
loaded config is never rewritten: what a run derives from it (max_steps from a token budget, the world size,
model.vocab_size from the tokenizer) is the run's plan (train.plan.RunPlan), recorded beside it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from common.checks import check_at_least, check_choice, check_finite_fields, check_positive, check_range
from data_pipeline.config import DataConfig, InstructConfig, TokenizerConfig
from model.config import ModelConfig
from train.downstream.config import EvalConfig
from train.guard import GuardConfig
from train.optim_config import OptimConfig
from train.profile_config import ProfileConfig
from train.schedule import ScheduleConfig

STAGES = ("pretrain", "cpt", "ift")
ZERO_STAGES = (0, 1, 2, 3)
"""The DeepSpeed ZeRO stages slm train supports (stated once; the config check and summaries use it)."""
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ON_NONFINITE = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
WANDB_MODES = ("disabled", "offline", "online")
EXPORT_DTYPES = ("bf16", "fp32")

MOVED_KEYS: Dict[str, str] = {
    "train.optimizer": "optim.name",
    "train.lr": "optim.lr",
    "train.weight_decay": "optim.weight_decay",
    "train.beta1": "optim.beta1",
    "train.beta2": "optim.beta2",
    "train.adam_eps": "optim.eps",
    "train.grad_clip": "optim.grad_clip",
    "train.muon_lr": "optim.muon_lr",
    "train.muon_momentum": "optim.muon_momentum",
    "train.muon_ns_method": "optim.muon_ns_method",
    "train.schedule": "schedule.name",
    "train.min_lr": "schedule.min_lr",
    "train.warmup_steps": "schedule.warmup_steps",
    "train.decay_fraction": "schedule.decay_fraction",
    "train.decay_time_margin": "schedule.decay_time_margin",
    "train.decay_shape": "schedule.decay_shape",
    "train.ckpt_every": "checkpoint.every",
    "train.keep_checkpoints": "checkpoint.keep",
    "train.resume": "checkpoint.resume",
    "train.verify_checkpoint_hashes": "checkpoint.verify_hashes",
    "train.export_every": "export.every",
    "train.export_dtype": "export.dtype",
    "train.eval_every": "eval.every",
    "train.eval_batches": "eval.batches",
    "train.log_every": "log.every",
    "train.peak_flops": "log.peak_flops",
}
"""Keys of the old one-section layout (train.*) and where they live now: `upgrade_config` moves them in configs
saved by older runs; `launch.config` refuses them in what a user writes, naming the new key."""


def upgrade_config(data: Dict[str, Any]) -> Dict[str, Any]:
    """A saved config dict (a checkpoint's meta.json "config", a run dir's config.yaml) in the current layout:
    the keys of MOVED_KEYS that an older run wrote are moved to their new places (a copy; new layouts pass
    through unchanged)."""
    data = copy.deepcopy(dict(data))
    old_train = data.get("train")
    if not isinstance(old_train, dict):
        return data
    for old, new in MOVED_KEYS.items():
        old_name = old.split(".", 1)[1]
        if old_name in old_train:
            section, name = new.split(".", 1)
            value = old_train.pop(old_name)
            target = data.setdefault(section, {})
            if isinstance(target, dict):
                target.setdefault(name, value)
    return data


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/tiny"
    """Folder for everything the run writes: config, plan, metrics.jsonl, checkpoints, logs."""
    seed: int = 1337
    """Seed for model init, data order and every RNG."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_range("run.seed", self.seed, 0, 2**32 - 1, what="an integer (numpy's seed range)")


@dataclass(frozen=True)
class TrainConfig:
    """The `train` section: what is trained, on which layout, for how long."""

    stage: str = "pretrain"
    """pretrain, cpt (continued pretraining from train.init_from) or ift (instruction fine-tuning)."""
    init_from: Optional[str] = None
    """Checkpoint, run dir or export whose weights start a cpt/ift run (fresh optimizer, step 0)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: str = "auto"
    """auto, bf16, fp16 (dynamic loss scaling) or fp32. auto: bf16 where the hardware computes it natively (a GPU
    with bf16, a CPU with AVX512-BF16 or AMX), fp16 on an older GPU, else fp32 (emulated bf16 is far slower)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: Optional[int] = None
    """If set, must equal micro_batch_size * grad_accum_steps * data-parallel world size."""
    max_steps: int = 200
    """Optimizer steps to run (the schedule's length)."""
    max_tokens: Optional[int] = None
    """Token budget; if set, max_steps becomes ceil(max_tokens / tokens_per_step) (in the run's plan)."""
    max_time: Optional[float] = None
    """Wall-clock seconds; when spent, the run evaluates, checkpoints and stops cleanly."""
    on_nonfinite: str = "stop"
    """Non-finite loss or gradient norm: stop (naming the step) or skip the step and count it."""
    activation_checkpointing: Optional[bool] = None
    """Recompute each block's activations in the backward pass (about a third more compute, far less memory).
    null: auto, on only when the preflight estimate does not fit this run's memory without it."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    backend: str = "auto"
    """Distributed backend: auto (nccl on cuda, gloo on cpu), nccl or gloo."""
    timeout_minutes: float = 60.0
    """How long a collective waits for the slowest rank before the job fails (the NCCL watchdog, gloo). Rank 0's
    work alone (converting a universal checkpoint, hashing a large one) must fit in it; DeepSpeed's default is 30."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        for key, allowed in (
            ("stage", STAGES),
            ("zero_stage", ZERO_STAGES),
            ("precision", PRECISIONS),
            ("on_nonfinite", ON_NONFINITE),
            ("device", DEVICES),
            ("backend", BACKENDS),
        ):
            check_choice(f"train.{key}", getattr(self, key), allowed)
        for key in ("micro_batch_size", "grad_accum_steps", "max_steps"):
            check_positive(f"train.{key}", getattr(self, key))
        check_finite_fields(self, "train")
        if self.max_time is not None and self.max_time < 0:
            raise ValueError(
                f"config key 'train.max_time' is {self.max_time}; expected seconds >= 0 or null."
            )
        if not self.timeout_minutes > 0:
            raise ValueError(
                f"config key 'train.timeout_minutes' is {self.timeout_minutes}; expected a positive number of "
                "minutes (60 by default)."
            )


@dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` section: where checkpoints are written, when, how many are kept, and which one a run resumes."""

    dir: Optional[str] = None
    """Folder or fsspec URL (s3://, gs://, az://) of the checkpoints; null is run.dir/checkpoints. A URL is reached
    with data.storage_options through node-local folders under data.cache_dir."""
    every: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    keep: int = 2
    """How many complete checkpoints to keep."""
    resume: str = "auto"
    """auto (resume from the latest complete checkpoint in checkpoint.dir), false (refuse a non-empty run.dir), or a
    checkpoint path or URL."""
    async_save: bool = False
    """Block training only while the states are written to local disk; hash, upload, COMPLETE and rotation run in
    a background thread (one save in flight; runs on several nodes save synchronously)."""
    verify_hashes: bool = True
    """Check the hash of every checkpoint file before loading it (sizes are always checked); false for huge ones."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        for key in ("every", "keep"):
            check_positive(f"checkpoint.{key}", getattr(self, key))
        if self.dir is not None and not str(self.dir).strip():
            raise ValueError(
                "checkpoint.dir is empty; expected a folder, an fsspec URL, or null for run.dir/checkpoints."
            )


@dataclass(frozen=True)
class ExportConfig:
    """The `export` section: Hugging Face folders written while training."""

    every: int = 0
    """Export a Hugging Face folder every this many steps; 0 disables."""
    dtype: str = "bf16"
    """Weights dtype of those exports: bf16 or fp32 (the trained values exactly)."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_choice("export.dtype", self.dtype, EXPORT_DTYPES)
        check_at_least("export.every", self.every, 0, " (0 disables)")


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "disabled"
    """disabled, offline or online."""
    project: str = "slm-forge"
    """wandb project name."""
    name: Optional[str] = None
    """Run name; defaults to the run.dir folder name."""
    tags: List[str] = field(default_factory=list)
    """Tags attached to the wandb run."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_choice("log.wandb.mode", self.mode, WANDB_MODES)


@dataclass(frozen=True)
class LogConfig:
    """The `log` section: the metric rows (train rows with MFU, every log.every steps), console and wandb."""

    every: int = 10
    """Print and record a metrics row every this many steps."""
    console: bool = True
    """Print metric rows on rank 0."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s per device for MFU; null means the built-in table for known GPUs (none on CPU)."""

    def validate(self) -> None:
        """Raise ValueError naming the key."""
        check_positive("log.every", self.every)
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(
                f"config key 'log.peak_flops' is {self.peak_flops}; expected a positive number or null."
            )
        self.wandb.validate()


@dataclass(frozen=True)
class Config:
    """The whole run: one section per component (launch.config loads and validates it)."""

    run: RunConfig = field(default_factory=RunConfig)
    """Where the run writes and its seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Transformer shapes."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Byte-level BPE tokenizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Raw sources and prepared shards."""
    ift: InstructConfig = field(default_factory=InstructConfig)
    """Instruction data for train.stage=ift."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage, layout, batch and length of the run."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer (AdamW or Muon) and its settings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention and resume."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Hugging Face exports while training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation cadence (eval.every, eval.batches) and downstream evaluation (eval.downstream)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metric rows, MFU, console and wandb logging."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """The stability guard: loss and gradient-norm spikes and what to do about one (train.guard)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """A torch profiler trace of chosen steps into run.dir/profile/ (train.profiler)."""
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed JSON keys merged over the generated ones (DeepSpeed validates them)."""

    @property
    def skips_steps(self) -> bool:
        """Some step may be skipped rather than stop the run (train.on_nonfinite=skip, guard.action skip or
        rollback): the loop then hands the optimizer a step whose gradients are non-finite, to be dropped."""
        return self.train.on_nonfinite == "skip" or self.guard.action in ("skip", "rollback")

    def validate(self) -> None:
        """Each section's own validate(), then the checks that span sections; ValueError naming the first bad key."""
        for section in (
            self.run,
            self.train,
            self.optim,
            self.schedule,
            self.checkpoint,
            self.export,
            self.eval,
            self.log,
            self.guard,
            self.profile,
            self.data,
            self.ift,
            self.tokenizer,
            self.model,
        ):
            section.validate()
        if self.optim.name == "muon":
            self.validate_muon()
        self.validate_schedule()

    def validate_muon(self) -> None:
        """What DeepSpeed 0.19.8's Muon cannot do correctly is refused rather than trained wrongly."""
        train, optim = self.train, self.optim
        if train.zero_stage > 0 and optim.grad_clip > 0:
            raise ValueError(
                f"config key 'optim.grad_clip' is {optim.grad_clip} with optim.name=muon at ZeRO {train.zero_stage}: "
                "there DeepSpeed clips Muon's orthogonalized update instead of the gradient, which divides every step "
                "by the update's norm (deepspeedai/DeepSpeed#8439; 28x on the tiny model). Set optim.grad_clip=0 "
                "(Muon's updates are bounded by construction), or use ZeRO 0."
            )
        if train.zero_stage == 3 and train.grad_accum_steps > 1:
            raise ValueError(
                f"config key 'train.grad_accum_steps' is {train.grad_accum_steps} with optim.name=muon at ZeRO 3: "
                "there DeepSpeed orthogonalizes each micro-batch's gradient instead of the accumulated one "
                "(deepspeedai/DeepSpeed#8443). Use train.grad_accum_steps=1 (a larger micro-batch), or ZeRO 1-2."
            )
        skipping = [("train.on_nonfinite", "skip", "stop"), ("guard.action", "skip", "warn or rollback")]
        for key, value, instead in skipping:
            section, name = key.split(".")
            if (
                getattr(getattr(self, section), name) != value
                or train.zero_stage != 0
                or train.precision != "fp32"
            ):
                continue
            raise ValueError(
                f"config keys 'optim.name=muon' and '{key}={value}' at ZeRO 0 in fp32: that "
                "optimizer steps its momentum even without gradients, so a step cannot be skipped there. "
                f"Use train.precision=bf16, a ZeRO stage of 1-3, or {key}={instead}."
            )

    def validate_schedule(self) -> None:
        """The schedule against optim.lr and train.* (the check against a max_steps that train.max_tokens derives
        is train.plan's, once, when the plan is made)."""
        schedule, train = self.schedule, self.train
        if schedule.min_lr > self.optim.lr:
            raise ValueError(
                f"config key 'schedule.min_lr' ({schedule.min_lr}) is above 'optim.lr' ({self.optim.lr}); "
                "expected min_lr <= lr."
            )
        if train.max_tokens is None:
            check_warmup(schedule.warmup_steps, train.max_steps, "'train.max_steps'")
        if schedule.name == "wsd_time" and not (train.max_time and train.max_time > 0):
            raise ValueError(
                f"config key 'schedule.name' is wsd_time but train.max_time is {train.max_time}; expected "
                "the time budget in seconds (the decay starts at (1 - schedule.decay_fraction) * max_time)."
            )


def check_warmup(warmup_steps: int, max_steps: int, what: str) -> None:
    """schedule.warmup_steps below the run's length (`what` names where max_steps comes from)."""
    if warmup_steps >= max_steps:
        raise ValueError(
            f"config key 'schedule.warmup_steps' ({warmup_steps}) is not below {what} ({max_steps}): "
            "the run would end before the learning rate reaches its peak. Lower schedule.warmup_steps."
        )


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `slm config show` prints and run.dir/config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain dicts and lists (saved in checkpoints, given to wandb)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: Dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. the copy saved in a checkpoint), of any layout
    (`upgrade_config`)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), upgrade_config(data)))
